"""fuse: each graph rewrite on its own and all together, on tiny Llama and Gemma exports (fused op counts,
logits and KV cache against the unfused graph over several decode steps), ORTModelForCausalLM driving the
fused model, fuse + quantize end to end, and safetensors + fuse refused at plan time."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import llmopt
from llmopt.errors import RecipeError
from llmopt.exporters.onnx_fuse import attention_shape, fuse_file, rewrite_file
from llmopt.exporters.onnx_pack import pack_graph
from llmopt.pipeline import plan
from tests.conftest import TINY_VOCAB, tiny_llama

SWITCHES = ("attention", "rotary", "norms", "activations")
# What each switch must produce on a Llama export (2 layers: q and k rotated in each).
LLAMA_OPS = {
    "attention": {"GroupQueryAttention": 2},
    "rotary": {"RotaryEmbedding": 4},
    "norms": {"SkipSimplifiedLayerNormalization": 4, "SimplifiedLayerNormalization": 1},
    "activations": {"QuickGelu": 2},
}


def tiny_gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    config = GemmaConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GemmaForCausalLM(config).eval()


def _randomize_norms(model):
    """Norm weights away from their init (all ones or zeros), so a wrong norm fusion shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def _export(model, folder: Path) -> Path:
    from optimum.exporters.onnx import onnx_export_from_model

    onnx_export_from_model(model, output=folder, task="text-generation-with-past", do_validation=False)
    return folder


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory) -> Path:
    return _export(_randomize_norms(tiny_llama()), tmp_path_factory.mktemp("llama-onnx"))


@pytest.fixture(scope="module")
def gemma_export(tmp_path_factory) -> Path:
    return _export(_randomize_norms(tiny_gemma()), tmp_path_factory.mktemp("gemma-onnx"))


def _fused_copy(src: Path, dst: Path, **switches: bool):
    shutil.copytree(src, dst)
    from transformers import AutoConfig

    stats = fuse_file(dst / "model.onnx", attention_shape(AutoConfig.from_pretrained(src)), **switches)
    return dst, stats


def _packed_copy(src: Path, dst: Path, **switches: bool):
    """Fused (all rewrites) then packed, as the exporter does."""
    _fused_copy(src, dst)
    return dst, rewrite_file(dst / "model.onnx", lambda model: pack_graph(model, **switches))


