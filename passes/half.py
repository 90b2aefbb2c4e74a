"""`type: half` — store the model in fp16 (ONNX, safetensors) or bf16 (safetensors), overflow-safe."""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Literal

from pydantic import Field

from llmopt.architectures import LAYERS
from llmopt.errors import InputError, RecipeError
from llmopt.passes.base import Pass, PassConfig
from llmopt.state import ModelState, PassContext


class HalfConfig(PassConfig):
    type: Literal["half"] = "half"
    dtype: Literal["float16", "bfloat16"] = Field(
        "float16", description="float16: ONNX (for GPUs; fp16 matmuls, attention and KV cache, fp32 norms and "
                               "residual stream) or safetensors. bfloat16: safetensors only (fp32's range, so "
                               "nothing overflows; onnxruntime runs few bf16 ops).")
    keep_fp32: list[str] = Field(
        default_factory=list, description="ONNX: module-name glob patterns kept in fp32 besides those chosen "
                                          "automatically (normalisations, softmax, and any module whose output "
                                          "exceeds half of fp16's range on calibration text).")


class HalfPass(Pass):
    """Half-precision storage and compute, with what would overflow fp16 kept in fp32.

    The torch model stays float32 (it is the reference the artifact is validated against); the pass
    measures, on calibration text, which modules' outputs leave fp16's range and records the plan, and
    the exporter follows it: the ONNX writer runs every matmul, attention and activation in fp16 except in those
    modules, and always keeps the normalisations, the residual stream and the logits in fp32; safetensors casts
    the weights. The export validation then checks the artifact's logits are finite and close to the float32
    model's.
    """

    type = "half"
    Config = HalfConfig
    config: HalfConfig
    needs_calibration = True

    def check_export(self, export_format: str, where: str) -> None:
        if self.config.dtype == "bfloat16" and export_format == "onnx":
            raise RecipeError(f"{where}.dtype: bfloat16 is for safetensors; onnxruntime runs few bf16 kernels.",
                              "Use dtype: float16 for ONNX, or export.format: safetensors.")
        if self.config.keep_fp32 and export_format != "onnx":
            raise RecipeError(f"{where}.keep_fp32 applies to ONNX only: a safetensors checkpoint loads in one dtype.",
                              "Remove keep_fp32, or use dtype: bfloat16, which has float32's range.")

    def run(self, state: ModelState, ctx: PassContext) -> ModelState:
        c = self.config
        model = state.model
        overflow = overflowing_modules(model, ctx.calibration_windows("half")) if c.dtype == "float16" else {}
        names = [name for name, _ in model.named_modules() if name]
        chosen = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in c.keep_fp32)}
        unmatched = [p for p in c.keep_fp32 if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            raise InputError(f"half: keep_fp32 pattern(s) {', '.join(map(repr, unmatched))} match no module.",
                             f"Module names look like {names[-1]!r}; `llmopt inspect MODEL` lists them.")
        # An overflowing output is consumed in the parent's scope (e.g. up_proj's by the mlp's Mul): keep the parent.
        # The embedding's and each decoder layer's outputs are the residual stream, which the ONNX graph keeps in
        # fp32 anyway: keep the table itself (its values overflow), and nothing for a layer. A module inside a kept
        # one is kept with it: list the outermost only.
        parents = {n if n == "model.embed_tokens" else _parent(model, n) for n in overflow
                   if not _DECODER_LAYER.fullmatch(n)}
        keep = sorted(set(normalization_modules(model)) | parents | chosen)
        keep = [n for n in keep if not any(n.startswith(k + ".") for k in keep)]
        state.precision = {"dtype": c.dtype, "keep_fp32": keep}
        state.pass_info["half"] = {
            "dtype": c.dtype,
            "overflow_threshold": FP16_MAX * OVERFLOW_MARGIN if c.dtype == "float16" else None,
            "overflowing_modules": {n: round(v, 1) for n, v in sorted(overflow.items())},
            "fp32_modules": len(keep),
        }
        if overflow and c.dtype == "float16":
            state.pass_info["half"]["note"] = (f"{len(overflow)} module(s) exceed fp16's safe range on calibration "
                                               "text and stay fp32 in ONNX; a safetensors export refuses float16.")
        return state


FP16_MAX = 65504.0
OVERFLOW_MARGIN = 0.5  # an activation above half the range on calibration text may exceed it on other text
_DECODER_LAYER = re.compile(re.escape(LAYERS) + r"\.\d+")


def overflowing_modules(model: Any, windows: list[Any]) -> dict[str, float]:
    """Module name -> max |output| over `windows` for the modules whose outputs leave fp16's safe range
    (forward hooks on the float32 model)."""
    import torch

    peaks: dict[str, float] = {}

    def hook(name: str):
        def record(module, args, output) -> None:
            tensors = [output] if torch.is_tensor(output) else [o for o in (output if isinstance(output, tuple)
                                                                                else ()) if torch.is_tensor(o)]
            for t in tensors:
                if t.is_floating_point() and t.numel():
                    peaks[name] = max(peaks.get(name, 0.0), float(t.detach().abs().max()))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules() if name]
    try:
        with torch.no_grad():
            for ids in windows:
                model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {name: peak for name, peak in peaks.items() if peak > FP16_MAX * OVERFLOW_MARGIN}


def normalization_modules(model: Any) -> list[str]:
    return [name for name, m in model.named_modules() if name and "norm" in type(m).__name__.lower()]


def _parent(model, name: str) -> str:
    """The module that consumes `name`'s output: its parent, past ModuleLists (model.layers.3 -> model)."""
    import torch

    parts = name.split(".")[:-1]
    while parts and isinstance(model.get_submodule(".".join(parts)), torch.nn.ModuleList):
        parts = parts[:-1]
    return ".".join(parts) or name
