"""SmoothQuant scaling for W8A8 (`type: quantize`, `activations: int8`, `smoothquant: true`).

Model-running code, imported by QuantizePass.run only (torch at module scope is fine here).

Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models":
a few input channels of a Linear carry activations 10-100x larger than the rest, so one activation scale per
tensor wastes most of the 8-bit range on them. Dividing channel j of the input by s_j and multiplying the
weight's column j by s_j leaves the float product unchanged and moves the range into the weights, which are
quantized per output channel and absorb it easily. s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); alpha is
chosen per group of Linears that read one input by a grid search minimising the output error of the
quantized product (weights and activations both quantized as the runtime does), which the paper sets by
hand. 1/s is folded into the op that produces the input, as for AWQ (`scale_groups`: same groups, same folding).
Written here because the SmoothQuant implementations (smoothquant, llm-compressor) bring their own model
wrappers and target other kernels.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from llmopt.passes.quantize_awq import AwqInputs, scale_groups
from llmopt.quantized import dynamic_uint8

ALPHAS = [i / 10 for i in range(10)]  # 0 = no smoothing
SCORED_OUTPUTS = 256  # output channels per weight used to score a candidate: the error is a sum over them


class _InputRange(AwqInputs):
    """A sample of the Linear's input rows (for the error) and the max |x| of each channel over all rows."""

    def __init__(self, module: torch.nn.Linear, seed: int) -> None:
        super().__init__(module, seed)
        self.channel_max = torch.zeros(module.weight.shape[-1])

    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        super()._hook(module, args)
        x = args[0].detach().float().reshape(-1, module.weight.shape[-1])
        self.channel_max = torch.maximum(self.channel_max, x.abs().amax(0))


def search_smoothing(x: torch.Tensor, channel_max: torch.Tensor, weights: list[torch.Tensor],
                     quantize_weight: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, float, float, float]:
    """The per-input-channel scale s (in,) minimising sum ||x W^T - A(x / s) Q(W s)^T||^2 over `weights`.

    x: (N, in) calibration rows, quantized per tensor as one prefill call would be. Returns s, alpha, the error
    without smoothing and the error with the chosen s.
    """
    weight_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0).clamp_min(1e-8)  # (in,)
    act_max = channel_max.clamp_min(1e-8)
    # Scoring on a fixed sample of output channels ranks the candidates as the full sum does, several times faster.
    generator = torch.Generator().manual_seed(0)
    weights = [w[torch.randperm(len(w), generator=generator)[:SCORED_OUTPUTS]] for w in weights]
    reference = [x @ w.T for w in weights]
    best: tuple[torch.Tensor, float, float] = (torch.ones_like(act_max), 0.0, float("inf"))
    plain = float("inf")
    for alpha in ALPHAS:
        s = (act_max.pow(alpha) / weight_max.pow(1 - alpha)).clamp_min(1e-5) if alpha else torch.ones_like(act_max)
        xq = dynamic_uint8(x / s)
        error = sum(float(((xq @ quantize_weight(w * s).T - ref) ** 2).sum()) for w, ref in zip(weights, reference))
        if alpha == 0:
            plain = error
        if error < best[2]:
            best = (s, alpha, error)
    return best[0], best[1], plain, best[2]


def apply_smoothquant(model: Any, batches: list[Any], chosen: set[str],
                      quantize_weight: Callable[[torch.Tensor], torch.Tensor],
                      progress: Callable[[int, int], None], seed: int = 0) -> dict[str, Any]:
    """Smooth every group whose Linears are all in `chosen`, layer by layer; returns what the report records."""
    totals = scale_groups(
        model, batches, chosen, _InputRange,
        lambda probe, weights: search_smoothing(probe.sample(), probe.channel_max, weights, quantize_weight),
        progress, seed)
    return {"smoothquant_alpha_per_layer": totals.alphas, "smoothquant_output_error_ratio": totals.ratio()}
