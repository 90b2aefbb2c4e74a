"""safetensors artifact written layer by layer: the compressed-tensors `pack-quantized` folder that
exporters/safetensors.py writes, without the whole model in memory.

Why the file format is written by hand: safetensors' writers (`save_file`, `save_model`) take every tensor
at once. Its format is simple (8-byte header length, JSON header of dtypes, shapes and offsets, then the
bytes), and every output shape follows from the input's headers, so the header of each shard is written
first and the data appended block by block as the layers are quantized. The files are read back by
safetensors itself (`safe_open`) before the folder is complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmopt.quantized import QuantizedTensor

if TYPE_CHECKING:
    from llmopt.checkpoint_reader import CheckpointReader
    from llmopt.streaming import StreamPlan

INDEX = "model.safetensors.index.json"
_ITEM = {"F32": 4, "I32": 4}
_PACK_ELEMENTS = 1 << 22  # codes packed per pack_to_int32 call


def _entries(name: str, shape: tuple[int, ...], plan: StreamPlan) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) stored for one input tensor: float32, or the tensors of a packed weight, as
    exporters.safetensors.compressed_tensors_entries writes them."""
    if name not in plan.quantized:
        return [(name, "F32", shape)]
    rows, cols = shape
    base, q = name.removesuffix(".weight"), plan.quantize
    entries = [(f"{base}.weight_packed", "I32", (rows, cols * q.bits // 32)),  # (out, in * bits / 32)
               (f"{base}.weight_scale", "F32", (rows, cols // q.group_size))]  # (out, groups)
    if not q.symmetric:  # zero points packed along the output dimension
        entries.append((f"{base}.weight_zero_point", "I32", (-(-rows * q.bits // 32), cols // q.group_size)))
    return [*entries, (f"{base}.weight_shape", "I32", (2,))]


def _block_layout(plan: StreamPlan, reader: CheckpointReader) -> list[list[tuple[str, str, tuple[int, ...]]]]:
    """The stored tensors of each block, in the order `StreamPlan.blocks` produces them (sorted within a block)."""
    shapes = {n: e.shape for n, e in reader.entries.items()}
    blocks = [["model.embed_tokens.weight"]] + [reader.layer_names(i) for i in range(plan.num_layers)]
    final = [*plan.extra_names, "model.norm.weight"]
    if "lm_head.weight" in shapes:
        final.append("lm_head.weight")
    elif plan.untie:
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
        final.append("lm_head.weight")
    blocks.append(final)
    return [[e for name in sorted(names) for e in _entries(name, shapes[name], plan)] for names in blocks]


def _nbytes(entry: tuple[str, str, tuple[int, ...]]) -> int:
    count = 1
    for d in entry[2]:
        count *= d
    return count * _ITEM[entry[1]]


def _file_order(entries: list[tuple[str, str, tuple[int, ...]]]) -> list[tuple[str, str, tuple[int, ...]]]:
    """safetensors' own order within a file (float32 before int32, then by name), so that a one-file artifact is
    byte-identical to `save_file`'s; tensors are then written at their offsets in whatever order they come."""
    return sorted(entries, key=lambda e: (e[1] != "F32", e[0]))


def _header(entries: list[tuple[str, str, tuple[int, ...]]]) -> tuple[bytes, dict[str, int]]:
    """The file's header bytes, and each tensor's absolute offset in the file."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offsets, offset = {}, 0
    for name, dtype, shape in _file_order(entries):
        size = _nbytes((name, dtype, shape))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offsets[name] = offset
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    start = 8 + len(text)
    return len(text).to_bytes(8, "little") + text, {name: start + o for name, o in offsets.items()}


def _serialize(name: str, item: Any) -> list[tuple[str, Any]]:
    """(stored name, contiguous torch tensor) for one block tensor, in `_entries`' order."""
    if not isinstance(item, QuantizedTensor):
        return [(name, item.contiguous())]
    from llmopt.exporters.safetensors import compressed_tensors_entries

    return compressed_tensors_entries(name, item, rows_per_call=max(1, _PACK_ELEMENTS // item.shape[1]))


def write_safetensors(plan: StreamPlan, reader: CheckpointReader, folder: Path, *,
                      max_shard_bytes: int = 5_000_000_000) -> dict[str, Any]:
    """Write the packed checkpoint into `folder`, whole blocks per shard; returns export info."""
    import torch

    layout = _block_layout(plan, reader)
    shards: list[list[int]] = [[]]  # block indices per shard
    size = 0
    for b, entries in enumerate(layout):
        block_bytes = sum(map(_nbytes, entries))
        if shards[-1] and size + block_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(b)
        size += block_bytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    shard_of_block = {b: s for s, blocks in enumerate(shards) for b in blocks}

    offsets: dict[str, int] = {}
    started: set[int] = set()
    for b, block in enumerate(plan.blocks(reader)):
        s = shard_of_block[b]
        if s not in started:  # the shard's first block: its header first
            header, offsets = _header([e for i in shards[s] for e in layout[i]])
            (folder / names[s]).write_bytes(header)
            started.add(s)
        stored = [pair for name in sorted(block.tensors) for pair in _serialize(name, block.tensors[name])]
        if [n for n, _ in stored] != [e[0] for e in layout[b]]:
            raise RuntimeError(f"block {b}: the tensors read differ from the planned layout")  # a bug, not input
        with open(folder / names[s], "r+b") as fh:
            for name, tensor in stored:
                if tensor.dtype not in (torch.float32, torch.int32):
                    raise RuntimeError(f"{name}: unexpected dtype {tensor.dtype}")  # a bug, not input
                _write_at(fh.fileno(), memoryview(tensor.numpy()).cast("B"), offsets[name])
        del block, stored
    _check_written(folder, names)
    if len(shards) > 1:
        weight_map = {e[0]: names[s] for s, blocks in enumerate(shards) for b in blocks for e in layout[b]}
        total = sum(_nbytes(e) for entries in layout for e in entries)
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                               indent=2) + "\n", encoding="utf-8")
    _write_config(plan, folder)
    return {"quantized_storage": "pack-quantized", "packed_tensors": len(plan.quantized), "shards": len(shards),
            "streaming": True}


def _write_at(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _check_written(folder: Path, names: list[str]) -> None:
    """Every shard opens in safetensors' own reader (header, offsets and file size agree)."""
    from safetensors import safe_open

    for name in names:
        with safe_open(str(folder / name), framework="numpy"):
            pass


def _write_config(plan: StreamPlan, folder: Path) -> None:
    """config.json as the non-streaming exporter leaves it: float32, untied when lm_head got codes of its own,
    and the compressed-tensors quantization_config (one group, the unquantized Linears ignored)."""
    from llmopt.exporters.safetensors import quantization_config

    data = dict(plan.config)  # the input's config.json
    data["dtype"] = "float32"
    data.pop("torch_dtype", None)
    if plan.untie:
        data["tie_word_embeddings"] = False
    q = plan.quantize
    # Every Linear the plan could quantize (the family's projections, as the checkpoint names them) and lm_head.
    linears = [n.removesuffix(".weight") for n in sorted(plan.linears)] + ["lm_head"]
    data["quantization_config"] = quantization_config(q.bits, q.group_size, q.symmetric,
                                                      [n for n in linears if f"{n}.weight" not in plan.quantized])
    (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
