"""`type: qad` — quantization-aware distillation: train what the int4/int8 format keeps against the float model."""

from __future__ import annotations

import functools
import os
from dataclasses import replace
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import Field

from llmopt.errors import InputError, RecipeError
from llmopt.passes.base import PassConfig
from llmopt.passes.distill import DistillPass, TrainingConfig
from llmopt.quantized import QuantizedTensor
from llmopt.state import ModelState, PassContext


class QadConfig(TrainingConfig):
    type: Literal["qad"] = "qad"
    train: Literal["scales", "scales_and_codes"] = Field(
        "scales", description="scales: each group's scale, the integer codes kept as `quantize` chose them. "
                              "scales_and_codes: the codes too, each moved by a float offset rounded in the forward "
                              "pass (straight-through estimator), so a code may change to a neighbouring one.")
    lr: float = Field(2e-3, gt=0, description="Peak AdamW learning rate. The trained values are unitless: the log "
                                              "of each scale's factor over its starting value, and code offsets in "
                                              "steps of one code.")


class QadPass(DistillPass):
    """Quantization-aware distillation: after `quantize`, the model's quantized Linears are trained against the
    model before the pipeline's first pass, with the `distill` pass's loss, data, schedule, checkpoints and
    multi-process support — but what is trained is what the stored format keeps.

    Each group's scale s becomes s0 · exp(t) with t trained (initially 0, so training starts from exactly the
    quantized model); with `train: scales_and_codes` each code also gets a float offset d, and the weight is
    (clamp(round(c0 + d)) − z) · s, the rounding passed straight through in the backward pass (Bengio et al.
    2013; trained scales as in LSQ, Esser et al. 2020, and the end-to-end step of EfficientQAT, Chen et al.
    2024). Zero points stay as chosen (they are integers). At the end the new scales (and codes) replace the
    quantize pass's in the state, so every exporter stores them as they are: the same graph, same size.

    Every quantized tensor is trained, a quantized embedding table too; a tied embedding and lm_head keep one
    table with one set of scales, trained through both uses. The held-out split keeps the best step, and step 0
    is the quantized model itself: training never leaves the model worse on held-out text than `quantize` did.
    """

    type = "qad"
    Config = QadConfig
    config: QadConfig

    def check_order(self, earlier: Sequence[PassConfig], where: str) -> None:
        quantize = [c for c in earlier if c.type == "quantize"]
        if not quantize:
            raise RecipeError(f"{where}.type: 'qad' trains the scales a quantize pass chose, and no quantize pass "
                              "comes before it.", f"Add a `type: quantize` pass before {where}.")
        if quantize[-1].activations == "int8":
            raise RecipeError(f"{where}.type: 'qad' cannot follow W8A8 quantization (activations: int8): its "
                              "activations are rounded at run time, which passes no gradient to earlier layers.",
                              "Use qad after weight-only quantization (activations: float).")

    def run(self, state: ModelState, ctx: PassContext) -> ModelState:
        import torch
        from torch.nn.utils import parametrize

        from llmopt.passes.distill_trainer import Objective, train

        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
            raise InputError("qad runs on one process or under DDP, not under FSDP (sharding rebuilds the model "
                             "from its config, without the trained scales).",
                             "Launch without --use_fsdp, e.g. `accelerate launch --multi_gpu ...`.")
        c, model = self.config, state.model
        tensors = quantized_tensors(model, state.quantized)
        if not tensors:
            raise InputError("qad found no quantized weight in the model.", "Put a `type: quantize` pass before it.")
        windows = self._windows(ctx)
        teacher = self._teacher(ctx, model)
        layer_map = self._layer_map(model, teacher) if c.hidden_weight > 0 else {}
        trained = []
        for owners in tensors:  # one parametrization per tensor, in every module that holds it
            trained.append(_group_weight_class()(state.quantized[f"{owners[0][0]}.weight"], c.train == "scales_and_codes"))
            for _, module in owners:
                parametrize.register_parametrization(module, "weight", trained[-1])
        trainable = [n for n, _ in model.named_parameters() if ".parametrizations.weight.0." in n]
        flags = {name: p.requires_grad for name, p in model.named_parameters()}
        try:
            model, info = train(model, Objective(c, windows, teacher, layer_map), c, trainable, seed=ctx.seed,
                                progress=ctx.progress)
            changed = 0
            with torch.no_grad():
                for owners, groups in zip(tensors, trained):
                    codes, scales = groups.stored()
                    changed += int((codes != groups.qt.codes).sum())
                    for name, module in owners:  # a tied pair gets its one tensor back, still shared
                        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
                        key = f"{name}.weight"
                        state.quantized[key] = replace(state.quantized[key], codes=codes, scales=scales)
                    name, module = owners[0]
                    module.weight.copy_(torch.from_numpy(state.quantized[f"{name}.weight"].dequantized()))
        finally:
            for owners in tensors:  # on an error: the quantize pass's weights, untouched
                for _, module in owners:
                    if parametrize.is_parametrized(module, "weight"):
                        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            for name, p in model.named_parameters():
                p.requires_grad_(flags.get(name, False))
        info.update(trained=c.train, trained_tensors=len(tensors), codes_changed=changed,
                    teacher=c.teacher or "input model", loss=c.loss, windows=len(windows), seq_len=int(len(windows[0])))
        state.pass_info["qad"] = info
        return state


