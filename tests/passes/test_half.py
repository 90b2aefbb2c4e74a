"""`type: half`: fp16 ONNX with overflow-prone parts in fp32, fp16/bf16 safetensors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from safetensors import safe_open

import llmopt
from llmopt.errors import InputError, RecipeError
from llmopt.passes.half import overflowing_modules
from llmopt.pipeline import plan
from tests.conftest import tiny_llama

CALIBRATION = "calibration: {samples: 4, seq_len: 64}\n"


def _overflowing_model_dir(tmp_path, tokenizer):
    """Layer 0's up_proj output far beyond fp16's range, scaled back by down_proj: same float function class."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1e6)
        model.model.layers[0].mlp.down_proj.weight.div_(1e6)
    folder = tmp_path / "overflowing"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _onnx_types(folder):
    graph = onnx.load(str(folder / "model.onnx")).graph
    return {init.name: init.data_type for init in graph.initializer}, graph


@pytest.mark.slow
def test_fp16_onnx_halves_the_weights_keeps_norms_fp32_and_matches(tiny_model_dir, fast_recipe, tmp_path):
    result = llmopt.optimize(fast_recipe("passes:\n  - type: half\n" + CALIBRATION), model=str(tiny_model_dir),
                             output=tmp_path / "out")
    report = result.report
    types, graph = _onnx_types(result.output)
    matmul_weights = [n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in types]
    assert matmul_weights and all(types[w] == onnx.TensorProto.FLOAT16 for w in matmul_weights)
    norms = [n for n in graph.node if "LayerNormalization" in n.op_type]
    assert norms and all(types[n.input[-1]] == onnx.TensorProto.FLOAT for n in norms)  # fp32 weights: fp32 norms
    assert {i.type.tensor_type.elem_type for i in graph.input if i.name.startswith("past")} == \
        {onnx.TensorProto.FLOAT16}
    assert next(o for o in graph.output if o.name == "logits").type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert report.export["dtype"] == "float16" and report.export["writer"] == "direct"
    assert 0 < report.export["fp32_nodes"] < report.export["compute_nodes"]
    assert report.optimized.size_bytes < 0.6 * report.baseline.size_bytes
    assert report.validation.passed and report.validation.max_abs_logit_diff < 0.05
    assert report.quality.top1_agreement > 0.98


@pytest.mark.slow
def test_overflowing_modules_are_found_on_calibration_text_and_kept_fp32(tiny_tokenizer, fast_recipe, tmp_path):
    from llmopt.evaluation.runners import TorchRunner, load_runner
    from llmopt.blocks import model_blocks
    from llmopt.exporters.onnx_writer import write_decoder
    from tests.passes.test_quantize import _windows

    folder = _overflowing_model_dir(tmp_path, tiny_tokenizer)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    peaks = overflowing_modules(model, _windows(tiny_tokenizer, 100_000, 2, 64))
    assert "model.layers.0.mlp.up_proj" in peaks and all(v > 32752 for v in peaks.values())
    assert not any(name.startswith("model.layers.1") for name in peaks)

    result = llmopt.optimize(fast_recipe("passes:\n  - type: half\n" + CALIBRATION), model=str(folder),
                             output=tmp_path / "kept")
    info = result.report.passes[0].info
    assert "model.layers.0.mlp.up_proj" in info["overflowing_modules"]
    types, _ = _onnx_types(result.output)
    assert types["/model/layers.0/mlp/up_proj.weight_T"] == onnx.TensorProto.FLOAT  # its parent mlp is kept
    assert types["/model/layers.1/mlp/up_proj.weight_T"] == onnx.TensorProto.FLOAT16
    assert result.report.validation.passed and np.isfinite(result.report.optimized.perplexity)
    ids = np.asarray(tiny_tokenizer("The capital of France is")["input_ids"], dtype=np.int64)
    reference = TorchRunner(model).logits(ids)
    kept = load_runner(result.output, "onnx", 1).logits(ids)

    # The same graph with nothing kept: up_proj's output leaves fp16's range (inf, then NaN) or is far off.
    (tmp_path / "unsafe").mkdir()
    write_decoder(model, model_blocks(model, {}), tmp_path / "unsafe", keep_fp32=[])
    model.config.save_pretrained(tmp_path / "unsafe")
    unsafe = load_runner(tmp_path / "unsafe", "onnx", 1).logits(ids)
    kept_error = np.abs(kept - reference).max()
    assert np.isfinite(kept).all() and kept_error < 0.05
    assert not np.isfinite(unsafe).all() or np.abs(unsafe - reference).max() > 10 * kept_error


