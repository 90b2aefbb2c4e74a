"""The one in-memory form of a block-quantized weight that passes produce and exporters consume.

A quantization pass keeps the model runnable in PyTorch by writing the *dequantized* weight back
into the module, and records the integers it chose here, so that an exporter can store the pass's
own codes, scales and zero points (never a re-quantization by another tool).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantized(self) -> np.ndarray:
        rows, cols = self.codes.shape
        groups = cols // self.group_size
        codes = self.codes.reshape(rows, groups, self.group_size).astype(np.float32)
        zeros = self.zero_points.astype(np.float32)[:, :, None]
        return ((codes - zeros) * self.scales[:, :, None]).reshape(rows, cols).astype(np.float32)
