"""AWQ-style activation-aware scaling for `type: quantize` (`awq: true`), before RTN, GPTQ or SignRound.

Model-running code, imported by QuantizePass.run only (torch at module scope is fine here).

Lin et al. 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration": input
channels that carry large activations matter most, and scaling a weight's input channel up by s (and the
activation down by 1/s) shrinks its relative rounding error. Per group of Linears that read the same input,
s = mean|x|^alpha, with alpha chosen on calibration activations by a grid search that minimises the output
error of the quantized Linears; 1/s is folded into the op that produces the input (an RMSNorm's weight, or the
rows of up_proj for down_proj), so the float model computes exactly the same function before quantization.
Written here because the AWQ packages (autoawq, llm-compressor) bring their own model wrappers and kernels.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from llmopt.architectures import LAYERS, Architecture
from llmopt.passes.layerwise import input_groups, layout, measured_layers

GRID = 20  # alpha in 0, 1/20, ..., 19/20 (the reference implementation's grid)
MAX_ROWS = 1024  # calibration tokens used to score a scale: enough to rank 20 candidates, cheap to multiply


def _fold_into_previous(prev: nn.Module, s: torch.Tensor, norm: str) -> None:
    """Divide prev's output channel c by s[c]: a Linear's rows (and bias), or a norm's weight (and bias) in the
    family's flavour (`norm`, from llmopt.architectures)."""
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            prev.weight.div_(s[:, None])
            if prev.bias is not None:
                prev.bias.div_(s)
        elif norm == "rms_one_plus":  # Gemma's RMSNorm multiplies by (1 + weight)
            prev.weight.copy_((1 + prev.weight) / s - 1)
        else:
            prev.weight.div_(s)
            if getattr(prev, "bias", None) is not None:
                prev.bias.div_(s)


def search_scale(x: torch.Tensor, weights: list[torch.Tensor], fake_quantize: Callable[[torch.Tensor], torch.Tensor]
                 ) -> tuple[torch.Tensor, float, float, float]:
    """The per-input-channel scale s (in,) that minimises sum ||x W^T - x (Q(W s) / s)^T||^2 over `weights`.

    x: (N, in) calibration inputs. Returns s, the chosen alpha, the error at alpha = 0 (plain quantization)
    and the error at the chosen alpha.
    """
    mean_abs = x.abs().mean(0).clamp_min(1e-8)  # (in,)
    reference = [x @ w.T for w in weights]  # (N, out) each
    best = (None, 0.0, float("inf"))
    plain = None
    for step in range(GRID):
        alpha = step / GRID
        s = mean_abs.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 (keeps the weights' range moderate)
        error = sum(float(((x @ (fake_quantize(w * s) / s).T - ref) ** 2).sum()) for w, ref in zip(weights, reference))
        if step == 0:
            plain = error
        if error < best[2]:
            best = (s, alpha, error)
    return best[0], best[1], plain, best[2]


class AwqInputs:
    """Up to MAX_ROWS input rows of a Linear, gathered by a hook while the layer runs."""

    def __init__(self, module: nn.Linear, seed: int) -> None:
        self.rows: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().float().reshape(-1, module.weight.shape[-1])  # (T, in)
        self.rows.append(x[torch.randperm(len(x), generator=self.generator)[:MAX_ROWS]])

    def sample(self) -> torch.Tensor:
        x = torch.cat(self.rows)
        return x[torch.randperm(len(x), generator=self.generator)[:MAX_ROWS]]


def scale_groups(model: Any, batches: list[Any], chosen: set[str], make_probe: Callable[[nn.Linear, int], Any],
                 search: Callable[[Any, list[torch.Tensor]], tuple], progress: Callable[[int, int], None],
                 seed: int = 0) -> ScaleTotals:
    """Layer by layer, for every group whose Linears are all in `chosen`: probe the group's input, let `search`
    choose per-input-channel scales s, fold 1/s into the op before and s into the Linears (the float model is
    unchanged). Shared by AWQ and SmoothQuant, which differ in what they probe and how they choose s.

    `search(probe, weights)` returns (s, alpha, error without scaling, error with s). Returns the alphas per
    layer and the summed errors with and without scaling.
    """
    totals = ScaleTotals()
    arch = layout(model)
    attach = lambda i, layer: group_probes(i, layer, arch, chosen, make_probe, seed)  # noqa: E731
    for _, layer, probes in measured_layers(model, batches, attach, progress):
        totals.add(*scale_layer(layer, arch, probes, search))
    return totals


def group_probes(i: int, layer: nn.Module, arch: Architecture, chosen: Container[str],
                 make_probe: Callable[[nn.Linear, int], Any], seed: int = 0) -> dict[str, Any]:
    """A probe on the input of every group of decoder layer i whose Linears are all in `chosen` (a group with a
    reader left out cannot be scaled: that reader would see the folded scale)."""
    return {name: make_probe(layer.get_submodule(names[0]), seed + i) for name, _, names in input_groups(layer, arch)
            if all(f"{LAYERS}.{i}.{n}" in chosen for n in names)}


def scale_layer(layer: nn.Module, arch: Architecture, probes: dict[str, Any],
                search: Callable[[Any, list[torch.Tensor]], tuple]) -> tuple[list[float], float, float]:
    """Choose and fold the scales of one layer's probed groups; returns their alphas and the summed output
    errors without and with scaling."""
    alphas, plain_total, scaled_total = [], 0.0, 0.0
    for name, prev, names in (g for g in input_groups(layer, arch) if g[0] in probes):
        linears = [layer.get_submodule(n) for n in names]
        s, alpha, plain, scaled = search(probes[name], [m.weight.detach().float() for m in linears])
        if alpha:  # alpha 0 is s = 1: nothing to fold
            _fold_into_previous(prev, s, arch.norm)
            with torch.no_grad():
                for m in linears:
                    m.weight.mul_(s[None, :])
        alphas.append(round(alpha, 2))
        plain_total, scaled_total = plain_total + plain, scaled_total + scaled
    return alphas, plain_total, scaled_total


@dataclass
class ScaleTotals:
    """What scale_layer returned for each layer so far, summed for the report."""

    alphas: list[list[float]] = field(default_factory=list)
    plain: float = 0.0
    scaled: float = 0.0

    def add(self, alphas: list[float], plain: float, scaled: float) -> None:
        self.alphas.append(alphas)
        self.plain, self.scaled = self.plain + plain, self.scaled + scaled

    def ratio(self) -> float | None:
        return round(self.scaled / self.plain, 4) if self.plain else None

    def awq_info(self) -> dict[str, Any]:
        return {"awq_alpha_per_layer": self.alphas, "awq_output_error_ratio": self.ratio()}


def awq_search(fake_quantize: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Any, list[torch.Tensor]], tuple]:
    """AWQ's choice of scales for scale_layer, from the inputs its probes (AwqInputs) gathered."""
    return lambda probe, weights: search_scale(probe.sample(), weights, fake_quantize)


def apply_awq(model: Any, batches: list[Any], chosen: set[str], fake_quantize: Callable[[torch.Tensor], torch.Tensor],
              progress: Callable[[int, int], None], seed: int = 0) -> dict[str, Any]:
    """Scale every group whose Linears are all in `chosen`, layer by layer; returns what the report records."""
    return scale_groups(model, batches, chosen, AwqInputs, awq_search(fake_quantize), progress, seed).awq_info()
