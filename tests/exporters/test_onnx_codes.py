"""The quantize pass's integers in onnxruntime's layouts (llmopt.exporters.onnx_codes), each op run alone on the CPU
provider against numpy: MatMulNBits and GatherBlockQuantized with 4 and 8 bits, symmetric and asymmetric, an odd
number of blocks (zero points padded to whole bytes); the probe that guards GatherBlockQuantized sees a wrong
layout."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import llmopt.exporters.onnx_codes as codes
from llmopt.exporters.onnx_codes import MS_DOMAIN, matmul_nbits_parts, pack_codes, packed_zero_points
from llmopt.quantized import QuantizedTensor


def rtn(w: np.ndarray, kind: str, bits: int, group: int, symmetric: bool) -> QuantizedTensor:
    """Reference group-wise round-to-nearest quantizer, independent of the project's pass."""
    rows, cols = w.shape
    g = w.astype(np.float32).reshape(rows, cols // group, group)
    levels, mid = 2**bits - 1, 2 ** (bits - 1)
    if symmetric:
        scale = np.abs(g).max(-1) / (mid - 1)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.round(g / scale[..., None]), -mid, mid - 1) + mid
        zeros = np.full(scale.shape, mid)
    else:
        lo, hi = np.minimum(g.min(-1), 0), np.maximum(g.max(-1), 0)
        scale = np.where(hi > lo, (hi - lo) / levels, 1.0).astype(np.float32)
        zeros = np.clip(np.round(-lo / scale), 0, levels)
        q = np.clip(np.round(g / scale[..., None]) + zeros[..., None], 0, levels)
    return QuantizedTensor("w", kind, bits, group, symmetric, q.reshape(rows, cols).astype(np.uint8), scale,
                           zeros.astype(np.uint8))


def session(node, inputs, initializers):
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS_DOMAIN, 1)],
                              ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("accuracy_level", [0, 4])
@pytest.mark.parametrize("bits,symmetric", [(4, False), (8, False), (4, True), (8, True)])
def test_matmul_nbits_computes_the_dequantized_matmul(bits, symmetric, accuracy_level):
    rng = np.random.default_rng(0)
    t = rtn(rng.standard_normal((40, 48)).astype(np.float32), "linear", bits, 16, symmetric)  # 3 blocks per row
    arrays, attrs = matmul_nbits_parts(t, accuracy_level)
    names = ["B", "scales", "zero_points"][:len(arrays)]
    node = helper.make_node("MatMulNBits", ["A", *names], ["Y"], domain=MS_DOMAIN, **attrs)
    run = session(node, [helper.make_tensor_value_info("A", TensorProto.FLOAT, [2, 48])],
                  [numpy_helper.from_array(a, n) for a, n in zip(arrays, names)])
    a = rng.standard_normal((2, 48)).astype(np.float32)
    (out,) = run.run(None, {"A": a})
    expected = a @ t.dequantized().T
    # accuracy_level 4 quantizes A to int8 inside the op: close, not equal
    assert np.abs(out - expected).max() < (2e-2 if accuracy_level else 1e-5) * np.abs(expected).max()
    if symmetric:
        assert len(arrays) == 2  # onnxruntime's default zero point 2**(bits-1) applies: none stored
    else:
        assert arrays[2].shape == (40, 2 if bits == 4 else 3)  # 4 bits: 3 blocks -> 2 bytes per row (padded)


@pytest.mark.parametrize("bits,symmetric", [(4, False), (8, False), (4, True), (8, True)])
def test_gather_block_quantized_gathers_the_dequantized_rows(bits, symmetric):
    rng = np.random.default_rng(0)
    t = rtn(rng.standard_normal((50, 48)).astype(np.float32), "embedding", bits, 16, symmetric)
    zero_points = packed_zero_points(t)
    inits = [numpy_helper.from_array(pack_codes(t.codes, bits), "data"), numpy_helper.from_array(t.scales, "scales")]
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points, "zero_points"))
    node = helper.make_node("GatherBlockQuantized", ["data", "ids", *(i.name for i in inits[1:])], ["Y"],
                            domain=MS_DOMAIN, gather_axis=0, quantize_axis=1, block_size=16, bits=bits)
    run = session(node, [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5])], inits)
    ids = np.array([[0, 49, 7, 7, 23]], dtype=np.int64)
    (out,) = run.run(None, {"ids": ids})
    assert np.array_equal(out, t.dequantized()[ids])
    assert codes.gather_problem(bits, 16, zero_points is not None) is None


def test_gather_probe_detects_wrong_layout(monkeypatch):
    real_pack = codes.pack_codes

    def high_nibble_first(values, bits):
        packed = real_pack(values, bits)
        return (packed >> 4) | (packed << 4) if bits == 4 else packed

    codes.gather_problem.cache_clear()
    monkeypatch.setattr(codes, "pack_codes", high_nibble_first)
    try:
        assert "wrong values" in codes.gather_problem(4, 16, True)
        assert codes.gather_problem(8, 16, True) is None
    finally:
        codes.gather_problem.cache_clear()
