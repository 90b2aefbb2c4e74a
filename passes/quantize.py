"""`type: quantize` — weight-only quantization of linear layers (and optionally the token embedding)."""

from __future__ import annotations

import fnmatch
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator

from llmopt.errors import RecipeError
from llmopt.model import ArchInfo
from llmopt.passes.base import Pass, PassConfig
from llmopt.quantized import QuantizedTensor
from llmopt.state import ModelState, PassContext

if TYPE_CHECKING:
    import torch


class QuantizeConfig(PassConfig):
    type: Literal["quantize"] = "quantize"
    method: Literal["rtn", "gptq"] = Field(
        "rtn", description="rtn: round-to-nearest, per group, no calibration data. gptq: GPTQ (Frantar et al. 2022), "
                           "rounding errors compensated through each layer's input Hessian on calibration text; the "
                           "embedding and lm_head, which GPTQ does not cover here, use RTN.")
    bits: Literal[4, 8] = Field(4, description="Bits per weight.")
    group_size: int = Field(32, description="Weights sharing one scale, along the input dimension (power of 2, >= 16).")
    symmetric: bool = Field(True, description="Symmetric (zero point fixed at mid-range) or asymmetric (min/max) groups.")
    exclude: list[str] = Field(
        default_factory=list, description="Module-name glob patterns to keep in float, e.g. ['lm_head', '*.down_proj']."
    )
    embeddings: bool = Field(False, description="Also quantize the token embedding table (ONNX: GatherBlockQuantized).")
    awq: bool = Field(False, description="AWQ-style activation-aware scaling first (Lin et al. 2024): per input "
                                         "channel, scales chosen on calibration activations and folded into the "
                                         "preceding RMSNorm / up_proj; then rtn or gptq quantizes.")
    act_order: bool = Field(False, description="gptq: quantize columns in order of decreasing input energy (groups "
                                               "keep their RTN range, so they stay contiguous for MatMulNBits).")
    damp: float = Field(0.01, gt=0, le=1, description="gptq: damping added to the Hessian diagonal, as a fraction of "
                                                      "its mean; raised 10x (at most 3 times) when a Hessian is not "
                                                      "positive definite.")

    @model_validator(mode="after")
    def _gptq_options(self) -> "QuantizeConfig":
        for name in ("act_order", "damp"):
            if name in self.model_fields_set and self.method != "gptq":
                raise ValueError(f"{name} applies to method: gptq only (method is '{self.method}')")
        return self

    @field_validator("group_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        # MatMulNBits needs a power-of-two block of at least 16.
        if value < 16 or value & (value - 1):
            raise ValueError("must be a power of two of at least 16 (16, 32, 64, 128, 256)")
        return value


class QuantizePass(Pass):
    """Weight-only quantization, group-wise along the input dimension: round-to-nearest or GPTQ.

    Each group of `group_size` weights gets one float32 scale (and a zero point when asymmetric);
    codes are round(w / scale) (+ zero point), clamped to the `bits` range. The model keeps running
    in PyTorch with the dequantized weights; the integers are kept in the state for the exporters,
    which store them as they are (ONNX: MatMulNBits / GatherBlockQuantized).

    `gptq` (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
    Transformers") quantizes the Linears of the decoder layers one layer at a time: the layer's input
    Hessian H = E[x x^T] is measured on calibration text as the already-quantized earlier layers
    produce it, then each column's rounding error is spread over the columns not yet quantized
    through the Cholesky factor of H^-1. Same storage format as RTN; only the codes differ.
    """

    type = "quantize"
    Config = QuantizeConfig
    config: QuantizeConfig

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.config.method == "gptq" or self.config.awq

    def check(self, arch: ArchInfo, where: str) -> ArchInfo:
        g = self.config.group_size
        bad = {name: dim for name, dim in input_widths(arch).items() if dim % g}
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
        info: dict = {}
        if self.config.awq:
            info.update(self._run_awq(state, ctx, {name for name, m in targets if isinstance(m, torch.nn.Linear)}))
        rest = targets
        if self.config.method == "gptq":
            in_layers = {name: m for name, m in targets
                         if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")}
            info = self._run_gptq(state, ctx, in_layers)
            rest = [(name, m) for name, m in targets if name not in in_layers]  # embedding, lm_head: RTN
        embedding = model.get_input_embeddings()
        done: dict[int, QuantizedTensor] = {}  # id(parameter) -> codes: a tied tensor is quantized once
        with torch.no_grad():
            for i, (name, module) in enumerate(rest):
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
                ctx.progress(i + 1, len(rest))
        state.pass_info["quantize"] = {
            "method": self.config.method,
            "bits": self.config.bits,
            "group_size": self.config.group_size,
            "symmetric": self.config.symmetric,
            "quantized_tensors": len(targets),
            "quantized_parameters": int(sum(m.weight.numel() for _, m in targets)),
            **info,
        }
        return state

    def _run_awq(self, state: ModelState, ctx: PassContext, linears: set[str]) -> dict:
        """Activation-aware scales folded into the model (its float function unchanged), before quantizing."""
        import torch

        from llmopt.passes.quantize_awq import apply_awq


        def fake_quantize(w: "torch.Tensor") -> "torch.Tensor":
            return torch.from_numpy(quantize_rtn(w, "w", "linear", self.config).dequantized())

        return apply_awq(state.model, ctx.calibration_windows("quantize with awq"), linears, fake_quantize,
                         ctx.progress, seed=ctx.seed)

    def _run_gptq(self, state: ModelState, ctx: PassContext, linears: dict) -> dict:
        """GPTQ on the decoder layers' Linears, recording each one's codes in the state."""
        import torch

        from llmopt.passes.quantize_gptq import gptq, gptq_decoder_layers

        c = self.config
        windows = ctx.calibration_windows("quantize with method 'gptq'")

        def quantize_one(name: str, module, hessian) -> float:
            r = gptq(module.weight, hessian, bits=c.bits, group_size=c.group_size, symmetric=c.symmetric,
                     act_order=c.act_order, damp=c.damp, name=name)
            qt = QuantizedTensor(name=f"{name}.weight", kind="linear", bits=c.bits, group_size=c.group_size,
                                 symmetric=c.symmetric, codes=r["codes"].numpy(),
                                 scales=r["scales"].numpy().astype("float32"), zero_points=r["zero_points"].numpy())
            with torch.no_grad():
                module.weight.copy_(torch.from_numpy(qt.dequantized()))
            state.quantized[qt.name] = qt
            return r["damp"]

        damping = gptq_decoder_layers(state.model, windows, linears, quantize_one, ctx.progress)
        retried = sorted(name for name, d in damping.items() if d > c.damp)
        return {"gptq_layers": len(damping), "calibration_tokens": int(sum(len(w) for w in windows)),
                "act_order": c.act_order, "damp": c.damp, "damp_raised_for": retried}

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


def input_widths(arch: ArchInfo) -> dict[str, int]:
    """The input widths of the Linears a quantization group runs along: a group size must divide each."""
    return {"hidden_size": arch.hidden_size, "intermediate_size": arch.intermediate_size,
            "num_heads*head_dim": arch.num_heads * arch.head_dim}


def group_params(w: "torch.Tensor", bits: int, symmetric: bool) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Scale and zero point of each row of `w` (..., g) so that codes = clamp(round(w / s) + z, 0, 2^bits - 1).

    Symmetric groups use the largest |w| with z = 2^(bits-1); asymmetric ones the min/max range, which
    always includes 0 so that exact zeros stay exact.
    """
    import torch

    levels = 2**bits - 1
    if symmetric:
        mid = 2 ** (bits - 1)
        scale = w.abs().amax(dim=-1) / (mid - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.full_like(scale, mid)
    lo = torch.clamp(w.amin(dim=-1), max=0.0)
    hi = torch.clamp(w.amax(dim=-1), min=0.0)
    scale = (hi - lo) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.clamp(torch.round(-lo / scale), 0, levels)


def quantize_rtn(weight, name: str, kind: str, config: QuantizeConfig) -> QuantizedTensor:
    """Round-to-nearest group quantization of a 2-D float tensor (rows, cols)."""
    import torch

    rows, cols = weight.shape
    g, bits = config.group_size, config.bits
    w = weight.float().reshape(rows, cols // g, g)  # (rows, groups, g)
    scale, zeros = group_params(w, bits, config.symmetric)  # (rows, groups)
    codes = torch.clamp(torch.round(w / scale[..., None]) + zeros[..., None], 0, 2**bits - 1)
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