def _decode(folder: Path, prompt: np.ndarray, steps: int) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Prefill then greedy decode with the KV cache fed back by hand: logits and cache at each step."""
    import onnxruntime as ort
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    past = [np.zeros((1, heads, 0, head_dim), np.float32)] * (2 * config.num_hidden_layers)  # (B, kv, T, hd)
    ids, logits_seen, caches = prompt[None], [], []
    for _ in range(steps + 1):
        done = past[0].shape[2]
        feed = {"input_ids": ids, "attention_mask": np.ones((1, done + ids.shape[1]), np.int64),
                "position_ids": np.arange(done, done + ids.shape[1])[None]}
        for layer in range(config.num_hidden_layers):
            feed[f"past_key_values.{layer}.key"], feed[f"past_key_values.{layer}.value"] = past[2 * layer:2 * layer + 2]
        logits, *past = session.run(None, {k: v for k, v in feed.items() if k in wanted})
        logits_seen.append(logits[0])
        caches.append(past)
        ids = logits[:, -1:].argmax(-1)
    return logits_seen, caches


def _assert_same_outputs(unfused: Path, fused: Path, tol: float = 1e-4) -> None:
    rng = np.random.default_rng(0)
    for prompt_len in (1, 7, 19):
        prompt = rng.integers(3, TINY_VOCAB, prompt_len).astype(np.int64)
        ref_logits, ref_cache = _decode(unfused, prompt, steps=4)
        got_logits, got_cache = _decode(fused, prompt, steps=4)
        for step, (a, b) in enumerate(zip(ref_logits, got_logits)):
            err = float(np.abs(a - b).max())
            print(f"prompt {prompt_len} step {step}: max |Δlogit| {err:.2e}")
            assert a.shape == b.shape and err < tol, f"step {step}: err={err:.2e}"
        cache_err = max(float(np.abs(a - b).max()) for a, b in zip(ref_cache[-1], got_cache[-1]))
        assert cache_err < tol, f"cache err={cache_err:.2e}"
        assert [c.shape for c in ref_cache[-1]] == [c.shape for c in got_cache[-1]]


def _op_counts(folder: Path) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node))


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_rewrite_on_its_own_keeps_the_logits(llama_export, tmp_path, switch):
    fused, stats = _fused_copy(llama_export, tmp_path / switch, **{s: s == switch for s in SWITCHES})
    print(switch, stats.counts, stats.unfused)
    assert stats.counts == LLAMA_OPS[switch]
    assert _op_counts(fused).items() >= LLAMA_OPS[switch].items()
    assert stats.unfused == []
    _assert_same_outputs(llama_export, fused)


def test_all_rewrites_together_on_llama(llama_export, tmp_path):
    fused, stats = _fused_copy(llama_export, tmp_path / "all")
    expected = {op: n for ops in LLAMA_OPS.values() for op, n in ops.items()}
    print(stats.counts, stats.nodes_before, "->", stats.nodes_after)
    assert stats.counts == expected
    assert stats.nodes_after < stats.nodes_before / 5
    ops = _op_counts(fused)
    assert "Softmax" not in ops and "Sigmoid" not in ops and "ReduceMean" not in ops  # nothing left unfused
    _assert_same_outputs(llama_export, fused)


def test_gemma_block_fuses_with_fast_gelu(gemma_export, tmp_path):
    """Gemma: GELU (tanh) MLP, (1 + w) RMSNorm, scaled embedding, head_dim set apart from hidden/heads."""
    fused, stats = _fused_copy(gemma_export, tmp_path / "gemma")
    print(stats.counts)
    assert stats.counts == {"GroupQueryAttention": 2, "RotaryEmbedding": 4, "SkipSimplifiedLayerNormalization": 4,
                            "SimplifiedLayerNormalization": 1, "FastGelu": 2}
    _assert_same_outputs(gemma_export, fused)


def test_unsupported_attention_is_left_as_it_was_and_reported(llama_export, tmp_path):
    """A Tanh between Q·Kᵀ and softmax (as logit soft-capping puts there) is not GroupQueryAttention."""
    import onnx.helper as oh

    src = tmp_path / "capped"
    shutil.copytree(llama_export, src)
    model = onnx.load(str(src / "model.onnx"))
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    model.graph.node.insert(list(model.graph.node).index(softmax),
                            oh.make_node("Tanh", [softmax.input[0]], ["capped_scores"], name="cap"))
    softmax.input[0] = "capped_scores"
    onnx.save(model, str(src / "model.onnx"))
    fused, stats = _fused_copy(src, tmp_path / "capped-fused")
    print(stats.counts, stats.unfused)
    assert stats.counts["GroupQueryAttention"] == 1
    assert len(stats.unfused) == 1 and stats.unfused[0].startswith("attention of layer ")
    assert "Tanh between Q·Kᵀ and softmax·V" in stats.unfused[0]
    _assert_same_outputs(src, fused)


def test_packed_qkv_and_gate_up_keep_the_logits(llama_export, tmp_path):
    """Q/K/V -> one MatMul read by GroupQueryAttention with its own rotary; gate/up -> one MatMul and a Split."""
    packed, stats = _packed_copy(llama_export, tmp_path / "packed")
    print(stats)
    assert (stats.qkv, stats.gate_up, stats.unpacked) == (2, 2, [])
    ops = _op_counts(packed)
    assert ops["MatMul"] == 2 * 4 + 1 and ops["Split"] == 2 and "RotaryEmbedding" not in ops
    model = onnx.load(str(packed / "model.onnx"))
    attention = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in attention.attribute}
    assert attrs["do_rotary"] == 1 and list(attention.input[1:3]) == ["", ""]
    cos = next(i for i in model.graph.initializer if i.name == attention.input[7])
    assert list(cos.dims) == [512, 8]  # trimmed to max_position_embeddings rows, head_dim / 2 columns
    assert "position_ids" in {i.name for i in model.graph.input}  # ORTModelForCausalLM still feeds it
    _assert_same_outputs(llama_export, packed)


def test_packing_concatenates_projection_biases(tmp_path):
    export = _export(_randomize_norms(tiny_llama(attention_bias=True, mlp_bias=True)), tmp_path / "biased")
    packed, stats = _packed_copy(export, tmp_path / "biased-packed")
    assert (stats.qkv, stats.gate_up) == (2, 2)
    _assert_same_outputs(export, packed)


def test_packing_only_qkv_leaves_the_mlp(llama_export, tmp_path):
    packed, stats = _packed_copy(llama_export, tmp_path / "qkv", gate_up=False)
    assert (stats.qkv, stats.gate_up) == (2, 0)
    assert _op_counts(packed)["MatMul"] == 2 * 5 + 1 and "Split" not in _op_counts(packed)
    _assert_same_outputs(llama_export, packed)


def test_gemma_packs_around_fast_gelu(gemma_export, tmp_path):
    packed, stats = _packed_copy(gemma_export, tmp_path / "gemma-packed")
    assert (stats.qkv, stats.gate_up, stats.unpacked) == (2, 2, [])
    _assert_same_outputs(gemma_export, packed)


def test_qkv_read_elsewhere_is_left_unpacked_and_reported(llama_export, tmp_path):
    """A projection whose output has a second reader cannot disappear into a packed matmul."""
    src = tmp_path / "extra-reader"
    _fused_copy(llama_export, src)
    model = onnx.load(str(src / "model.onnx"))
    attention = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    value = attention.input[2]
    model.graph.node.append(onnx.helper.make_node("Identity", [value], ["v_probe"], name="probe"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("v_probe", onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(src / "model.onnx"))
    stats = rewrite_file(src / "model.onnx", pack_graph)
    assert stats.qkv == 1 and len(stats.unpacked) == 1
    assert stats.unpacked[0] == (f"{attention.name}: Q/K/V kept as separate projections: "
                                 "a projection's output is read elsewhere too")


def test_ort_model_for_causal_lm_generates_the_same_tokens(llama_export, tmp_path):
    from llmopt.evaluation.runners import OrtRunner

    fused, _ = _fused_copy(llama_export, tmp_path / "fused")
    prompt = np.arange(5, 17, dtype=np.int64)
    ref, got = OrtRunner(llama_export).generate(prompt, 8), OrtRunner(fused).generate(prompt, 8)
    print(ref, got)
    assert len(got) == len(prompt) + 8 and np.array_equal(ref, got)
    err = float(np.abs(OrtRunner(llama_export).logits(prompt) - OrtRunner(fused).logits(prompt)).max())
    assert err < 1e-4, f"err={err:.2e}"


FUSE_INT4 = ("passes:\n  - type: quantize\n    bits: 4\n    group_size: 32\n    embeddings: true\n"
             "  - type: fuse\n")


def test_fuse_and_quantize_end_to_end(tiny_model_dir, fast_recipe, tmp_path):
    result = llmopt.optimize(fast_recipe(FUSE_INT4), model=str(tiny_model_dir), output=tmp_path / "out")
    export = result.report.export
    print(export, result.report.notes)
    assert export["matmul_nbits"] == 2 * 7 + 1  # q k v o gate up down per layer, and the lm_head
    assert export["fused_ops"]["GroupQueryAttention"] == 2
    assert export["fused_ops"]["SkipSimplifiedLayerNormalization"] == 4
    assert export["fused_ops"]["QuickGelu"] == 2
    assert "RotaryEmbedding" not in export["fused_ops"]  # inside GroupQueryAttention since Q/K/V were packed
    assert export["packed_projections"] == {"qkv": 2, "gate_up": 2}
    assert export["writer"] == "direct" and export["graph_nodes"]["written"] < 40
    ops = _op_counts(tmp_path / "out")
    # Packed: qkv, o, gate_up, down per layer, and the lm_head.
    assert ops["MatMulNBits"] == 2 * 4 + 1 and ops["GroupQueryAttention"] == 2 and "MatMul" not in ops
    assert result.report.validation.passed and result.report.validation.max_abs_logit_diff < 1e-3
    assert any("right-padded" in note for note in result.report.notes)
    assert result.report.passes[1].type == "fuse"
    # Packing concatenates the stored integers: the same logits as the unpacked graph, to the last bit.
    unpacked = llmopt.optimize(fast_recipe(FUSE_INT4 + "    pack_projections: false\n"), model=str(tiny_model_dir),
                               output=tmp_path / "unpacked")
    assert _op_counts(tmp_path / "unpacked")["MatMulNBits"] == 15
    prompt = np.arange(3, 40, dtype=np.int64)
    from llmopt.evaluation.runners import OrtRunner

    assert np.array_equal(OrtRunner(result.output).logits(prompt), OrtRunner(unpacked.output).logits(prompt))


def test_fused_attention_writes_genai_config_and_updates_the_cache_in_place(tiny_model_dir, fast_recipe, tmp_path):
    from llmopt.evaluation.runners import OrtRunner

    result = llmopt.optimize(fast_recipe("passes:\n  - type: fuse\n"), model=str(tiny_model_dir),
                             output=tmp_path / "out")
    genai = json.loads((result.output / "genai_config.json").read_text())
    decoder = genai["model"]["decoder"]
    assert genai["model"]["type"] == "llama" and genai["search"]["past_present_share_buffer"] is True
    assert (decoder["num_hidden_layers"], decoder["num_attention_heads"], decoder["num_key_value_heads"],
            decoder["head_size"]) == (2, 4, 2, 16)
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert decoder["session_options"]["provider_options"] == []  # the CPU
    assert "onnxruntime-genai (genai_config.json)" in result.report.export["runtimes"]
    assert any(note.startswith("genai_config.json written") for note in result.report.notes)
    # Float gate/up stay two matmuls (a Split costs more than the call it saves); Q/K/V are packed.
    assert result.report.export["packed_projections"] == {"qkv": 2, "gate_up": 0}
    assert _op_counts(result.output)["MatMul"] == 2 * 5 + 1 and "Split" not in _op_counts(result.output)
    assert any(note.startswith("gate/up kept as two matmuls") for note in result.report.notes)
    assert "model = og.Model(PATH)" in (result.output / "README.md").read_text()

    runner = OrtRunner(result.output)
    assert runner.loop.share_buffer
    prompt = np.arange(3, 30, dtype=np.int64)
    in_place = {n: runner.generate(prompt, n) for n in (0, 1, 12)}
    runner.loop.share_buffer = False
    growing = {n: runner.generate(prompt, n) for n in (0, 1, 12)}
    print(in_place[12][len(prompt):], growing[12][len(prompt):])
    for n in (0, 1, 12):  # no step, the prefill's token only, and decode steps into the bound logits buffer
        assert len(in_place[n]) == len(prompt) + n and np.array_equal(in_place[n], growing[n])


def test_unfused_attention_gets_no_genai_config(tiny_model_dir, fast_recipe, tmp_path):
    from llmopt.evaluation.runners import OrtRunner

    result = llmopt.optimize(fast_recipe("passes:\n  - type: fuse\n    attention: false\n"),
                             model=str(tiny_model_dir), output=tmp_path / "out")
    assert "GroupQueryAttention" not in result.report.export["fused_ops"]
    assert not (result.output / "genai_config.json").exists() and "runtimes" not in result.report.export
    assert "onnxruntime_genai" not in (result.output / "README.md").read_text()
    assert not OrtRunner(result.output).loop.share_buffer  # optimum's Concat cache cannot be updated in place


def test_fuse_with_safetensors_is_refused_at_plan_time(tiny_model_dir, fast_recipe):
    recipe = fast_recipe("passes:\n  - type: fuse\nexport: {format: safetensors}\n")
    with pytest.raises(RecipeError) as err:
        plan(recipe, model=str(tiny_model_dir))
    assert err.value.message == ("passes[0].type: fuse rewrites the exported ONNX graph to onnxruntime's fused "
                                 "operators and needs export.format: onnx (got safetensors).")
    proc = subprocess.run([sys.executable, "-m", "llmopt", "validate", str(recipe), "--model", str(tiny_model_dir)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "needs export.format: onnx (got safetensors)" in proc.stderr and "Traceback" not in proc.stderr
