"""fuse: the pass's settings as the ONNX exporter writes them (fused op counts, packed projections that keep the
logits to the last bit, genai_config.json and the in-place KV cache), retired switches refused, and safetensors +
fuse refused at plan time. The fused graph itself is checked against PyTorch per family in
tests/exporters/test_onnx_writer.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import llmopt
from llmopt.errors import RecipeError
from llmopt.pipeline import plan


def _op_counts(folder: Path) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node))


def test_retired_switches_are_refused_with_the_reason(tiny_model_dir, fast_recipe):
    from llmopt.passes.fuse import FuseConfig

    assert FuseConfig(attention=True).pack_projections  # `true` is what the writer does anyway: accepted
    with pytest.raises(RecipeError) as err:
        plan(fast_recipe("passes:\n  - {type: fuse, attention: false, norms: false}\n"), model=str(tiny_model_dir))
    assert "attention, norms: false is no longer possible" in str(err.value)
    assert "export safetensors" in str(err.value)


FUSE_INT4 = ("passes:\n  - type: quantize\n    bits: 4\n    group_size: 32\n    embeddings: true\n"
             "  - type: fuse\n")


@pytest.mark.slow
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


@pytest.mark.slow
def test_fuse_with_safetensors_is_refused_at_plan_time(tiny_model_dir, fast_recipe):
    recipe = fast_recipe("passes:\n  - type: fuse\nexport: {format: safetensors}\n")
    with pytest.raises(RecipeError) as err:
        plan(recipe, model=str(tiny_model_dir))
    assert err.value.message == ("passes[0].type: fuse writes onnxruntime's fused operators into the exported ONNX "
                                 "graph and needs export.format: onnx (got safetensors).")
    proc = subprocess.run([sys.executable, "-m", "llmopt", "validate", str(recipe), "--model", str(tiny_model_dir)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "needs export.format: onnx (got safetensors)" in proc.stderr and "Traceback" not in proc.stderr
