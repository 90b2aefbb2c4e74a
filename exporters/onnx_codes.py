"""The quantize pass's own integers in onnxruntime's layouts (MatMulNBits, GatherBlockQuantized, QMoE).

Why by hand: onnxruntime's ``MatMulNBitsQuantizer`` takes float weights and quantizes them itself, picking its
own scales and codes, so the artifact would no longer be the model that was evaluated. Here the codes, scales and
zero points come from the pass unchanged; only their byte layout is onnxruntime's:

* MatMulNBits: B uint8 (N, k_blocks, block_size * bits / 8), codes of one output column packed along
  K, low nibble first for 4 bits; scales (N, k_blocks); zero_points uint8 packed the same way per row,
  (N, ceil(k_blocks * bits / 8)); without zero_points onnxruntime uses 2**(bits - 1) (8 or 128).
* GatherBlockQuantized with uint8 data: data (rows, cols * bits / 8) packed along the last axis,
  gather_axis 0, quantize_axis last; scales (rows, blocks); zero_points uint8 (rows,
  ceil(blocks * bits / 8)); default zero point 2**(bits - 1) as for MatMulNBits.
"""

from __future__ import annotations

import functools

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from llmopt.quantized import QuantizedTensor

MS_DOMAIN = "com.microsoft"


def layout_problem(t: QuantizedTensor) -> str | None:
    g = t.group_size
    if t.bits not in (4, 8):
        return f"{t.bits}-bit codes are not supported (4 or 8)"
    if g < 16 or g & (g - 1):
        return f"group_size {g} is not a power of two >= 16, as MatMulNBits/GatherBlockQuantized require"
    if t.shape[1] % g:
        return f"group_size {g} does not divide the last dimension {t.shape[1]}"
    return None


@functools.lru_cache(maxsize=None)
def gather_problem(bits: int, block_size: int, with_zero_points: bool) -> str | None:
    """Run a small GatherBlockQuantized (uint8 data) on the CPU EP and compare it to numpy; None if right."""
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        return "onnxruntime is not installed, GatherBlockQuantized could not be checked"
    rng = np.random.default_rng(0)
    rows, cols = 4, 2 * block_size
    zeros = rng.integers(0, 2**bits, (rows, 2), dtype=np.uint8) if with_zero_points else None
    probe = QuantizedTensor(
        name="probe", kind="embedding", bits=bits, group_size=block_size, symmetric=zeros is None,
        codes=rng.integers(0, 2**bits, (rows, cols), dtype=np.uint8),
        scales=rng.uniform(0.5, 1.5, (rows, 2)).astype(np.float32),
        zero_points=zeros if zeros is not None else np.full((rows, 2), 2 ** (bits - 1), np.uint8),
    )
    inits = [numpy_helper.from_array(pack_codes(probe.codes, bits), "data"), numpy_helper.from_array(probe.scales, "scales")]
    if zeros is not None:
        inits.append(numpy_helper.from_array(pack_codes(zeros, bits), "zero_points"))
    node = helper.make_node("GatherBlockQuantized", ["data", "indices", *(i.name for i in inits[1:])], ["out"],
                            domain=MS_DOMAIN, gather_axis=0, quantize_axis=1, block_size=block_size, bits=bits)
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("indices", TensorProto.INT64, [1, 3])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = 8
    indices = np.array([[2, 0, 3]], dtype=np.int64)  # (1, 3)
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {"indices": indices})
    except Exception as exc:  # noqa: BLE001 - any failure means "keep the float Gather"
        return f"GatherBlockQuantized (bits={bits}, block_size={block_size}) does not run here: {exc}"[:300]
    if out.shape != (1, 3, cols) or not np.allclose(out[0], probe.dequantized()[[2, 0, 3]], rtol=1e-6, atol=1e-6):
        return f"GatherBlockQuantized (bits={bits}, block_size={block_size}) gives wrong values on this onnxruntime"
    return None


def matmul_nbits_parts(t: QuantizedTensor, accuracy_level: int = 0) -> tuple[list[np.ndarray], dict[str, int]]:
    """MatMulNBits' stored inputs for ``t`` — B (N, k_blocks, blob), scales (N, k_blocks) and, unless ORT's
    default 2**(bits-1) applies, packed zero points — and its attributes."""
    rows, cols = t.shape  # (N, K): output, input features
    blob = t.group_size * t.bits // 8
    arrays = [pack_codes(t.codes, t.bits).reshape(rows, cols // t.group_size, blob), t.scales]
    zero_points = packed_zero_points(t)
    if zero_points is not None:
        arrays.append(zero_points)
    attrs = {"K": cols, "N": rows, "bits": t.bits, "block_size": t.group_size}
    if accuracy_level:  # as ORT's own quantizer: only when set, some EPs reject the attribute
        attrs["accuracy_level"] = accuracy_level
    return arrays, attrs


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """(rows, cols) codes < 2**bits -> uint8 (rows, ceil(cols * bits / 8)); 4 bits: low nibble first."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes
    if codes.shape[1] % 2:  # odd count (zero points of an odd number of blocks): pad the last high nibble
        codes = np.pad(codes, ((0, 0), (0, 1)))
    return (codes[:, 0::2] & 0x0F) | ((codes[:, 1::2] & 0x0F) << 4)  # (rows, cols / 2)


def packed_zero_points(t: QuantizedTensor) -> np.ndarray | None:
    """Packed zero points, or None when all equal ORT's default 2**(bits-1) (input then omitted)."""
    if np.all(t.zero_points == 2 ** (t.bits - 1)):
        return None
    return pack_codes(t.zero_points, t.bits)  # (rows, ceil(blocks * bits / 8))


__all__ = ["MS_DOMAIN", "gather_problem", "layout_problem", "matmul_nbits_parts", "pack_codes", "packed_zero_points"]