def test_a_decoder_layer_that_overflows_keeps_nothing_more(tiny_tokenizer):
    """A decoder layer's output is the residual stream, fp32 in the graph: its overflow keeps no module (and an
    overflowing embedding keeps its table, not the whole model)."""
    from llmopt.passes.half import HalfConfig, HalfPass
    from llmopt.state import ModelState, PassContext
    from tests.passes.test_quantize import _windows

    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e7)  # the stream itself, not any block, beyond fp16's range
    ctx = PassContext(calibration=lambda: _windows(tiny_tokenizer, 100_000, 2, 32))
    state = HalfPass(HalfConfig()).run(ModelState(model, tiny_tokenizer), ctx)
    assert "model.layers.0" in state.pass_info["half"]["overflowing_modules"]
    keep = state.precision["keep_fp32"]
    assert "model.embed_tokens" in keep and "model" not in keep and "model.layers.0" not in keep


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.slow
def test_half_safetensors_stores_and_runs_in_its_dtype(dtype, tiny_tokenizer, fast_recipe, tmp_path):
    from tests.conftest import tiny_llama as build

    folder = tmp_path / "tied"
    build(tie=True).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    result = llmopt.optimize(fast_recipe(f"passes:\n  - {{type: half, dtype: {dtype}}}\n" + CALIBRATION
                                         + "export: {format: safetensors}\n"), model=str(folder), output=tmp_path / "o")
    config = json.loads((result.output / "config.json").read_text())
    assert config["torch_dtype"] == dtype
    with safe_open(str(result.output / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert {str(f.get_tensor(n).dtype) for n in names} == {f"torch.{dtype}"}
    assert "lm_head.weight" not in names  # the tied table is stored once
    report = result.report
    assert report.optimized.size_bytes < 0.55 * report.baseline.size_bytes
    assert report.validation.passed and report.quality.top1_agreement > 0.95


def test_fp16_safetensors_refuses_a_model_that_overflows(tiny_tokenizer, fast_recipe, tmp_path):
    folder = _overflowing_model_dir(tmp_path, tiny_tokenizer)
    with pytest.raises(InputError, match=r"beyond fp16's safe range .*largest: model\.layers\.0\.mlp\.up_proj") as exc:
        llmopt.optimize(fast_recipe("passes:\n  - type: half\n" + CALIBRATION + "export: {format: safetensors}\n"),
                        model=str(folder), output=tmp_path / "o")
    assert "dtype: bfloat16" in exc.value.hint
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("body, message", [
    ("passes:\n  - {type: half, dtype: bfloat16}\n", r"passes\[0\]\.dtype: bfloat16 is for safetensors"),
    ("passes:\n  - {type: half, keep_fp32: ['*.mlp']}\nexport: {format: safetensors}\n", "keep_fp32 applies to ONNX"),
])
def test_unsupported_combinations_are_refused_at_plan_time(body, message, tiny_model_dir, fast_recipe):
    with pytest.raises(RecipeError, match=message):
        plan(fast_recipe(body), model=str(tiny_model_dir))


def test_keep_fp32_patterns_must_match_a_module(tiny_model_dir, fast_recipe, tmp_path):
    with pytest.raises(InputError, match=r"keep_fp32 pattern\(s\) '\*\.mlpp' match no module"):
        llmopt.optimize(fast_recipe("passes:\n  - {type: half, keep_fp32: ['*.mlpp']}\n" + CALIBRATION),
                        model=str(tiny_model_dir), output=tmp_path / "o")
