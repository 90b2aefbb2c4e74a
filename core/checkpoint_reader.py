"""The tensors of a safetensors checkpoint folder (one file or a sharded index), read one at a time: what the
streamed schedule (llmopt.streaming) reads its layers with.

Why tensors are read by hand: safetensors' `safe_open` memory-maps the file, and every page of the map that a
read touches is counted in the process's resident memory until the kernel evicts it, so reading a 27 GB
checkpoint through it shows a resident size near the file's, whatever we hold. Each tensor is read here with
explicit `pread`s into a buffer of its own, freed when the layer is done; the page cache stays the kernel's.
The files are validated by safetensors' own reader first (`check_checkpoint`), so the header offsets used
here are trusted.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmopt.errors import InputError

if TYPE_CHECKING:
    import torch

_DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2)}
# Buffers older checkpoints saved that transformers recomputes (never weights).
SKIPPED = re.compile(r"\.rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class TensorEntry:
    path: Path
    dtype: str  # safetensors dtype name: F32, F16, BF16
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


class CheckpointReader:
    """The tensors of a safetensors checkpoint folder (one file or a sharded index), read one at a time."""

    def __init__(self, folder: str | Path) -> None:
        from llmopt.checkpoint import SAFETENSORS_INDEX, check_checkpoint, read_shard_index

        self.folder = Path(folder)
        config_path = self.folder / "config.json"
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"Cannot read '{config_path}': {exc}.",
                             "Point the streaming path at a Hugging Face checkpoint folder (config.json and "
                             "*.safetensors).") from None
        if (self.folder / SAFETENSORS_INDEX).exists():
            files = [self.folder / shard for shard in read_shard_index(self.folder, SAFETENSORS_INDEX)]
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise InputError(f"'{self.folder}' has no *.safetensors weights; the streaming path reads safetensors only.",
                             "Convert the checkpoint to safetensors, or use the non-streaming pipeline.")
        check_checkpoint(self.folder, self.config, allow_pickle=False)  # safetensors' own validation of every header
        self.entries: dict[str, TensorEntry] = {}
        for path in files:
            self.entries.update(_header_entries(path))
        unsupported = {e.dtype for e in self.entries.values()} - set(_DTYPES)
        if unsupported:
            raise InputError(f"'{self.folder}' holds tensors of dtype {', '.join(sorted(unsupported))}; the streaming "
                             "path reads float32, float16 and bfloat16 checkpoints.",
                             "Dequantize the checkpoint to a float dtype first.")

    def names(self) -> list[str]:
        return [n for n in self.entries if not SKIPPED.search(n)]

    def layer_names(self, index: int) -> list[str]:
        prefix = f"model.layers.{index}."
        return [n for n in self.names() if n.startswith(prefix)]

    def read(self, name: str) -> torch.Tensor:
        """One tensor in float32, from a buffer of its own (no memory map): (shape) float32."""
        import torch

        entry = self.entries[name]
        buffer = bytearray(entry.end - entry.start)
        view = memoryview(buffer)
        with open(entry.path, "rb", buffering=0) as fh:
            done = 0
            while done < len(buffer):
                got = os.preadv(fh.fileno(), [view[done:]], entry.start + done)
                if got <= 0:
                    raise InputError(f"'{entry.path}' ended while reading '{name}'.",
                                     "Re-download or re-save the checkpoint; the file is damaged.")
                done += got
        dtype = getattr(torch, _DTYPES[entry.dtype][0])
        tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
        return tensor.reshape(entry.shape).float()  # float32 input: no copy, the tensor owns the buffer


def _header_entries(path: Path) -> dict[str, TensorEntry]:
    # The format is 8 bytes (little-endian header length), a JSON header, then the data; offsets are
    # relative to the end of the header.
    with open(path, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(length))
    base = 8 + length
    return {name: TensorEntry(path, info["dtype"], tuple(info["shape"]), base + info["data_offsets"][0],
                              base + info["data_offsets"][1])
            for name, info in header.items() if name != "__metadata__"}
