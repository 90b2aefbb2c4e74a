"""The one in-memory form of a block-quantized weight that passes produce and exporters consume.

A quantization pass keeps the model runnable in PyTorch by writing the *dequantized* weight back
into the module, and records the integers it chose here, so that an exporter can store the pass's
own codes, scales and zero points (never a re-quantization by another tool).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import numpy as np


@dataclass(frozen=True)
class QuantizedTensor:
    """Group-wise quantized 2-D weight, groups running along the input (last) axis.

    ``dequantized()[o, i] == (codes[o, i] - zero_points[o, i // group_size]) * scales[o, i // group_size]``
    """

    name: str  # parameter name in the torch model, e.g. "model.layers.0.mlp.up_proj.weight"
    kind: Literal["linear", "embedding"]  # nn.Linear weight (out, in) or nn.Embedding table (vocab, hidden)
    bits: int  # 4 or 8
    group_size: int  # elements per block along the last axis; divides the last dimension
    symmetric: bool
    codes: np.ndarray  # uint8 (rows, cols), unsigned codes in [0, 2**bits - 1]
    scales: np.ndarray  # float32 (rows, cols // group_size)
    zero_points: np.ndarray  # uint8 (rows, cols // group_size); 2**(bits-1) everywhere when symmetric
    # "int8": the layer's input is quantized too, at run time (see dynamic_uint8); needs one group per row.
    activations: Literal["float", "int8"] = "float"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantized(self) -> np.ndarray:
        rows, cols = self.codes.shape
        groups = cols // self.group_size
        codes = self.codes.reshape(rows, groups, self.group_size).astype(np.float32)
        zeros = self.zero_points.astype(np.float32)[:, :, None]
        return ((codes - zeros) * self.scales[:, :, None]).reshape(rows, cols).astype(np.float32)


_simulating = [True]  # False while an exporter traces the model: the runtime's own op quantizes instead


def dynamic_uint8(x: Any) -> Any:
    """x as onnxruntime's DynamicQuantizeMatMul sees it: quantized to uint8 with one scale and zero point for
    the whole tensor, from its range extended to include 0, then dequantized (round half to even, as MLAS)."""
    import torch

    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = (hi - lo) / 255
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-lo / scale), 0, 255)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


def simulate_int8_activations(module: Any) -> Any:
    """Make a torch Linear quantize its input as the ONNX artifact will (W8A8); returns the hook handle."""

    def hook(mod: Any, args: tuple) -> tuple | None:
        if not _simulating[0]:
            return None
        return (dynamic_uint8(args[0]), *args[1:])

    return module.register_forward_pre_hook(hook)


@contextmanager
def float_activations() -> Iterator[None]:
    """Inside: W8A8 layers take float inputs (the model without its simulation of the integer kernels, to show
    what the simulation changes)."""
    previous = _simulating[0]
    _simulating[0] = False
    try:
        yield
    finally:
        _simulating[0] = previous
