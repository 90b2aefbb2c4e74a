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



@dataclass
class QualityScores:
    baseline_perplexity: float
    perplexity: float
    kl_divergence: float  # mean KL(baseline || optimized) per predicted token, nats
    top1_agreement: float  # share of positions whose argmax matches the baseline's
    tokens: int
    windows: int


def compare_quality(baseline: Runner, optimized: Runner, windows: list[np.ndarray]) -> QualityScores:
    import torch  # multi-threaded softmax over the vocabulary: numpy made this the slowest step

    nll_base = nll_opt = kl_sum = 0.0
    agree = predicted = 0
    for ids in windows:
        # (T-1, V): the predictions for ids[1:]
        lp_base = torch.log_softmax(torch.from_numpy(baseline.logits(ids)[:-1]), dim=-1)
        lp_opt = torch.log_softmax(torch.from_numpy(optimized.logits(ids)[:-1]), dim=-1)
        targets = torch.from_numpy(ids[1:])[:, None]
        nll_base -= float(lp_base.gather(1, targets).sum())
        nll_opt -= float(lp_opt.gather(1, targets).sum())
        kl_sum += float((lp_base.exp() * (lp_base - lp_opt)).sum())
        agree += int((lp_base.argmax(-1) == lp_opt.argmax(-1)).sum())
        predicted += len(ids) - 1
    return QualityScores(
        baseline_perplexity=math.exp(nll_base / predicted),
        perplexity=math.exp(nll_opt / predicted),
        kl_divergence=kl_sum / predicted,
        top1_agreement=agree / predicted,
        tokens=predicted + len(windows),
        windows=len(windows),
    )
