"""Quality metrics and their bootstrap confidence intervals, on synthetic windows with known truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llmopt.evaluation.quality import WindowSums, bootstrap_intervals, compare_quality


def synthetic(windows: int, rng: np.random.Generator, tokens: int = 64) -> WindowSums:
    """Windows whose per-token KL averages 0.2 and top-1 agreement 0.8, with window-to-window spread."""
    predicted = np.full(windows, float(tokens))
    kl = rng.gamma(4.0, 0.05, windows) * tokens  # mean 0.2 per token
    agree = rng.binomial(tokens, np.clip(rng.normal(0.8, 0.05, windows), 0, 1)).astype(float)
    nll_base = rng.normal(3.0, 0.3, windows) * tokens
    nll_opt = nll_base + rng.normal(0.1, 0.05, windows) * tokens  # perplexity increase exp(0.1) - 1
    return WindowSums(nll_base, nll_opt, kl, agree, predicted)


def test_intervals_cover_the_true_value_about_as_often_as_stated():
    rng = np.random.default_rng(0)
    truth = {"kl_divergence": 0.2, "top1_agreement": 0.8, "perplexity_increase_pct": (math.exp(0.1) - 1) * 100}
    hits = {name: 0 for name in truth}
    trials = 200
    for trial in range(trials):
        intervals = bootstrap_intervals(synthetic(40, rng), samples=500, seed=trial)
        for name, value in truth.items():
            hits[name] += intervals[name][0] <= value <= intervals[name][1]
    coverage = {name: h / trials for name, h in hits.items()}
    print(f"coverage of 95% intervals over {trials} trials: {coverage}")
    assert all(0.88 <= c <= 0.99 for c in coverage.values()), coverage


def test_intervals_shrink_with_more_windows():
    rng = np.random.default_rng(1)
    width = {n: np.mean([np.diff(bootstrap_intervals(synthetic(n, rng), samples=500)["kl_divergence"])[0]
                         for _ in range(10)]) for n in (16, 256)}
    print(f"mean 95% interval width of KL: {width}")
    assert width[256] < 0.35 * width[16]  # about 1 / sqrt(16) = 0.25


def test_intervals_are_reproducible_and_contain_the_point_estimate():
    sums = synthetic(30, np.random.default_rng(2))
    point = {k: float(v[0]) for k, v in sums.metrics().items()}
    a, b = bootstrap_intervals(sums, seed=5), bootstrap_intervals(sums, seed=5)
    assert a == b
    for name, (low, high) in a.items():
        assert low <= point[name] <= high, (name, low, point[name], high)


def test_compare_quality_of_a_model_with_itself_is_exactly_no_change():
    class Fixed:
        runtime = "pytorch"

        def logits(self, ids):
            rng = np.random.default_rng(int(ids.sum()))
            return rng.normal(size=(len(ids), 50)).astype(np.float32)

    windows = [np.arange(i, i + 16) % 50 for i in range(8)]
    seen = []
    scores = compare_quality(Fixed(), Fixed(), windows, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 8) for i in range(9)]  # the step shows how far it is, window by window
    assert scores.kl_divergence == pytest.approx(0, abs=1e-9) and scores.top1_agreement == 1.0
    assert scores.perplexity == pytest.approx(scores.baseline_perplexity)
    assert scores.intervals["perplexity_increase_pct"] == pytest.approx((0.0, 0.0), abs=1e-9)
    assert scores.intervals["kl_divergence"] == pytest.approx((0.0, 0.0), abs=1e-9)


def test_layer_errors_are_zero_for_the_same_model_and_absent_when_layers_no_longer_line_up():
    from llmopt.evaluation.quality import hidden_states, relative_layer_errors
    from tests.conftest import tiny_llama

    windows = [np.arange(32, dtype=np.int64), np.arange(100, 132, dtype=np.int64)]
    model = tiny_llama()
    same = hidden_states(model, windows)
    assert relative_layer_errors(same, hidden_states(tiny_llama(), windows)) == [0.0, 0.0]
    deeper = hidden_states(tiny_llama(num_hidden_layers=3), windows)
    assert relative_layer_errors(same, deeper) is None
    noisy = [[h + 0.1 * np.abs(h).mean() for h in layers] for layers in same]
    errors = relative_layer_errors(same, noisy)
    assert all(0 < e < 0.1 for e in errors), errors
