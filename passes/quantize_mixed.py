"""Mixed precision for `type: quantize` (`target_bits_per_weight`): which Linears get 8 bits instead of 4.

Model-running code, imported by QuantizePass.run only (torch at module scope is fine here).

Sensitivity is measured where it matters, at the model's output: for each Linear alone, the mean
KL(float || model with only that Linear quantized) over a few calibration windows. Layers interact, but
ranking them one at a time is what HAWQ-style and llama.cpp's importance-based mixes do too, and it costs
one forward pass per Linear. The budget is then spent greedily on the Linears that remove the most KL per
stored bit (a knapsack's classic greedy; 8-bit error is taken as zero, which is within noise at int8).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

SENSITIVITY_WINDOWS = 2  # of the calibration windows: enough to rank layers, one forward each per Linear


def _log_probs(model: Any, windows: list[Any]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [F.log_softmax(model(input_ids=torch.as_tensor(w, dtype=torch.long)[None], use_cache=False)
                              .logits[0].float(), -1) for w in windows]


def layer_sensitivity(model: Any, windows: list[Any], linears: list[tuple[str, torch.nn.Linear]],
                      fake_quantize: Callable[[torch.Tensor], torch.Tensor],
                      progress: Callable[[int, int], None]) -> dict[str, float]:
    """Linear name -> mean per-token KL(float || that Linear alone quantized) on the first windows."""
    windows = windows[:SENSITIVITY_WINDOWS]
    reference = _log_probs(model, windows)
    kl: dict[str, float] = {}
    for i, (name, module) in enumerate(linears):
        original = module.weight.detach().clone()
        with torch.no_grad():
            module.weight.copy_(fake_quantize(original))
        try:
            quantized = _log_probs(model, windows)
        finally:
            with torch.no_grad():
                module.weight.copy_(original)
        kl[name] = float(sum(F.kl_div(q, p, log_target=True, reduction="sum") / len(p)
                             for p, q in zip(reference, quantized)) / len(windows))
        progress(i + 1, len(linears))
    return kl


def choose_bits(kl: dict[str, float], sizes: dict[str, int], low: float, high: float, target: float) -> set[str]:
    """The Linears to raise from `low` to `high` bits per weight so that the average stays <= target.

    Greedy by KL removed per extra bit stored; a layer that does not fit is skipped and smaller ones tried.
    """
    total = sum(sizes.values())
    budget = (target - low) * total  # extra bits the target allows over all-low
    raised: set[str] = set()
    for name in sorted(kl, key=lambda n: kl[n] / sizes[n], reverse=True):
        cost = (high - low) * sizes[name]
        if cost <= budget + 1e-9 * total:
            raised.add(name)
            budget -= cost
    return raised
