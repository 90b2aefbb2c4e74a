"""`type: quantize` — weight-only quantization of linear layers (and optionally the token embedding)."""

from __future__ import annotations

import fnmatch
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator

from llmopt.architectures import LAYERS, require
from llmopt.errors import RecipeError
from llmopt.model import ArchInfo
from llmopt.passes.base import Pass, PassConfig
from llmopt.quantized import QuantizedTensor
from llmopt.state import ModelState, PassContext

if TYPE_CHECKING:
    import torch


class QuantizeConfig(PassConfig):
    type: Literal["quantize"] = "quantize"
    method: Literal["rtn", "gptq", "signround"] = Field(
        "rtn", description="rtn: round-to-nearest, per group, no calibration data. gptq: GPTQ (Frantar et al. 2022), "
                           "rounding errors compensated through each layer's input Hessian on calibration text. "
                           "signround: SignRound (Cheng et al. 2023, Intel AutoRound's algorithm), each layer's "
                           "rounding and group clipping tuned by signed gradient descent on its output on "
                           "calibration text. gptq covers the decoder layers, signround the decoder layers and "
                           "lm_head (on the float model's next-token distribution; a tied embedding shares its codes); "
                           "the rest use RTN.")
    bits: Literal[4, 8] = Field(4, description="Bits per weight.")
    group_size: int = Field(32, description="Weights sharing one scale, along the input dimension (power of 2, >= 16).")
    symmetric: bool = Field(True, description="Symmetric (zero point fixed at mid-range) or asymmetric (min/max) groups.")
    exclude: list[str] = Field(
        default_factory=list, description="Module-name glob patterns to keep in float, e.g. ['lm_head', '*.down_proj']."
    )
    embeddings: bool = Field(False, description="Also quantize the token embedding table (ONNX: GatherBlockQuantized).")
    awq: bool = Field(False, description="AWQ-style activation-aware scaling first (Lin et al. 2024): per input "
                                         "channel, scales chosen on calibration activations and folded into the "
                                         "preceding RMSNorm / up_proj; then the method quantizes.")
    act_order: bool = Field(False, description="gptq: quantize columns in order of decreasing input energy (groups "
                                               "keep their RTN range, so they stay contiguous for MatMulNBits).")
    damp: float = Field(0.01, gt=0, le=1, description="gptq: damping added to the Hessian diagonal, as a fraction of "
                                                      "its mean; raised 10x (at most 3 times) when a Hessian is not "
                                                      "positive definite.")
    iters: int = Field(200, ge=1, description="signround: tuning steps per decoder layer (AutoRound's default; "
                                              "1000 is its stronger setting).")
    lr: float | None = Field(None, gt=0, description="signround: step size of the rounding offsets and clipping "
                                                    "factors, falling linearly to 0; default 1 / iters.")
    batch_size: int = Field(8, ge=1, description="signround: calibration windows per tuning step.")
    activations: Literal["float", "int8"] = Field(
        "float", description="int8: W8A8 for the ONNX path, run by onnxruntime's integer kernels "
                             "(DynamicQuantizeMatMul): each Linear's input is quantized to uint8 at run time with one "
                             "scale per call (dynamic, per tensor: per token while decoding), weights are int8 with "
                             "one scale per output channel. Needs bits: 8; group_size does not apply.")
    smoothquant: bool = Field(False, description="activations int8: SmoothQuant (Xiao et al. 2023) first: activation "
                                                 "outlier channels scaled down and the weights up by the same factor, "
                                                 "folded into the preceding RMSNorm / up_proj, migration strength "
                                                 "searched per layer on calibration activations.")
    target_bits_per_weight: float | None = Field(
        None, gt=0, description="Mixed precision: each Linear gets `bits` or 8 bits, chosen by measured sensitivity "
                                "(output KL on calibration text with only that layer quantized) so that the Linears "
                                "average at most this many bits per weight, scales and zero points included "
                                "(int4 g32 symmetric = 5.0, int8 g32 = 9.0). The report lists each layer's bits.")

    @model_validator(mode="after")
    def _options_that_go_together(self) -> "QuantizeConfig":
        for name, method in (("act_order", "gptq"), ("damp", "gptq"), ("iters", "signround"), ("lr", "signround"),
                             ("batch_size", "signround")):
            if name in self.model_fields_set and self.method != method:
                raise ValueError(f"{name} applies to method: {method} only (method is '{self.method}')")
        if self.activations == "int8":
            if self.method == "signround":
                raise ValueError("signround tunes weight-only quantization; with activations: int8 use rtn")
            if self.bits != 8:
                raise ValueError("activations: int8 needs bits: 8 (onnxruntime's integer matmul is 8-bit)")
            if "group_size" in self.model_fields_set:
                raise ValueError("activations: int8 uses one weight scale per output channel; remove group_size")
            if self.awq:
                raise ValueError("awq is weight-only scaling; with activations: int8 use smoothquant: true instead")
            if self.target_bits_per_weight is not None:
                raise ValueError("target_bits_per_weight (mixed int4/int8) is for weight-only quantization")
        elif self.smoothquant:
            raise ValueError("smoothquant applies to activations: int8 only")
        if self.target_bits_per_weight is not None:
            low, high = self.bits_per_weight(self.bits), self.bits_per_weight(8)
            if self.bits == 8:
                raise ValueError("target_bits_per_weight mixes `bits` with 8 bits: set bits: 4")
            if not low <= self.target_bits_per_weight <= high:
                raise ValueError(f"target_bits_per_weight must lie between {low:g} (all {self.bits}-bit) and "
                                 f"{high:g} (all 8-bit) for group_size {self.group_size}")
        return self

    def bits_per_weight(self, bits: int) -> float:
        """Storage per weight at `bits`: the code, plus a float32 scale (and a zero point) shared by a group."""
        return bits + (32 + (0 if self.symmetric else bits)) / self.group_size

    @field_validator("group_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        # MatMulNBits needs a power-of-two block of at least 16.
        if value < 16 or value & (value - 1):
            raise ValueError("must be a power of two of at least 16 (16, 32, 64, 128, 256)")
        return value


class QuantizePass(Pass):
    """Weight-only quantization, group-wise along the input dimension: round-to-nearest, GPTQ or SignRound, with
    AWQ scales and mixed int4/int8 precision; or int8 weights and activations (W8A8) with SmoothQuant.

    Each group of `group_size` weights gets one float32 scale (and a zero point when asymmetric);
    codes are round(w / scale) (+ zero point), clamped to the `bits` range. The model keeps running
    in PyTorch with the dequantized weights; the integers are kept in the state for the exporters,
    which store them as they are (ONNX: MatMulNBits / GatherBlockQuantized).

    `gptq` (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
    Transformers") quantizes the Linears of the decoder layers one layer at a time: the layer's input
    Hessian H = E[x x^T] is measured on calibration text as the already-quantized earlier layers
    produce it, then each column's rounding error is spread over the columns not yet quantized
    through the Cholesky factor of H^-1. `signround` (Cheng et al. 2023, the algorithm of Intel's AutoRound)
    also goes layer by layer: each weight's rounding offset and each group's clipping of its range are tuned by
    signed gradient descent so that the quantized layer, on the quantized earlier layers' outputs, gives the float
    model's output of that layer (it also corrects what the earlier layers' rounding moved), and lm_head last,
    towards the float model's next-token distribution.
    Same storage format as RTN; only the codes (and, for signround, the scales) differ.
    """

    type = "quantize"
    Config = QuantizeConfig
    config: QuantizeConfig

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        c = self.config
        return c.method in ("gptq", "signround") or c.awq or c.smoothquant or c.target_bits_per_weight is not None

    def check_export(self, export_format: str, where: str) -> None:
        if self.config.activations == "int8" and export_format != "onnx":
            raise RecipeError(f"{where}.activations: int8 (W8A8) is realised by onnxruntime's integer kernels and "
                              f"needs export.format: onnx (got {export_format}).",
                              "Use `export: {format: onnx}`, or weight-only quantization (drop `activations`).")

    def check(self, arch: ArchInfo, where: str) -> ArchInfo:
        # Which modules are the projections (Linear, not GPT-2's Conv1D), and for AWQ/SmoothQuant/GPTQ which op
        # feeds which of them: a family without a description would be quantized partly, or wrongly.
        require(arch.model_type, "the quantize pass", where)
        if self.config.activations == "int8" and not self.config.embeddings:
            return arch  # one scale per output channel: any width
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

        c = self.config
        model = state.model
        targets = self.targets(model)
        self._untie_if_needed(model, {name for name, _ in targets})
        linears = {name for name, m in targets if isinstance(m, torch.nn.Linear)}
        info: dict = {}
        if c.awq or c.smoothquant:
            probe = torch.as_tensor(ctx.calibration_windows("quantize with awq or smoothquant")[0])[None]  # (1, T)
            with torch.no_grad():
                before = model(input_ids=probe).logits
            if c.awq:
                info.update(self._run_awq(state, ctx, linears))
            if c.smoothquant:
                info.update(self._run_smoothquant(state, ctx, linears))
            _check_folds_kept_the_function(model, probe, before, "awq" if c.awq else "smoothquant")
        bits: dict[str, int] = {}  # Linear name -> bits, when they differ per layer
        if c.target_bits_per_weight is not None:
            bits, mixed = self._choose_bits(state, ctx, [(n, m) for n, m in targets if n in linears])
            info.update(mixed)
        rest, tuned = targets, {}
        if c.method in ("gptq", "signround"):
            # GPTQ: the decoder layers' Linears; SignRound: lm_head too. The rest (embedding, lm_head) take RTN.
            head = model.get_output_embeddings() if c.method == "signround" else None
            tuned = {name: m for name, m in targets
                     if name in linears and (name.startswith(f"{LAYERS}.") or m is head)}
            run = self._run_gptq if c.method == "gptq" else self._run_signround
            info.update(run(state, ctx, tuned, bits))
            rest = [(name, m) for name, m in targets if name not in tuned]
        embedding = model.get_input_embeddings()
        # id(parameter) -> codes: a tied tensor is quantized once (a tied embedding takes lm_head's tuned codes)
        done: dict[int, QuantizedTensor] = {id(m.weight): state.quantized[f"{name}.weight"]
                                            for name, m in tuned.items()}
        with torch.no_grad():
            for i, (name, module) in enumerate(rest):
                kind = "embedding" if module is embedding else "linear"
                shared = done.get(id(module.weight))
                if shared is not None:
                    # Re-quantizing dequantized values is not exact for asymmetric groups; reuse the codes.
                    qt = replace(shared, name=f"{name}.weight", kind=kind, activations=self._activations(kind))
                else:
                    qt = quantize_rtn(module.weight.detach(), f"{name}.weight", kind, c,
                                      bits=bits.get(name, c.bits), group_size=self._group_size(module, kind))
                    qt = replace(qt, activations=self._activations(kind))
                    module.weight.copy_(torch.from_numpy(qt.dequantized()))
                    done[id(module.weight)] = qt
                state.quantized[qt.name] = qt
                ctx.progress(i + 1, len(rest))
        if c.activations == "int8":
            from llmopt.quantized import simulate_int8_activations

            for name, module in targets:
                if name in linears:
                    simulate_int8_activations(module)
        state.pass_info["quantize"] = {
            "method": c.method,
            "bits": c.bits,
            "group_size": "per output channel" if c.activations == "int8" else c.group_size,
            "symmetric": c.symmetric,
            "activations": "int8, dynamic per tensor (uint8)" if c.activations == "int8" else "float",
            "quantized_tensors": len(targets),
            # A tied embedding and lm_head are one tensor, stored once: counted once.
            "quantized_parameters": int(sum(w.numel() for w in {id(m.weight): m.weight for _, m in targets}.values())),
            **info,
        }
        return state

    def _group_size(self, module, kind: str) -> int:
        """W8A8 Linears have one group per row (the integer kernels take one scale per output channel)."""
        return module.weight.shape[1] if self.config.activations == "int8" and kind == "linear" else self.config.group_size

    def _activations(self, kind: str) -> str:
        return self.config.activations if kind == "linear" else "float"

    def _run_awq(self, state: ModelState, ctx: PassContext, linears: set[str]) -> dict:
        """Activation-aware scales folded into the model (its float function unchanged), before quantizing."""
        from llmopt.passes.quantize_awq import apply_awq

        return apply_awq(state.model, ctx.calibration_windows("quantize with awq"), linears, self.awq_fake_quantize,
                         ctx.progress, seed=ctx.seed)

    def awq_fake_quantize(self, w: "torch.Tensor") -> "torch.Tensor":
        """What AWQ scores its scales against: the weight RTN-quantized and dequantized."""
        import torch

        return torch.from_numpy(quantize_rtn(w, "w", "linear", self.config).dequantized())

    def gptq_linear(self, name: str, module, hessian: "torch.Tensor", bits: int | None = None
                    ) -> tuple[QuantizedTensor, float]:
        """GPTQ codes of one Linear from its input Hessian; the module's weight becomes their dequantized values
        (what the next layer's calibration inputs are computed with). Returns the codes and the damping used."""
        from llmopt.passes.quantize_gptq import gptq

        c = self.config
        b, g = bits or c.bits, self._group_size(module, "linear")
        r = gptq(module.weight, hessian, bits=b, group_size=g, symmetric=c.symmetric,
                 act_order=c.act_order, damp=c.damp, name=name)
        return self.set_codes(name, module, r, b), r["damp"]

    def set_codes(self, name: str, module, r: dict, bits: int) -> QuantizedTensor:
        """One Linear's integers (r: codes, scales, zero_points as torch tensors) as a QuantizedTensor; the
        module's weight becomes their dequantized values."""
        import torch

        c = self.config
        qt = QuantizedTensor(name=f"{name}.weight", kind="linear", bits=bits, group_size=self._group_size(module, "linear"),
                             symmetric=c.symmetric, codes=r["codes"].numpy(),
                             scales=r["scales"].numpy().astype("float32"), zero_points=r["zero_points"].numpy(),
                             activations=c.activations)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(qt.dequantized()))
        return qt

    def _run_gptq(self, state: ModelState, ctx: PassContext, linears: dict, bits: dict[str, int]) -> dict:
        """GPTQ on the decoder layers' Linears, recording each one's codes in the state."""
        from llmopt.passes.quantize_gptq import gptq_decoder_layers

        windows = ctx.calibration_windows("quantize with method 'gptq'")

        def quantize_one(name: str, module, hessian) -> float:
            qt, damp = self.gptq_linear(name, module, hessian, bits.get(name))
            state.quantized[qt.name] = qt
            return damp

        damping = gptq_decoder_layers(state.model, windows, linears, quantize_one, ctx.progress)
        return self.gptq_info(damping, windows)

    def _run_signround(self, state: ModelState, ctx: PassContext, linears: dict, bits: dict[str, int]) -> dict:
        """SignRound on the decoder layers' Linears, recording each one's codes in the state."""
        from llmopt.passes.quantize_signround import signround_decoder_layers

        c = self.config
        windows = ctx.calibration_windows("quantize with method 'signround'")

        def store(name: str, module, codes: dict) -> None:
            qt = self.set_codes(name, module, codes, bits.get(name, c.bits))
            state.quantized[qt.name] = qt

        info = signround_decoder_layers(state.model, windows, linears, store, ctx.progress,
                                        bits_of=lambda name: bits.get(name, c.bits), group_size=c.group_size,
                                        symmetric=c.symmetric, iters=c.iters, lr=c.lr or 1 / c.iters,
                                        batch_size=c.batch_size, seed=ctx.seed)
        return {**info, "calibration_tokens": int(sum(len(w) for w in windows))}

    def gptq_info(self, damping: dict[str, float], windows: list) -> dict:
        """What the report records of a GPTQ run: Linears done, calibration tokens, where damping was raised."""
        c = self.config
        retried = sorted(name for name, d in damping.items() if d > c.damp)
        return {"gptq_layers": len(damping), "calibration_tokens": int(sum(len(w) for w in windows)),
                "act_order": c.act_order, "damp": c.damp, "damp_raised_for": retried}

    def _run_smoothquant(self, state: ModelState, ctx: PassContext, linears: set[str]) -> dict:
        """SmoothQuant scales folded into the model (its float function unchanged), before quantizing."""
        import torch

        from llmopt.passes.quantize_smooth import apply_smoothquant

        def fake_quantize(w: "torch.Tensor") -> "torch.Tensor":  # per output channel, as quantize_rtn does below
            scale, zero = group_params(w, 8, self.config.symmetric)  # (out,) each
            codes = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, 255)
            return (codes - zero[:, None]) * scale[:, None]

        return apply_smoothquant(state.model, ctx.calibration_windows("quantize with smoothquant"), linears,
                                 fake_quantize, ctx.progress, seed=ctx.seed)

    def _choose_bits(self, state: ModelState, ctx: PassContext, linears: list) -> tuple[dict[str, int], dict]:
        """Mixed precision: 8 bits for the Linears whose low-bit quantization costs most KL per stored bit."""
        from llmopt.passes.quantize_mixed import choose_bits, layer_sensitivity

        c = self.config

        def fake_quantize(w: "torch.Tensor", bits: int) -> "torch.Tensor":
            import torch

            return torch.from_numpy(quantize_rtn(w, "w", "linear", c, bits=bits).dequantized())

        windows = ctx.calibration_windows("quantize with target_bits_per_weight")
        kl = layer_sensitivity(state.model, windows, linears, lambda w: fake_quantize(w, c.bits), ctx.progress)
        sizes = {name: m.weight.numel() for name, m in linears}
        bits = choose_bits(kl, sizes, c.bits_per_weight(c.bits), c.bits_per_weight(8), c.target_bits_per_weight)
        chosen = {name: (8 if name in bits else c.bits) for name, _ in linears}
        stored = sum(sizes[n] * c.bits_per_weight(b) for n, b in chosen.items()) / sum(sizes.values())
        return chosen, {"bits_per_layer": chosen, "bits_per_weight": round(stored, 3),
                        "target_bits_per_weight": c.target_bits_per_weight,
                        "sensitivity_kl": {n: round(v, 6) for n, v in kl.items()},
                        "layers_at_8_bits": len(bits)}

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


