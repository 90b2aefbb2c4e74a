"""End to end on a tiny random Llama: both exporters, report, manifest, checks, atomic output."""

from __future__ import annotations

import json

import numpy as np
import pytest

import llmopt
from llmopt.artifact import verify_manifest, write_manifest
from llmopt.errors import ResultValidationError
from llmopt.evaluation.report import read_report
from tests.conftest import assert_report_matches_schema
from tests.cli.test_cli import assert_clean_error, llmopt as run_cli

INT4 = "passes:\n  - type: quantize\n    bits: 4\n    group_size: 16\n    embeddings: true\n"


@pytest.fixture(scope="module")
def onnx_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx-run")
    recipe = tmp / "r.yaml"
    recipe.write_text(INT4 + "evaluation:\n  max_tokens: 256\n  window: 64\n  speed: {prompt_tokens: 8, new_tokens: 4, runs: 1}\n"
                      "checks:\n  max_size_ratio: 0.5\n")
    return llmopt.optimize(recipe, model=str(tiny_model_dir), output=tmp / "out")


@pytest.mark.slow
def test_onnx_artifact_runs_in_onnxruntime(onnx_run, tiny_tokenizer):
    import onnx

    from tests.conftest import optimum_generate

    out = onnx_run.output
    ops = {n.op_type for n in onnx.load(out / "model.onnx", load_external_data=False).graph.node}
    # Written directly: every linear and the embedding as the pass's codes, attention fused.
    assert {"MatMulNBits", "GatherBlockQuantized", "GroupQueryAttention"} <= ops and "MatMul" not in ops
    from llmopt.evaluation.runners import OrtRunner

    prompt = tiny_tokenizer("def f(x):")["input_ids"]
    # optimum drives the graph to the tokens llmopt's own loop (the one the report measures) gets from it.
    ours = OrtRunner(out).generate(np.asarray(prompt), 12).tolist()
    assert optimum_generate(out, prompt, 12) == ours and len(ours) == len(prompt) + 12


def test_report_has_both_models_side_by_side(onnx_run):
    report = read_report(onnx_run.output)
    b, o = report.baseline, report.optimized
    print(f"size {b.size_bytes} -> {o.size_bytes}, ppl {b.perplexity:.1f} -> {o.perplexity:.1f}, "
          f"kl {report.quality.kl_divergence:.4f}, decode {b.decode_tokens_per_s:.1f} -> {o.decode_tokens_per_s:.1f}")
    assert o.size_bytes < 0.5 * b.size_bytes
    assert b.runtime == o.runtime == "onnxruntime"
    assert b.parameters == o.parameters
    assert report.quality.tokens == 256 and report.quality.windows == 4
    assert 0 <= report.quality.top1_agreement <= 1 and report.quality.kl_divergence >= 0
    assert b.perplexity > 1 and o.perplexity > 1
    assert o.decode_tokens_per_s > 0 and o.prefill_ms > 0
    assert report.validation.passed and report.validation.max_abs_logit_diff < 1e-3
    assert [p.type for p in report.passes] == ["quantize"] and report.passes[0].info["bits"] == 4
    assert report.checks[0].name == "max_size_ratio" and report.checks[0].passed and onnx_run.passed
    assert "threads" in report.environment and "cpu" in report.environment
    markdown = (onnx_run.output / "report.md").read_text()
    assert "| perplexity |" in markdown and "MatMul" not in markdown
    # The tiny model: 2 layers x 2 KV heads x 16 dims x (K + V) x 4 bytes, at its 512-token context.
    assert b.kv_cache_bytes_per_token == o.kv_cache_bytes_per_token == 2 * 2 * 16 * 2 * 4
    assert report.kv_cache_context_tokens == 512 and "| KV cache at 512 tokens (MB, fp32) | 0.262 |" in markdown
    # Per-layer error of the int4 model, growing with depth as errors accumulate; greedy samples of both.
    assert len(report.layer_errors) == 2 and 0 < report.layer_errors[0] < 0.1, report.layer_errors
    assert [s["prompt"] for s in report.samples] == ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    assert all(isinstance(s["baseline"], str) and isinstance(s["optimized"], str) for s in report.samples)
    assert "## Per-layer error" in markdown and "## Generation samples (greedy)" in markdown
    assert_report_matches_schema(onnx_run.output)
    assert o.peak_load_mb is not None and o.peak_decode_mb is not None


