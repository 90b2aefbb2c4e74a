"""`type: quantize` — weight-only quantization of linear layers (and optionally the token embedding)."""

from __future__ import annotations

import fnmatch
from dataclasses import replace
from typing import Literal

from pydantic import Field, field_validator

from llmopt.errors import RecipeError
from llmopt.model import ArchInfo
from llmopt.passes.base import Pass, PassConfig
from llmopt.quantized import QuantizedTensor
from llmopt.state import ModelState, PassContext


class QuantizeConfig(PassConfig):
    type: Literal["quantize"] = "quantize"
    method: Literal["rtn"] = Field("rtn", description="rtn: round-to-nearest, per group, no calibration data.")
    bits: Literal[4, 8] = Field(4, description="Bits per weight.")
    group_size: int = Field(32, description="Weights sharing one scale, along the input dimension (power of 2, >= 16).")
    symmetric: bool = Field(True, description="Symmetric (zero point fixed at mid-range) or asymmetric (min/max) groups.")
    exclude: list[str] = Field(
        default_factory=list, description="Module-name glob patterns to keep in float, e.g. ['lm_head', '*.down_proj']."
    )
    embeddings: bool = Field(False, description="Also quantize the token embedding table (ONNX: GatherBlockQuantized).")

    @field_validator("group_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        # MatMulNBits needs a power-of-two block of at least 16.
        if value < 16 or value & (value - 1):
            raise ValueError("must be a power of two of at least 16 (16, 32, 64, 128, 256)")
        return value


class QuantizePass(Pass):
    """Weight-only round-to-nearest (RTN) quantization, group-wise along the input dimension.

    Each group of `group_size` weights gets one float32 scale (and a zero point when asymmetric);
    codes are round(w / scale) (+ zero point), clamped to the `bits` range. The model keeps running
    in PyTorch with the dequantized weights; the integers are kept in the state for the exporters,
    which store them as they are (ONNX: MatMulNBits / GatherBlockQuantized).
    """

    type = "quantize"
    Config = QuantizeConfig
    config: QuantizeConfig

    def check(self, arch: ArchInfo, where: str) -> ArchInfo:
        g = self.config.group_size
        dims = {"hidden_size": arch.hidden_size, "intermediate_size": arch.intermediate_size,
                "num_heads*head_dim": arch.num_heads * arch.head_dim}
        bad = {name: dim for name, dim in dims.items() if dim % g}
        if bad:
            raise RecipeError(
                f"{where}.group_size: {g} does not divide the model's input widths "
                + ", ".join(f"{k}={v}" for k, v in bad.items()) + ".",
                "Choose a group_size that divides every input width (e.g. 32 or 64).",
            )
        return arch

    def targets(self, model) -> list[tuple[str, object]]:
        """(module name, module) of every Linear to quantize, plus the embedding when asked."""
        import torch

        embedding = model.get_input_embeddings()
        chosen = []
        for name, module in model.named_modules():
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.config.exclude):
                continue
            if isinstance(module, torch.nn.Linear) or (self.config.embeddings and module is embedding):
                chosen.append((name, module))
        return chosen

    def run(self, state: ModelState, ctx: PassContext) -> ModelState:
        import torch

        model = state.model
        targets = self.targets(model)
        self._untie_if_needed(model, {name for name, _ in targets})
        embedding = model.get_input_embeddings()
        done: dict[int, QuantizedTensor] = {}  # id(parameter) -> codes: a tied tensor is quantized once
        with torch.no_grad():
            for i, (name, module) in enumerate(targets):
                kind = "embedding" if module is embedding else "linear"
                shared = done.get(id(module.weight))
                if shared is not None:
                    # Re-quantizing dequantized values is not exact for asymmetric groups; reuse the codes.
                    qt = replace(shared, name=f"{name}.weight", kind=kind)
                else:
                    qt = quantize_rtn(module.weight.detach(), f"{name}.weight", kind, self.config)
                    module.weight.copy_(torch.from_numpy(qt.dequantized()))
                    done[id(module.weight)] = qt
                state.quantized[qt.name] = qt
                ctx.progress(i + 1, len(targets))
        state.pass_info["quantize"] = {
            "method": self.config.method,
            "bits": self.config.bits,
            "group_size": self.config.group_size,
            "symmetric": self.config.symmetric,
            "quantized_tensors": len(targets),
            "quantized_parameters": int(sum(m.weight.numel() for _, m in targets)),
        }
        return state

    @staticmethod
    def _untie_if_needed(model, names: set[str]) -> None:
        """Give lm_head its own weight when only one of the tied pair is quantized.

        Tied embedding and lm_head share one tensor with groups along `hidden` in both, so quantizing
        both keeps them tied; quantizing just one must not change the other.
        """
        import torch

        head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
        if head is None or head.weight is not embedding.weight:
            return
        modules = {id(m): n for n, m in model.named_modules()}
        if (modules[id(head)] in names) != (modules[id(embedding)] in names):
            head.weight = torch.nn.Parameter(head.weight.detach().clone())
            model.config.tie_word_embeddings = False


def quantize_rtn(weight, name: str, kind: str, config: QuantizeConfig) -> QuantizedTensor:
    """Round-to-nearest group quantization of a 2-D float tensor (rows, cols)."""
    import torch

    rows, cols = weight.shape
    g, bits = config.group_size, config.bits
    w = weight.float().reshape(rows, cols // g, g)  # (rows, groups, g)
    levels = 2**bits - 1
    if config.symmetric:
        mid = 2 ** (bits - 1)  # codes are q + mid with q in [-mid, mid - 1]
        scale = w.abs().amax(dim=-1) / (mid - 1)  # (rows, groups)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.clamp(torch.round(w / scale[..., None]), -mid, mid - 1) + mid
        zeros = torch.full_like(scale, mid)
    else:
        # The range always includes 0 so that exact zeros stay exact.
        lo = torch.clamp(w.amin(dim=-1), max=0.0)
        hi = torch.clamp(w.amax(dim=-1), min=0.0)
        scale = (hi - lo) / levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zeros = torch.clamp(torch.round(-lo / scale), 0, levels)
        codes = torch.clamp(torch.round(w / scale[..., None]) + zeros[..., None], 0, levels)
    return QuantizedTensor(
        name=name,
        kind=kind,  # type: ignore[arg-type]
        bits=bits,
        group_size=g,
        symmetric=config.symmetric,
        codes=codes.reshape(rows, cols).to(torch.uint8).numpy(),
        scales=scale.contiguous().numpy().astype("float32"),
        zero_points=zeros.to(torch.uint8).numpy(),
    )