def quantized_tensors(model: Any, quantized: dict[str, QuantizedTensor]) -> list[list[tuple[str, Any]]]:
    """Each quantized weight tensor as the (name, module) pairs that hold it: one pair, or two for a tied
    embedding and lm_head (the quantize pass gives both names the same codes)."""
    holders: dict[int, list[tuple[str, Any]]] = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None:
            holders.setdefault(id(weight), []).append((name, module))
    return [owners for owners in holders.values() if all(f"{name}.weight" in quantized for name, _ in owners)]


@functools.cache
def _group_weight_class() -> type:
    """The parametrization class, defined on first use so that importing the pass registry does not load torch."""
    import torch

    class GroupQuantizedWeight(torch.nn.Module):
        """weight = (codes − zero) · s0 · exp(t), per group of the quantize pass's layout; with code offsets d,
        codes = clamp(round(c0 + d), 0, 2^bits − 1), the rounding straight-through."""

        def __init__(self, qt: QuantizedTensor, train_codes: bool) -> None:
            super().__init__()
            rows, cols = qt.shape
            self.qt = qt
            grouped = (rows, cols // qt.group_size, qt.group_size)
            self.register_buffer("codes", torch.from_numpy(qt.codes.astype("float32")).reshape(grouped),
                                 persistent=False)
            self.register_buffer("zeros", torch.from_numpy(qt.zero_points.astype("float32"))[..., None],
                                 persistent=False)
            self.register_buffer("scales", torch.from_numpy(qt.scales.copy())[..., None], persistent=False)
            self.log_scale = torch.nn.Parameter(torch.zeros(grouped[0], grouped[1], 1))
            self.code_offset = torch.nn.Parameter(torch.zeros(grouped)) if train_codes else None

        def quantized_codes(self) -> torch.Tensor:
            if self.code_offset is None:
                return self.codes
            moved = (self.codes + self.code_offset).clamp(0, 2**self.qt.bits - 1)
            return moved + (moved.round() - moved).detach()  # rounded forward, identity backward

        def forward(self, _original: torch.Tensor) -> torch.Tensor:
            weight = (self.quantized_codes() - self.zeros) * (self.scales * self.log_scale.exp())
            return weight.reshape(self.codes.shape[0], -1)

        def stored(self) -> tuple[np.ndarray, np.ndarray]:
            """The trained codes (uint8) and scales (float32) in the quantize pass's layout."""
            with torch.no_grad():
                codes = self.quantized_codes().round().to(torch.uint8).reshape(self.qt.shape).numpy()
                scales = (self.scales * self.log_scale.exp())[..., 0].numpy().astype("float32")
            return codes, scales

    return GroupQuantizedWeight