def test_manifest_lists_every_file_and_detects_tampering(onnx_run, tmp_path):
    import shutil

    manifest = json.loads((onnx_run.output / "manifest.json").read_text())
    assert {"model.onnx", "report.json", "report.md", "config.json"} <= set(manifest["files"])
    assert manifest["recipe"]["passes"][0]["type"] == "quantize" and manifest["seed"] == 0
    assert "torch" in manifest["versions"]
    assert verify_manifest(onnx_run.output) == []
    copy = tmp_path / "copy"
    shutil.copytree(onnx_run.output, copy)
    (copy / "report.md").write_text("edited")
    assert verify_manifest(copy) == ["changed report.md"]
    (copy / "model.onnx.data").write_bytes(b"stale")
    (copy / "tokenizer.json").unlink()
    assert verify_manifest(copy) == ["changed report.md", "missing tokenizer.json", "unexpected model.onnx.data"]

    proc = run_cli("verify", str(onnx_run.output), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["intact"] is True, proc.stderr
    assert_clean_error(run_cli("verify", str(copy)), 4, "does not match its manifest", "changed report.md",
                       "unexpected model.onnx.data")
    assert_clean_error(run_cli("verify", str(copy / "nothing")), 3, "is not a folder")


def test_safetensors_artifact_packs_int4_and_loads_in_transformers(tiny_model_dir, fast_recipe, tmp_path, tiny_tokenizer):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from llmopt.evaluation.runners import TorchRunner

    result = llmopt.optimize(fast_recipe(INT4 + "export: {format: safetensors}\n"), model=str(tiny_model_dir),
                             output=tmp_path / "st")
    config = json.loads((result.output / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert q["config_groups"]["group_0"]["weights"]["num_bits"] == 4 and q["config_groups"]["group_0"]["weights"]["group_size"] == 16
    assert q["ignore"] == []  # every Linear, lm_head included (untied here), is packed
    with safe_open(result.output / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("model.layers.0.mlp.up_proj.weight_packed")
    assert "model.layers.0.mlp.up_proj.weight" not in keys and packed.dtype == torch.int32
    assert packed.shape == (128, 64 * 4 // 32)  # eight 4-bit codes per int32
    assert result.report.export["packed_tensors"] == 15 and result.report.export["dequantized_tensors"] == 1
    assert result.report.optimized.size_bytes < 0.6 * result.report.baseline.size_bytes

    # transformers' own compressed-tensors loader gives back exactly the model that was evaluated.
    ids = np.array(tiny_tokenizer("def f(x): return x + 1")["input_ids"])
    packed_model = AutoModelForCausalLM.from_pretrained(result.output)  # CompressedLinear, unpacked per call
    dense = AutoModelForCausalLM.from_pretrained(result.output, quantization_config=CompressedTensorsConfig(run_compressed=False))
    reference = TorchRunner.load(tiny_model_dir)
    for model in (packed_model, dense):
        got = TorchRunner(model).logits(ids)
        assert np.isfinite(got).all()
    w = dense.model.layers[0].mlp.up_proj.weight
    assert len(torch.unique(w[0, :16])) <= 16  # the 4-bit grid
    diff = np.abs(TorchRunner(packed_model).logits(ids) - TorchRunner(dense).logits(ids)).max()
    assert diff < 1e-4, diff
    loaded = TorchRunner.load(result.output)  # how the report measures it: no per-call fake quantization
    assert not any("forward" in m.__dict__ for m in loaded.model.modules())
    dense32 = AutoModelForCausalLM.from_pretrained(result.output, dtype=torch.float32,
                                                   quantization_config=CompressedTensorsConfig(run_compressed=False))
    assert np.abs(loaded.logits(ids) - TorchRunner(dense32).logits(ids)).max() < 1e-5
    assert result.report.validation.passed  # an in-memory run always checks its artifact
    assert np.abs(reference.logits(ids) - TorchRunner(dense).logits(ids)).max() > 0  # it is quantized
    assert TorchRunner(dense).generate(ids, 3).shape[0] == len(ids) + 3
    assert (result.output / "tokenizer.json").is_file() and (result.output / "generation_config.json").is_file()
    assert any("pack-quantized" in note for note in result.report.notes)


def test_asymmetric_groups_are_stored_packed_with_their_zero_points(tiny_model_dir, fast_recipe, tmp_path):
    recipe = fast_recipe("passes:\n  - type: quantize\n    bits: 4\n    group_size: 16\n    symmetric: false\n"
                         "export: {format: safetensors}\n")
    result = llmopt.optimize(recipe, model=str(tiny_model_dir), output=tmp_path / "asym")
    config = json.loads((result.output / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["symmetric"] is False
    assert result.report.export["quantized_storage"] == "pack-quantized"
    assert result.report.validation.passed and result.report.validation.max_abs_logit_diff < 1e-4
    assert result.report.optimized.size_bytes < 0.4 * result.report.baseline.size_bytes


@pytest.mark.slow
def test_failed_check_exits_1_and_keeps_the_report(tiny_model_dir, fast_recipe, tmp_path):
    recipe = fast_recipe(INT4 + "export: {format: safetensors}\nchecks:\n  max_size_mb: 0.001\n")
    proc = run_cli("optimize", str(recipe), "--model", str(tiny_model_dir), "--output", str(tmp_path / "o"),
                   "--junit-xml", str(tmp_path / "junit.xml"))
    assert_clean_error(proc, 1, "Quality checks failed", "max_size_mb")
    report = read_report(tmp_path / "o")
    assert [(c.name, c.passed) for c in report.checks] == [("max_size_mb", False)]

    import xml.etree.ElementTree as ET

    suite = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("2", "1", "0")
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    assert failed == ["check max_size_mb"]


@pytest.mark.slow
def test_junit_xml_records_an_error_when_the_run_fails(tiny_model_dir, fast_recipe, tmp_path):
    import xml.etree.ElementTree as ET

    recipe = fast_recipe(INT4 + "export:\n  accuracy_level: 4\n  validate: {max_abs_logit_diff: 1.0e-12}\n")
    proc = run_cli("optimize", str(recipe), "--model", str(tiny_model_dir), "--output", str(tmp_path / "o"),
                   "--junit-xml", str(tmp_path / "junit.xml"))
    assert proc.returncode == 4 and not (tmp_path / "o").exists()
    [case] = ET.parse(tmp_path / "junit.xml").getroot().iter("testcase")
    assert case.find("error").get("type") == "ResultValidationError"
    assert "does not reproduce" in case.find("error").get("message")


def test_failed_run_leaves_previous_artifact_intact(tiny_model_dir, fast_recipe, tmp_path, monkeypatch):
    from llmopt.passes.quantize import QuantizePass

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_text("previous good artifact")
    write_manifest(out, recipe={}, versions={}, seed=0)  # an artifact: what --force may replace

    def explode(self, state, ctx):
        raise RuntimeError("simulated crash in a pass")

    monkeypatch.setattr(QuantizePass, "run", explode)
    with pytest.raises(RuntimeError, match="simulated crash"):
        llmopt.optimize(fast_recipe(INT4), model=str(tiny_model_dir), output=out, force=True)
    assert (out / "model.onnx").read_text() == "previous good artifact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yaml"]  # no staging left behind


@pytest.mark.slow
def test_force_replaces_only_when_complete(tiny_model_dir, fast_recipe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    write_manifest(out, recipe={}, versions={}, seed=0)
    recipe = fast_recipe(INT4 + "export: {format: safetensors}\n")
    llmopt.optimize(recipe, model=str(tiny_model_dir), output=out, force=True)
    assert not (out / "stale.txt").exists() and verify_manifest(out) == []


def test_result_validation_failure_writes_nothing(tiny_model_dir, fast_recipe, tmp_path):
    recipe = fast_recipe(INT4 + "export:\n  accuracy_level: 4\n  validate: {max_abs_logit_diff: 1.0e-12}\n")
    with pytest.raises(ResultValidationError, match="does not reproduce"):
        llmopt.optimize(recipe, model=str(tiny_model_dir), output=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


@pytest.mark.slow
def test_compare_two_reports(onnx_run, tiny_model_dir, fast_recipe, tmp_path):
    other = llmopt.optimize(fast_recipe(INT4.replace("bits: 4", "bits: 8")), model=str(tiny_model_dir),
                            output=tmp_path / "int8")
    md = run_cli("compare", str(onnx_run.output), str(other.output / "report.json"), "--format", "md")
    assert md.returncode == 0, md.stderr
    assert "| size on disk (MB) |" in md.stdout and "int8" in md.stdout
    data = json.loads(run_cli("compare", str(onnx_run.output), str(other.output), "--format", "json").stdout)
    size = next(r for r in data["comparisons"][0]["rows"] if r["metric"] == "size on disk (MB)")
    assert size["b"] > size["a"] and size["better"] is False and size["change_pct"] > 0 and size["significant"]
    front = [r["pareto"] for r in data["runs"]]
    assert all(isinstance(p, bool) for p in front) and any(front)  # a front is never empty
    table = run_cli("compare", str(onnx_run.output), str(other.output), str(onnx_run.output / "report.json"))
    assert table.returncode == 0 and "perplexity" in table.stdout and "Pareto front" in table.stdout, table.stderr
    assert_clean_error(run_cli("compare", str(tmp_path / "missing"), str(other.output)), 3, "No report")


@pytest.mark.parametrize("fmt", ["onnx", "safetensors"])
def test_the_checkpoints_generation_config_is_kept(fmt, tiny_model_dir, fast_recipe, tmp_path):
    """Sampling settings without do_sample (as many checkpoints ship them) make transformers refuse to save the
    generation config; the artifact keeps the checkpoint's file as it is, stop tokens and all."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    given = '{"do_sample": false, "temperature": 0.6, "top_p": 0.9, "bos_token_id": 1, "eos_token_id": [2, 3]}'
    (model / "generation_config.json").write_text(given)
    result = llmopt.optimize(fast_recipe(f"export: {{format: {fmt}}}\n"),
                             model=str(model), output=tmp_path / "out")
    assert (result.output / "generation_config.json").read_text() == given
    assert verify_manifest(result.output) == []
    assert any(n.startswith("generation_config.json copied as the checkpoint has it") for n in result.report.notes)


def test_the_onnx_export_shows_its_blocks_as_they_are_written(tiny_model_dir, tmp_path):
    import json as _json

    recipe = tmp_path / "r.yaml"
    recipe.write_text(INT4 + "evaluation: {enabled: false}\n")

    from tests.conftest import ProgressRecorder

    progress = ProgressRecorder()
    llmopt.optimize(recipe, model=str(tiny_model_dir), output=tmp_path / "out", progress=progress)
    layers = _json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
    written = [(done, total) for step, done, total in progress.advances if step == "export onnx"]
    assert written == [(i, layers + 2) for i in range(1, layers + 3)]  # the embedding, each layer, the final block
