"""Quality metrics on the same token windows for two runners: perplexity, KL, top-1 agreement."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llmopt.evaluation.runners import Runner


def token_windows(tokenizer, text: str, max_tokens: int, window: int) -> list[np.ndarray]:
    """Non-overlapping windows of `window` tokens from the start of `text`, `max_tokens` in all."""
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)[:max_tokens]
    count = len(ids) // window
    if count == 0:
        raise ValueError(f"the evaluation text has {len(ids)} tokens, fewer than one window of {window}")
    return [ids[i * window:(i + 1) * window] for i in range(count)]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@dataclass
class QualityScores:
    baseline_perplexity: float
    perplexity: float
    kl_divergence: float  # mean KL(baseline || optimized) per predicted token, nats
    top1_agreement: float  # share of positions whose argmax matches the baseline's
    tokens: int
    windows: int


def compare_quality(baseline: Runner, optimized: Runner, windows: list[np.ndarray]) -> QualityScores:
    nll_base = nll_opt = kl_sum = 0.0
    agree = predicted = 0
    for ids in windows:
        lp_base = _log_softmax(baseline.logits(ids))[:-1]  # (T-1, V): predictions for ids[1:]
        lp_opt = _log_softmax(optimized.logits(ids))[:-1]
        targets = ids[1:]
        rows = np.arange(len(targets))
        nll_base -= lp_base[rows, targets].sum()
        nll_opt -= lp_opt[rows, targets].sum()
        kl_sum += (np.exp(lp_base) * (lp_base - lp_opt)).sum()
        agree += int((lp_base.argmax(-1) == lp_opt.argmax(-1)).sum())
        predicted += len(targets)
    return QualityScores(
        baseline_perplexity=math.exp(nll_base / predicted),
        perplexity=math.exp(nll_opt / predicted),
        kl_divergence=kl_sum / predicted,
        top1_agreement=agree / predicted,
        tokens=predicted + len(windows),
        windows=len(windows),
    )
