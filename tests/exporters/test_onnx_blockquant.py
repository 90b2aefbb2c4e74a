"""apply_block_quantization: the pass's own codes end up in MatMulNBits / GatherBlockQuantized, numerically exact."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import llmopt.exporters.onnx_blockquant as bq
from llmopt.exporters.onnx_blockquant import apply_block_quantization
from llmopt.quantized import QuantizedTensor

N_LINEARS = 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + lm_head
KV_HEADS, HEAD_DIM = 2, 16
CONFIGS = {"int4-sym": (4, True), "int4-asym": (4, False), "int8-sym": (8, True)}


def rtn(w: np.ndarray, name: str, kind: str, bits: int, group: int, symmetric: bool) -> QuantizedTensor:
    """Reference group-wise round-to-nearest quantizer, independent of the project's pass."""
    rows, cols = w.shape
    g = w.astype(np.float32).reshape(rows, cols // group, group)  # (rows, groups, group)
    levels, mid = 2**bits - 1, 2 ** (bits - 1)
    if symmetric:
        scale = np.abs(g).max(-1) / (mid - 1)  # (rows, groups)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        codes = np.clip(np.round(g / scale[..., None]), -mid, mid - 1) + mid
        zeros = np.full(scale.shape, mid)
    else:
        lo, hi = np.minimum(g.min(-1), 0), np.maximum(g.max(-1), 0)
        scale = np.where(hi > lo, (hi - lo) / levels, 1.0).astype(np.float32)
        zeros = np.clip(np.round(-lo / scale), 0, levels)
        codes = np.clip(np.round(g / scale[..., None]) + zeros[..., None], 0, levels)
    return QuantizedTensor(name, kind, bits, group, symmetric, codes.reshape(rows, cols).astype(np.uint8),  # type: ignore[arg-type]
                           scale, zeros.astype(np.uint8))


def tiny_llama(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def quantize_in_place(model, bits: int, symmetric: bool, group: int = 32, linears: bool = True) -> list[QuantizedTensor]:
    """Quantize every Linear (and the embedding), writing dequantized weights back like the pass does."""
    embedding = model.get_input_embeddings()
    targets = [(n, m) for n, m in model.named_modules() if linears and isinstance(m, torch.nn.Linear)]
    targets.append(("model.embed_tokens", embedding))
    out = []
    with torch.no_grad():
        for name, module in targets:
            kind = "embedding" if module is embedding else "linear"
            qt = rtn(module.weight.numpy(), f"{name}.weight", kind, bits, group, symmetric)
            module.weight.copy_(torch.from_numpy(qt.dequantized()))
            out.append(qt)
    return out


def export(model, folder: Path) -> Path:
    from optimum.exporters.onnx import main_export

    model.save_pretrained(folder / "hf")
    main_export(str(folder / "hf"), output=folder / "onnx", task="text-generation-with-past", do_validation=False)
    return folder / "onnx" / "model.onnx"


INPUT_IDS = np.array([[1, 17, 42, 99, 3, 250, 7, 128]], dtype=np.int64)  # (1, 8)


def onnx_logits(path: Path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = INPUT_IDS
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones_like(INPUT_IDS)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(INPUT_IDS.shape[1], dtype=np.int64)[None]
        else:  # past_key_values.{i}.key/value, empty cache
            feeds[inp.name] = np.zeros((1, KV_HEADS, 0, HEAD_DIM), dtype=np.float32)
    return session.run(["logits"], feeds)[0]  # (1, seq, vocab)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Export (once per configuration) a tiny Llama quantized with the reference RTN, then rewrite it."""
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            bits, symmetric = CONFIGS[name]
            folder = tmp_path_factory.mktemp(name)
            model = tiny_llama()
            tensors = quantize_in_place(model, bits, symmetric)
            with torch.no_grad():
                torch_logits = model(torch.from_numpy(INPUT_IDS)).logits.numpy()
            path = export(model, folder)
            out = path.with_name("model_q.onnx")
            stats = apply_block_quantization(path, tensors, output_path=out)
            cache[name] = {"name": name, "bits": bits, "path": path, "out": out, "stats": stats,
                           "tensors": tensors, "torch_logits": torch_logits}
        return cache[name]

    return get


@pytest.fixture(params=list(CONFIGS))
def exported(request, exports):
    return exports(request.param)


def test_counts(exported):
    stats = exported["stats"]
    print(exported["name"], stats)
    assert stats.matmul_nbits == N_LINEARS
    assert stats.unmatched == []
    if stats.gather_block_quantized != 1:  # allowed only with a reason
        assert [name for name, _ in stats.skipped] == ["model.embed_tokens.weight"]
    else:
        assert stats.skipped == []


def test_graph_ops(exported):
    model = onnx.load(str(exported["out"]))
    inits = {i.name for i in model.graph.initializer}
    ops = [n.op_type for n in model.graph.node]
    assert not [n.name for n in model.graph.node if n.op_type == "MatMul" and set(n.input) & inits]
    assert ops.count("MatMulNBits") == N_LINEARS
    assert ops.count("GatherBlockQuantized") == exported["stats"].gather_block_quantized
    assert any(o.domain == "com.microsoft" and o.version == 1 for o in model.opset_import)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            assert attrs["bits"] == exported["bits"] and attrs["block_size"] == 32 and "accuracy_level" not in attrs
            assert len(node.input) == (3 if exported["name"].endswith("-sym") else 4)
    # Only uint8 codes, float32 scales and the small float tensors (norm weights) remain.
    float_elems = sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.data_type == TensorProto.FLOAT)
    assert float_elems < 10_000


def test_numerics(exported):
    reference = onnx_logits(exported["path"])  # float graph with the dequantized weights
    rewritten = onnx_logits(exported["out"])
    vs_onnx = float(np.abs(rewritten - reference).max())
    vs_torch = float(np.abs(rewritten - exported["torch_logits"]).max())
    print(f"{exported['name']}: |logits| max {np.abs(reference).max():.3f}, "
          f"max abs diff vs float ONNX {vs_onnx:.2e}, vs torch {vs_torch:.2e}")
    assert vs_onnx < 1e-4 and vs_torch < 1e-4


def test_accuracy_level_4_runs(exports, tmp_path):
    exported = exports("int4-sym")
    out = tmp_path / "model_acc4.onnx"
    stats = apply_block_quantization(exported["path"], exported["tensors"], accuracy_level=4, output_path=out)
    levels = {a.i for n in onnx.load(str(out)).graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    diff = float(np.abs(onnx_logits(out) - onnx_logits(exported["path"])).max())
    print(f"accuracy_level=4 (int8 activations): max abs diff vs float ONNX {diff:.2e}")
    assert stats.matmul_nbits == N_LINEARS and levels == {4}
    assert diff < 5e-2  # A is quantized to int8 internally, so only approximately equal


def test_smaller(exported):
    stats = exported["stats"]
    ratio = stats.bytes_after / stats.bytes_before
    file_ratio = exported["out"].stat().st_size / exported["path"].stat().st_size
    print(f"{exported['name']}: initializer bytes {stats.bytes_before} -> {stats.bytes_after} ({ratio:.3f}), "
          f"file {file_ratio:.3f}")
    assert ratio < (0.4 if exported["bits"] == 4 else 0.45)
    assert file_ratio < (0.45 if exported["bits"] == 4 else 0.5)


def test_unmatched_and_foreign(exports, tmp_path):
    exported = exports("int4-sym")
    rng = np.random.default_rng(1)
    foreign = rtn(rng.standard_normal((64, 64)).astype(np.float32), "not.in.graph.weight", "linear", 4, 32, True)
    real = exported["tensors"][0]
    stats = apply_block_quantization(exported["path"], [foreign, real], output_path=tmp_path / "m.onnx")
    assert stats.unmatched == ["not.in.graph.weight"] and stats.matmul_nbits == 1


@pytest.mark.parametrize("given", ["embedding", "both"])
def test_tied_embedding(tmp_path, given):
    """optimum dedups a tied lm_head into MatMul(x, Transpose(embedding table)); both uses get the codes."""
    model = tiny_llama(tie=True)
    tensors = quantize_in_place(model, 4, True, linears=False)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    if given == "both":  # as the pass records a tied pair: same codes under both names
        tensors.append(dataclasses.replace(tensors[0], name="lm_head.weight", kind="linear"))
    path = export(model, tmp_path)
    out = path.with_name("q.onnx")
    stats = apply_block_quantization(path, tensors, output_path=out)
    diff = float(np.abs(onnx_logits(out) - onnx_logits(path)).max())
    print(f"tied ({given}): {stats}, max abs diff {diff:.2e}")
    assert stats.gather_block_quantized == 1 and stats.matmul_nbits == 1 and diff < 1e-4
    assert stats.unmatched == [] and stats.skipped == []
    graph = onnx.load(str(out)).graph
    assert "model.embed_tokens.weight" not in {i.name for i in graph.initializer}  # float table dropped
    assert not [n for n in graph.node if n.op_type == "Transpose" and n.input[0] == "model.embed_tokens.weight"]
    # The pair's codes, scales (and zero points) are stored once: MatMulNBits B and GatherBlockQuantized data are
    # one initializer (the table through a Reshape), the scales the same initializer.
    packed = [i for i in graph.initializer if i.data_type == TensorProto.UINT8 and len(i.raw_data) >= 64 * 256 // 2]
    assert len(packed) == 1, [i.name for i in packed]
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    matmul = next(n for n in graph.node if n.op_type == "MatMulNBits")
    assert gather.input[2] == matmul.input[2]  # scales
    producers = {n.output[0]: n for n in graph.node}
    table = [gather.input[0], matmul.input[1]]  # one is the initializer, the other a Reshape of it
    reshaped = [producers[name] for name in table if name in producers]
    assert len(reshaped) == 1 and reshaped[0].op_type == "Reshape" and packed[0].name in table
    assert reshaped[0].input[0] == packed[0].name
    assert stats.shared_bytes >= 64 * 256 // 2


# ---- small hand-built graphs: layouts, sharing, saving -------------------------------------------------


def matmul_model(weights: dict[str, np.ndarray], shared: int = 1) -> onnx.ModelProto:
    """A (2, K) -> MatMul with each (K, N) weight (``shared`` nodes per weight) -> outputs."""
    k = next(iter(weights.values())).shape[0]
    nodes, outputs = [], []
    for name, w in weights.items():
        for i in range(shared):
            nodes.append(helper.make_node("MatMul", ["A", name], [f"Y_{name}_{i}"]))
            outputs.append(helper.make_tensor_value_info(f"Y_{name}_{i}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [2, k])], outputs,
                              [numpy_helper.from_array(w, n) for n, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def run_all(path: Path, a: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"A": a})


@pytest.mark.parametrize("bits,symmetric", [(4, False), (8, False), (4, True), (8, True)])
def test_odd_block_count_and_shared_weight(tmp_path, bits, symmetric):
    rng = np.random.default_rng(0)
    t = rtn(rng.standard_normal((40, 48)).astype(np.float32), "w", "linear", bits, 16, symmetric)  # 3 blocks
    path = tmp_path / "m.onnx"
    onnx.save_model(matmul_model({"w_t": np.ascontiguousarray(t.dequantized().T)}, shared=2), str(path))
    a = rng.standard_normal((2, 48)).astype(np.float32)
    before = run_all(path, a)
    stats = apply_block_quantization(path, [t])  # in place
    after = run_all(path, a)
    diff = max(float(np.abs(x - y).max()) for x, y in zip(before, after))
    print(f"bits={bits} symmetric={symmetric}: shared weight, 3 blocks, max abs diff {diff:.2e}")
    assert stats.matmul_nbits == 2 and diff < 1e-4
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT] == ["w_Q%d_scales" % bits]
    zp = [i for i in model.graph.initializer if i.name.endswith("_zero_points")]
    if symmetric:
        assert zp == []
    else:
        assert list(zp[0].dims) == [40, 2 if bits == 4 else 3]  # 4 bits: 3 blocks -> 2 bytes per row (padded)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temp files


def test_unsupported_group_size_is_skipped(tmp_path):
    rng = np.random.default_rng(0)
    t = rtn(rng.standard_normal((8, 24)).astype(np.float32), "w", "linear", 4, 8, True)
    path = tmp_path / "m.onnx"
    onnx.save_model(matmul_model({"w_t": np.ascontiguousarray(t.dequantized().T)}), str(path))
    stats = apply_block_quantization(path, [t])
    assert stats.matmul_nbits == 0 and stats.unmatched == [] and stats.skipped[0][0] == "w"
    assert "power of two" in stats.skipped[0][1]
    assert [n.op_type for n in onnx.load(str(path)).graph.node] == ["MatMul"]


def test_external_data_switch_and_no_leftovers(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    tensors = [rtn(rng.standard_normal((32, 64)).astype(np.float32), f"w{i}", "linear", 4, 32, True) for i in range(2)]
    path = tmp_path / "model.onnx"
    model = matmul_model({f"w{i}_t": np.ascontiguousarray(t.dequantized().T) for i, t in enumerate(tensors)})
    onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx_data", size_threshold=0)
    a = rng.standard_normal((2, 64)).astype(np.float32)
    before = run_all(path, a)

    stats = apply_block_quantization(path, tensors[:1], external_data=True)
    assert stats.matmul_nbits == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]  # old data file gone

    stats = apply_block_quantization(path, tensors[1:], external_data=False)
    assert stats.matmul_nbits == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    after = run_all(path, a)
    assert max(float(np.abs(x - y).max()) for x, y in zip(before, after)) < 1e-4

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bq.onnx, "save_model", broken_save)
    with pytest.raises(OSError):
        apply_block_quantization(path, tensors, output_path=tmp_path / "other.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def gather_model(table: np.ndarray) -> onnx.ModelProto:
    node = helper.make_node("Gather", ["table", "ids"], ["Y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("bits,symmetric", [(4, False), (8, False), (4, True), (8, True)])
def test_gather_block_quantized(tmp_path, bits, symmetric):
    rng = np.random.default_rng(0)
    t = rtn(rng.standard_normal((50, 48)).astype(np.float32), "emb", "embedding", bits, 16, symmetric)  # 3 blocks
    path = tmp_path / "m.onnx"
    onnx.save_model(gather_model(t.dequantized()), str(path))
    stats = apply_block_quantization(path, [t])
    ids = np.array([[0, 49, 7, 7, 23]], dtype=np.int64)
    (out,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})
    assert stats.gather_block_quantized == 1 and stats.skipped == []
    assert np.array_equal(out, t.dequantized()[ids])
    assert [n.op_type for n in onnx.load(str(path)).graph.node] == ["GatherBlockQuantized"]


def test_gather_left_float_when_op_unusable(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    t = rtn(rng.standard_normal((50, 32)).astype(np.float32), "emb", "embedding", 4, 16, True)
    path = tmp_path / "m.onnx"
    onnx.save_model(gather_model(t.dequantized()), str(path))
    monkeypatch.setattr(bq, "_gather_problem", lambda *args: "not supported here")
    stats = apply_block_quantization(path, [t])
    assert stats.gather_block_quantized == 0 and stats.skipped == [("emb", "not supported here")]
    assert [n.op_type for n in onnx.load(str(path)).graph.node] == ["Gather"]


def test_gather_probe_detects_wrong_layout(monkeypatch):
    real_pack = bq._pack

    def high_nibble_first(codes, bits):
        packed = real_pack(codes, bits)
        return (packed >> 4) | (packed << 4) if bits == 4 else packed

    bq._gather_problem.cache_clear()
    monkeypatch.setattr(bq, "_pack", high_nibble_first)
    try:
        assert "wrong values" in bq._gather_problem(4, 16, True)
        assert bq._gather_problem(8, 16, True) is None
    finally:
        bq._gather_problem.cache_clear()