def _check_folds_kept_the_function(model, probe: "torch.Tensor", before: "torch.Tensor", what: str) -> None:
    """AWQ and SmoothQuant only move scales between an op and the Linears that read it: the float model must
    compute what it did (float rounding aside). A fold into the wrong op (a family whose layout is described
    wrongly) would otherwise pass as a slightly worse perplexity."""
    import torch

    from llmopt.errors import ResultValidationError

    with torch.no_grad():
        after = model(input_ids=probe).logits
    change = float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))
    if not change < 1e-3:
        raise ResultValidationError(
            f"The {what} scale folds changed the float model (relative max logit change {change:.2e} on a "
            f"calibration window, where moving scales should change nothing); nothing was written.",
            f"Report this with the model's config: its family description (model_type "
            f"'{model.config.model_type}') does not match its modules. Meanwhile drop `{what}`.")


def input_widths(arch: ArchInfo) -> dict[str, int]:
    """The input widths of the Linears a quantization group runs along: a group size must divide each."""
    return {"hidden_size": arch.hidden_size, "intermediate_size": arch.intermediate_size,
            "num_heads*head_dim": arch.num_heads * arch.head_dim}


def group_params(w: "torch.Tensor", bits: int, symmetric: bool) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Scale and zero point of each row of `w` (..., g) so that codes = clamp(round(w / s) + z, 0, 2^bits - 1).

    Symmetric groups have z = 2^(bits-1). At 4 bits the group's largest-magnitude value, with its sign, maps
    to code 0 (s = w_extreme / -8, negative when that value is positive), so all 16 levels are used and the
    step is 8/7 finer than max|w| / 7 over 15 levels — onnxruntime's own blockwise quantizer (MLAS) does
    the same; the stored scale carries the sign, so every runtime's dequantization (code - z) * s is
    unchanged. At 8 bits the 256th level gains little, and W8A8's integer kernels keep to positive scales:
    s = max|w| / 127. Asymmetric groups use the min/max range, which always includes 0 so that exact
    zeros stay exact.
    """
    import torch

    levels = 2**bits - 1
    if symmetric:
        mid = 2 ** (bits - 1)
        if bits <= 4:
            extreme = w.gather(-1, w.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
            scale = extreme / -mid
        else:
            scale = w.abs().amax(dim=-1) / (mid - 1)
        scale = torch.where(scale != 0, scale, torch.ones_like(scale))
        return scale, torch.full_like(scale, mid)
    lo = torch.clamp(w.amin(dim=-1), max=0.0)
    hi = torch.clamp(w.amax(dim=-1), min=0.0)
    scale = (hi - lo) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.clamp(torch.round(-lo / scale), 0, levels)


def quantize_rtn(weight, name: str, kind: str, config: QuantizeConfig, *, bits: int | None = None,
                 group_size: int | None = None) -> QuantizedTensor:
    """Round-to-nearest group quantization of a 2-D float tensor (rows, cols); bits/group_size override the config's."""
    import torch

    rows, cols = weight.shape
    g, bits = group_size or config.group_size, bits or config.bits
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
