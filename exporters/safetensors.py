"""safetensors: a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads.

int4/int8 linear weights are stored packed in the compressed-tensors `pack-quantized` format (what llm-compressor
writes, and what transformers and vLLM load): the pass's own codes packed by the library's `pack_to_int32`, its
scales as `weight_scale`, asymmetric groups' zero points as `weight_zero_point` (compressed-tensors >= 0.20 reads
them back), and a `quantization_config` in config.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

from llmopt.errors import InputError, RecipeError
from llmopt.exporters.base import Exporter, ExportResult
from llmopt.model import ArchInfo
from llmopt.quantized import QuantizedTensor
from llmopt.state import ModelState


def save_model(model: Any, folder: Path, **kwargs: Any) -> None:
    """model.save_pretrained, also for a generation config transformers deems invalid (sampling settings
    without do_sample, as many checkpoints ship them): save_pretrained raises on one, and then writes no weights.
    Such a config is left out here, as optimum's ONNX export leaves it out; the pipeline puts the checkpoint's
    own file in the artifact."""
    config = getattr(model, "generation_config", None)
    try:
        if config is not None:
            config.validate(strict=True)
    except ValueError:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig()  # a valid stand-in for the save, removed below
        try:
            model.save_pretrained(folder, **kwargs)
        finally:
            model.generation_config = config
        (folder / "generation_config.json").unlink(missing_ok=True)
        return
    model.save_pretrained(folder, **kwargs)


class SafetensorsExporter(Exporter):
    format = "safetensors"
    runtime = "pytorch"

    def check(self, arch: ArchInfo, config: Any = None, passes: Sequence[Any] = ()) -> None:
        problem = experts_layout_problem(arch.model_type, [getattr(p, "config", p) for p in passes])
        if problem is not None:
            raise RecipeError(f"export.format: safetensors: {problem}.",
                              "Set `symmetric: true` in the quantize pass, or export onnx.")

    def export(self, state: ModelState, folder: Path,
               progress: Callable[[int, int], None] | None = None) -> ExportResult:
        # No progress: transformers' save_pretrained writes the whole state dict in one call.
        packed, unpacked = split_packable(state)
        notes = []
        dtype = self._storage_dtype(state)
        if packed:
            self._write_packed(state, folder, packed, dtype)
        else:
            # save_pretrained handles tied weights and sharding, and writes config + generation config.
            save_model(state.model, folder, safe_serialization=True, state_dict=_cast(state.model.state_dict(), dtype))
        if dtype is not None:
            _set_config_dtype(folder, dtype)
        state.tokenizer.save_pretrained(folder)
        if unpacked:
            notes.append(
                f"{len(unpacked)} quantized weights are stored dequantized in float32 (compressed-tensors packs "
                "linear weights of one layout; quantized embeddings, a tied lm_head and other layouts stay float): "
                "those tensors are not smaller on disk, the quality figures are those of the quantized model.")
        storage = "pack-quantized" if packed else ("dequantized" if unpacked else "none")
        info: dict[str, Any] = {"dtype": str(dtype or "torch.float32").removeprefix("torch."), "quantized_storage": storage, "packed_tensors": len(packed),
                                "dequantized_tensors": len(unpacked)}
        if packed:
            notes.append(f"{len(packed)} linear weights stored as compressed-tensors pack-quantized "
                         "(loads with transformers when `compressed-tensors` is installed, and with vLLM).")
        return ExportResult(folder, notes, info)

    @staticmethod
    def _storage_dtype(state: ModelState) -> Any:
        """The dtype `half` asked for (None: as the model is); float16 is refused when it would overflow."""
        if state.precision is None:
            return None
        import torch

        overflow = state.pass_info.get("half", {}).get("overflowing_modules", {})
        if state.precision["dtype"] == "float16" and overflow:
            name, peak = max(overflow.items(), key=lambda kv: kv[1])
            raise InputError(f"half: {len(overflow)} module(s) produce activations beyond fp16's safe range on the "
                             f"calibration text (largest: {name}, {peak:,.0f}; fp16 ends at 65,504), and a "
                             "safetensors checkpoint loads in one dtype, so nothing can stay fp32.",
                             "Use dtype: bfloat16 (float32's range), or export.format: onnx, which keeps those "
                             "modules in fp32.")
        return getattr(torch, state.precision["dtype"])

    @staticmethod
    def _write_packed(state: ModelState, folder: Path, packed: dict[str, QuantizedTensor], dtype: Any = None) -> None:
        import torch

        model = state.model
        tensors = model.state_dict()
        for name, qt in packed.items():
            del tensors[name]
            for key, value in compressed_tensors_entries(name, qt):
                tensors[key] = value.to(dtype or model.dtype) if value.is_floating_point() else value
        save_model(model, folder, state_dict=_cast(tensors, dtype), safe_serialization=True)

        first = next(iter(packed.values()))
        linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        path = folder / "config.json"
        data = json.loads(path.read_text(encoding="utf-8"))
        data["quantization_config"] = quantization_config(first.bits, first.group_size, first.symmetric,
                                                          [n for n in linears if f"{n}.weight" not in packed])
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def experts_layout_problem(model_type: str, settings: Sequence[Any]) -> str | None:
    """Why a compressed-tensors checkpoint of these quantize settings would not load back (None when it would):
    transformers 5.25 fuses an MoE family's experts at load and loses their zero points on the way, so
    asymmetric experts fail to load (a bug of its converter, not of the file)."""
    from llmopt.architectures import describe

    family = describe(model_type)
    if family is None or not family.moe:
        return None
    if any(getattr(s, "type", None) == "quantize" and not s.symmetric for s in settings):
        return ("transformers cannot load an MoE checkpoint whose experts are quantized asymmetrically (its "
                "converter drops their zero points when it fuses the experts)")
    return None


def split_packable(state: ModelState) -> tuple[dict[str, QuantizedTensor], dict[str, QuantizedTensor]]:
    """The quantized tensors that pack-quantized can hold, and the rest.

    One config group holds one (bits, group_size, symmetric): the most common one wins. A linear weight tied to
    the embedding cannot be packed (the embedding must stay a float table).
    """
    from collections import Counter

    model = state.model
    embedding = model.get_input_embeddings().weight
    params = dict(model.named_parameters(remove_duplicate=False))
    candidates = {name: qt for name, qt in state.quantized.items()
                  if qt.kind == "linear" and qt.activations == "float" and params.get(name) is not embedding}
    if not candidates:
        return {}, dict(state.quantized)
    layout = Counter((qt.bits, qt.group_size, qt.symmetric) for qt in candidates.values()).most_common(1)[0][0]
    packed = {n: qt for n, qt in candidates.items() if (qt.bits, qt.group_size, qt.symmetric) == layout}
    return packed, {n: qt for n, qt in state.quantized.items() if n not in packed}


def compressed_tensors_entries(name: str, qt: QuantizedTensor, rows_per_call: int | None = None) -> list[tuple[str, Any]]:
    """(stored name, tensor) of one Linear's codes in compressed-tensors' pack-quantized layout: `weight_packed`
    (out, in * bits / 32) int32, `weight_scale` (out, groups) float32, for asymmetric groups `weight_zero_point`
    (ceil(out * bits / 32), groups) int32, and `weight_shape`. compressed-tensors holds signed codes and zero
    points (q - 2^(bits-1)): (q - z) * scale is unchanged. `rows_per_call` packs the codes a block of rows at a
    time (pack_to_int32 needs ~10x its input in temporaries)."""
    import torch
    from compressed_tensors.compressors import pack_to_int32

    base = name.removesuffix(".weight")
    offset = 2 ** (qt.bits - 1)
    signed = lambda codes: torch.from_numpy(codes.astype("int16") - offset).to(torch.int8)  # noqa: E731
    step = rows_per_call or qt.shape[0]
    blocks = [pack_to_int32(signed(qt.codes[r:r + step]), qt.bits) for r in range(0, qt.shape[0], step)]
    entries = [(f"{base}.weight_packed", torch.cat(blocks) if len(blocks) > 1 else blocks[0]),
               (f"{base}.weight_scale", torch.from_numpy(qt.scales))]
    if not qt.symmetric:
        entries.append((f"{base}.weight_zero_point", pack_to_int32(signed(qt.zero_points), qt.bits, packed_dim=0)))
    entries.append((f"{base}.weight_shape", torch.tensor(qt.shape, dtype=torch.int32)))
    return entries


def quantization_config(bits: int, group_size: int, symmetric: bool, ignore: list[str]) -> dict[str, Any]:
    """config.json's `quantization_config`: one compressed-tensors group over every Linear but `ignore`."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size))
    config = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                                quantization_status="compressed", ignore=ignore)
    data = {**json.loads(config.model_dump_json()), "quant_method": "compressed-tensors"}
    if not symmetric:
        # transformers 5.25 (compressed-tensors 0.20.1) runs packed asymmetric zero points only by dequantizing at
        # load: its compressed Linears expect them unpacked, and a plain from_pretrained fails on the shapes.
        # vLLM reads the packed form and ignores the key.
        data["dequantize"] = True
    return data


def _cast(tensors: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """Float tensors cast to `dtype`, once per storage so that tied weights stay shared (saved once)."""
    if dtype is None:
        return tensors
    done: dict[int, Any] = {}
    out = {}
    for name, t in tensors.items():
        if t.is_floating_point():
            key = t.data_ptr()
            if key not in done:
                done[key] = t.detach().to(dtype)
            out[name] = done[key]
        else:
            out[name] = t
    return out


def _set_config_dtype(folder: Path, dtype: Any) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    name = str(dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in data or key == "torch_dtype":
            data[key] = name
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
