"""Quality metrics on the same token windows for two runners: perplexity, KL, top-1 agreement."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from llmopt.evaluation.runners import Runner


def token_windows(tokenizer, text: str, max_tokens: int, window: int) -> list[np.ndarray]:
    """Non-overlapping windows of `window` tokens from the start of `text`, `max_tokens` in all, each starting
    with the tokenizer's leading token where it puts one (then window - 1 of the text's own)."""
    from llmopt.evaluation.text import token_ids, window_of

    ids, first = token_ids(tokenizer, text)
    ids = ids[:max_tokens]
    step = window - (first is not None)
    count = len(ids) // step if step > 0 else 0
    if count == 0:
        raise ValueError(f"the evaluation text has {len(ids)} tokens, fewer than one window of {window}")
    return [window_of(ids, i * step, window, first) for i in range(count)]



CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 2000


@dataclass
class WindowSums:
    """Per-window sums, (W,) each: what every metric is a ratio of, so windows can be resampled."""

    nll_base: np.ndarray
    nll_opt: np.ndarray
    kl: np.ndarray
    agree: np.ndarray
    predicted: np.ndarray

    def metrics(self, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Pooled metrics; `weights` (B, W) counts how often each window is drawn in each resample."""
        w = np.ones((1, len(self.predicted))) if weights is None else weights
        n = w @ self.predicted
        nll_base, nll_opt = w @ self.nll_base / n, w @ self.nll_opt / n
        return {"perplexity": np.exp(nll_opt), "perplexity_increase_pct": (np.exp(nll_opt - nll_base) - 1) * 100,
                "kl_divergence": w @ self.kl / n, "top1_agreement": w @ self.agree / n}


def bootstrap_intervals(sums: WindowSums, *, level: float = CONFIDENCE, samples: int = BOOTSTRAP_SAMPLES,
                        seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap over evaluation windows, paired: baseline and optimized are resampled together.

    Windows, not tokens, are the unit: tokens within a window are correlated, so a token-level bootstrap
    would give intervals that are too narrow. Seeded, so a report is reproducible.
    """
    count = len(sums.predicted)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, count, size=(samples, count))  # (B, W) window indices
    weights = np.zeros((samples, count))
    np.add.at(weights, (np.arange(samples)[:, None], draws), 1.0)
    tail = (1 - level) / 2 * 100
    return {name: (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))
            for name, values in sums.metrics(weights).items()}


@dataclass
class QualityScores:
    baseline_perplexity: float
    perplexity: float
    kl_divergence: float  # mean KL(baseline || optimized) per predicted token, nats
    top1_agreement: float  # share of positions whose argmax matches the baseline's
    tokens: int
    windows: int
    intervals: dict[str, tuple[float, float]] | None = None  # metric -> (low, high) at CONFIDENCE


def compare_quality(baseline: Runner, optimized: Runner, windows: list[np.ndarray],
                    progress: Callable[[int, int], None] | None = None) -> QualityScores:
    """`progress(done, total)` after each window (the longest step of a run: it shows how far it is)."""
    pairs = ((baseline.logits(ids), optimized.logits(ids), ids) for ids in windows)
    return quality_scores(pairs, len(windows), progress)


def quality_scores(windows: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], count: int,
                   progress: Callable[[int, int], None] | None = None) -> QualityScores:
    """The scores of `count` windows given as (baseline logits (T, V), optimized logits (T, V), token ids (T,)),
    one at a time: a streamed model's logits come from its layer-by-layer traces, not from a runner."""
    import torch  # multi-threaded softmax over the vocabulary: numpy made this the slowest step

    rows = []
    for i, (base, opt, ids) in enumerate(windows):
        if progress is not None:
            progress(i, count)
        # (T-1, V): the predictions for ids[1:]
        lp_base = torch.log_softmax(torch.from_numpy(base[:-1]), dim=-1)
        lp_opt = torch.log_softmax(torch.from_numpy(opt[:-1]), dim=-1)
        targets = torch.from_numpy(ids[1:])[:, None]
        rows.append((-float(lp_base.gather(1, targets).sum()), -float(lp_opt.gather(1, targets).sum()),
                     # per token >= 0 by definition: rounding makes a near-identical model's slightly negative
                     float((lp_base.exp() * (lp_base - lp_opt)).sum(-1).clamp_min(0).sum()),
                     int((lp_base.argmax(-1) == lp_opt.argmax(-1)).sum()), len(ids) - 1))
    if progress is not None:
        progress(count, count)
    sums = WindowSums(*(np.array(column, dtype=np.float64) for column in zip(*rows)))
    predicted = float(sums.predicted.sum())
    point = {name: float(value[0]) for name, value in sums.metrics().items()}  # every window once
    return QualityScores(
        baseline_perplexity=math.exp(sums.nll_base.sum() / predicted),
        perplexity=point["perplexity"],
        kl_divergence=point["kl_divergence"],
        top1_agreement=point["top1_agreement"],
        tokens=int(predicted) + len(rows),
        windows=len(rows),
        intervals=bootstrap_intervals(sums),
    )


SAMPLE_PROMPTS = ("The capital of France is", "def fibonacci(n):", "Water boils at")


def generation_samples(baseline: Runner, optimized: Runner, tokenizer, new_tokens: int = 24) -> list[dict[str, str]]:
    """Greedy continuations of a few fixed prompts by both models, side by side (reproducible run to run)."""
    samples = []
    for prompt in SAMPLE_PROMPTS:
        ids = np.asarray(tokenizer(prompt)["input_ids"], dtype=np.int64)
        texts = [tokenizer.decode(r.generate(ids, new_tokens)[len(ids):], skip_special_tokens=True)
                 for r in (baseline, optimized)]
        samples.append({"prompt": prompt, "baseline": texts[0], "optimized": texts[1]})
    return samples


def hidden_states(model, windows: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Each window's hidden states after every decoder layer: [window][layer] (T, hidden) float32."""
    import torch

    out = []
    with torch.inference_mode():
        for ids in windows:
            states = model(input_ids=torch.from_numpy(ids[None]), output_hidden_states=True, use_cache=False).hidden_states
            out.append([h[0].float().numpy() for h in states[1:]])  # states[0] is the embedding output
    return out


def relative_layer_errors(before: list[list[np.ndarray]], after: list[list[np.ndarray]]) -> list[float] | None:
    """||h_after - h_before||^2 / ||h_before||^2 per decoder layer, pooled over windows.

    None when the layers no longer line up (layers removed, or another hidden size): there is no
    layer-by-layer comparison to make then.
    """
    if len(before[0]) != len(after[0]) or before[0][0].shape != after[0][0].shape:
        return None
    errors = []
    for layer in range(len(before[0])):
        num = sum(float(((a[layer] - b[layer]) ** 2).sum()) for a, b in zip(after, before))
        den = sum(float((b[layer] ** 2).sum()) for b in before)
        errors.append(num / max(den, 1e-30))
    return errors
