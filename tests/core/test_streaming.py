"""Streaming quantization (llmopt.streaming): a checkpoint quantized layer by layer (RTN, GPTQ, AWQ) into
safetensors or ONNX, checked against the non-streaming path (the quantize pass on the loaded model, then the
exporters)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmopt.architectures import ARCHITECTURES
from llmopt.errors import InputError, RecipeError, ResourceError
from llmopt.evaluation.runners import OrtRunner, TorchRunner
from llmopt.exporters.safetensors import SafetensorsExporter
from llmopt.model import load_model, resolve_model
from llmopt.passes.quantize import QuantizeConfig, QuantizePass
from llmopt.recipe import ExportConfig
from llmopt.state import ModelState, PassContext
from llmopt.checkpoint_reader import CheckpointReader
from llmopt.streaming import quantize_checkpoint
from tests.conftest import tiny_llama


def _checkpoint(folder, tokenizer, *, tie=False, **save):
    model = tiny_llama(tie=tie)
    model.save_pretrained(folder, safe_serialization=True, **save)
    tokenizer.save_pretrained(folder)
    return model


def _quantized_in_memory(model, tokenizer, config):
    """The non-streaming path: the quantize pass on the whole torch model."""
    return QuantizePass(config).run(ModelState(model, tokenizer), PassContext())


@pytest.mark.parametrize("tie", [False, True])
def test_safetensors_stream_writes_the_exporters_file_byte_for_byte(tie, tiny_tokenizer, tmp_path):
    model = _checkpoint(tmp_path / "in", tiny_tokenizer, tie=tie)
    config = QuantizeConfig(group_size=32)
    state = _quantized_in_memory(model, tiny_tokenizer, config)
    (tmp_path / "ref").mkdir()
    SafetensorsExporter(ExportConfig(format="safetensors")).export(state, tmp_path / "ref")

    result = quantize_checkpoint(tmp_path / "in", tmp_path / "out", config, export_format="safetensors")

    assert (tmp_path / "out/model.safetensors").read_bytes() == (tmp_path / "ref/model.safetensors").read_bytes()
    assert json.loads((tmp_path / "out/config.json").read_text()) == json.loads((tmp_path / "ref/config.json").read_text())
    ids = np.array(tiny_tokenizer("def f(x):\n    return x")["input_ids"])
    diff = np.abs(TorchRunner.load(tmp_path / "out").logits(ids) - TorchRunner(state.model).logits(ids)).max()
    print(f"tie {tie}: {result.quantized_tensors} packed, {result.size_bytes} bytes, max |dlogit| {diff:.2e}")
    assert diff == 0
    assert result.quantized_tensors == 15  # 7 Linears x 2 layers + lm_head (untied from the table when tied)


def test_sharded_bf16_input_to_sharded_output(tiny_tokenizer, tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "in", safe_serialization=True, max_shard_size="60KB")
    tiny_tokenizer.save_pretrained(tmp_path / "in")
    assert (tmp_path / "in/model.safetensors.index.json").is_file()
    config = QuantizeConfig(group_size=32)
    loaded, _ = load_model(resolve_model(str(tmp_path / "in")))  # as the pipeline loads it: float32
    state = _quantized_in_memory(loaded, tiny_tokenizer, config)

    result = quantize_checkpoint(tmp_path / "in", tmp_path / "out", config, export_format="safetensors",
                                 max_shard_bytes=60_000)

    index = json.loads((tmp_path / "out/model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert result.info["shards"] == len(shards) > 2
    assert shards == sorted(p.name for p in (tmp_path / "out").glob("model-*.safetensors"))
    ids = np.array(tiny_tokenizer("import os\nprint(os.sep)")["input_ids"])
    diff = np.abs(TorchRunner.load(tmp_path / "out").logits(ids) - TorchRunner(state.model).logits(ids)).max()
    print(f"{len(shards)} shards, max |dlogit| {diff:.2e}")
    assert diff == 0


def _run_with_cache(folder, ids, prompt):
    """The ONNX graph driven as optimum drives it: a prefill of `prompt` tokens, then one token at a time."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    config = json.loads((folder / "config.json").read_text())
    kv_heads = config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    past = {f"past_key_values.{i}.{kind}": np.zeros((1, kv_heads, 0, head_dim), np.float32)
            for i in range(config["num_hidden_layers"]) for kind in ("key", "value")}
    names = [o.name for o in session.get_outputs()]
    logits, start = [], 0
    for end in [prompt, *range(prompt + 1, len(ids) + 1)]:
        feed = {"input_ids": ids[None, start:end], "attention_mask": np.ones((1, end), np.int64),
                "position_ids": np.arange(start, end)[None], **past}
        outputs = session.run(None, feed)
        logits.append(outputs[0][0])  # (end - start, vocab)
        past = {n.replace("present", "past_key_values"): v for n, v in zip(names[1:], outputs[1:], strict=True)}
        assert past["past_key_values.0.key"].shape == (1, kv_heads, end, head_dim)
        start = end
    return np.concatenate(logits)


@pytest.mark.parametrize("tie,symmetric,exclude", [(False, True, []), (True, True, []),
                                                   (False, False, ["*.down_proj"]), (True, True, ["lm_head"])])
def test_onnx_stream_matches_the_quantized_torch_model_with_kv_cache(tie, symmetric, exclude, tiny_tokenizer, tmp_path):
    model = _checkpoint(tmp_path / "in", tiny_tokenizer, tie=tie)
    config = QuantizeConfig(group_size=32, symmetric=symmetric, exclude=exclude)
    state = _quantized_in_memory(model, tiny_tokenizer, config)

    result = quantize_checkpoint(tmp_path / "in", tmp_path / "out", config, export_format="onnx")

    ids = np.array(tiny_tokenizer("for i in range(10):\n    print(i * 2)")["input_ids"], dtype=np.int64)
    with torch.no_grad():
        reference = state.model(torch.from_numpy(ids[None])).logits[0].numpy()  # (T, vocab)
    got = _run_with_cache(tmp_path / "out", ids, prompt=len(ids) - 4)  # prefill, then 4 decode steps
    diff = np.abs(got - reference).max()
    print(f"tie {tie} symmetric {symmetric} exclude {exclude}: {result.info['matmul_nbits']} MatMulNBits, "
          f"{len(ids)} tokens, max |dlogit| {diff:.2e} (logits up to {np.abs(reference).max():.2f})")
    assert diff < 1e-4
    assert result.info["matmul_nbits"] == len(state.quantized)  # the float Linears (excluded) as plain MatMul
    assert result.info["fused_ops"]["GroupQueryAttention"] == 2


def test_onnx_stream_generates_as_torch_through_optimum(tiny_tokenizer, tmp_path):
    model = _checkpoint(tmp_path / "in", tiny_tokenizer)
    config = QuantizeConfig(group_size=32)
    state = _quantized_in_memory(model, tiny_tokenizer, config)
    quantize_checkpoint(tmp_path / "in", tmp_path / "out", config)
    prompt = np.array(tiny_tokenizer("while True:")["input_ids"])

    runner = OrtRunner(tmp_path / "out")
    assert runner.loop.share_buffer  # genai_config.json: every layer's cache is GroupQueryAttention's, in place
    in_place = runner.generate(prompt, 8)
    runner.loop.share_buffer = False
    growing = runner.generate(prompt, 8)  # the cache as ORTModelForCausalLM feeds it, one longer a step
    torch_tokens = TorchRunner(state.model).generate(prompt, 8)
    print(f"onnx {in_place.tolist()} / {growing.tolist()}\ntorch {torch_tokens.tolist()}")
    assert in_place.tolist() == growing.tolist() == torch_tokens.tolist()
    genai = json.loads((tmp_path / "out" / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["num_hidden_layers"] == 2 and genai["search"]["past_present_share_buffer"]


def test_reader_reads_one_tensor_at_a_time_exactly(tiny_tokenizer, tmp_path):
    model = _checkpoint(tmp_path / "in", tiny_tokenizer)
    reader = CheckpointReader(tmp_path / "in")
    assert reader.layer_names(1) == sorted(n for n in model.state_dict() if n.startswith("model.layers.1."))
    weight = reader.read("model.layers.1.mlp.down_proj.weight")
    assert torch.equal(weight, model.model.layers[1].mlp.down_proj.weight)


def _streamed_beside_the_pass(config, tie, tokenizer, tmp_path):
    """The pass on the whole model, exported, and the same config streamed from its checkpoint on the same
    windows: the two safetensors files must be equal byte for byte. Returns the pass's state and the stream's
    result."""
    model = _checkpoint(tmp_path / "in", tokenizer, tie=tie)
    windows = _windows()
    state = QuantizePass(config).run(ModelState(model, tokenizer), PassContext(calibration=lambda: windows))
    (tmp_path / "ref").mkdir()
    SafetensorsExporter(ExportConfig(format="safetensors")).export(state, tmp_path / "ref")

    result = quantize_checkpoint(tmp_path / "in", tmp_path / "out", config, export_format="safetensors",
                                 calibration=windows)

    assert (tmp_path / "out/model.safetensors").read_bytes() == (tmp_path / "ref/model.safetensors").read_bytes()
    return state, result


CALIBRATED = [{"method": "gptq"}, {"awq": True}, {"method": "gptq", "awq": True},
              {"method": "gptq", "act_order": True, "exclude": ["*.down_proj"]}]


def _windows(count=4, length=32, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 200, size=length).astype(np.int64) for _ in range(count)]


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("options", CALIBRATED, ids=["gptq", "awq", "awq+gptq", "gptq-act-order-exclude"])
@pytest.mark.slow
def test_streamed_gptq_and_awq_write_the_in_memory_pass_file_byte_for_byte(options, tie, tiny_tokenizer, tmp_path):
    state, result = _streamed_beside_the_pass(QuantizeConfig(group_size=32, **options), tie, tiny_tokenizer, tmp_path)
    expected = {k: v for k, v in state.pass_info["quantize"].items() if k.startswith(("gptq", "awq", "damp"))}
    assert expected and {k: result.pass_info[k] for k in expected} == expected
    print(f"{options} tie {tie}: {result.pass_info.get('gptq_layers')} GPTQ Linears, "
          f"AWQ error ratio {result.pass_info.get('awq_output_error_ratio')}")


@pytest.mark.parametrize("tie,options", [(False, {}), (True, {"awq": True}), (True, {"exclude": ["lm_head"]})],
                         ids=["untied", "tied-awq", "head-excluded"])
def test_streamed_signround_writes_the_in_memory_pass_file_byte_for_byte(tie, options, tiny_tokenizer, tmp_path):
    # The streamed schedule tunes each layer read alone, then lm_head on the final norm of both chains: the same
    # codes, scales and report figures as the pass on the whole model (a tied head untied, the table float),
    # although it recomputes the fake-quantized weights in the backward pass (low_memory) and the pass does not.
    config = QuantizeConfig(method="signround", group_size=32, iters=6, batch_size=2, **options)
    state, result = _streamed_beside_the_pass(config, tie, tiny_tokenizer, tmp_path)
    expected = {k: v for k, v in state.pass_info["quantize"].items() if k.startswith(("signround", "awq"))}
    assert {k: result.pass_info[k] for k in expected} == expected
    assert result.pass_info["signround_layers"] == 2 and result.pass_info["calibration_tokens"] == 4 * 32
    assert ("signround_lm_head_error_vs_rtn" in result.pass_info) == ("exclude" not in options)
    print(f"{options} tie {tie}: layer error vs RTN {result.pass_info['signround_output_error_vs_rtn']}, "
          f"lm_head {result.pass_info.get('signround_lm_head_error_vs_rtn')}")


def test_streamed_gptq_holds_no_layer_weights_between_layers(tiny_tokenizer, tmp_path, monkeypatch):
    """What keeps the peak at one layer: whenever a block goes to the writer, no weight of the model module
    (the embedding included) is held any more; only the rotary buffers are real."""
    from dataclasses import replace

    from llmopt import streaming_calibrated
    from llmopt.streaming import plan_stream

    _checkpoint(tmp_path / "in", tiny_tokenizer)
    built = []
    empty_model = streaming_calibrated.empty_model

    def keep_a_handle(folder):
        built.append(empty_model(folder))
        return built[0]

    monkeypatch.setattr(streaming_calibrated, "empty_model", keep_a_handle)
    plan, reader = plan_stream(tmp_path / "in", QuantizeConfig(method="gptq", awq=True, group_size=32))
    plan = replace(plan, windows=tuple(_windows()))

    kinds = []
    for block in plan.blocks(reader):
        kinds.append(block.kind)
        if block.kind != "final":
            held = [n for n, p in built[0].named_parameters() if not p.is_meta]
            assert held == [], f"after the {block.kind} block {block.index}: {held}"
    assert kinds == ["embedding", "layer", "layer", "final"]
    real = [n for n, b in built[0].named_buffers() if not b.is_meta]
    assert {*real} <= {"model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"} and real  # transformers 5


def test_streamed_asymmetric_awq_gptq_onnx_matches_the_quantized_torch_model(tiny_tokenizer, tmp_path):
    model = _checkpoint(tmp_path / "in", tiny_tokenizer, tie=True)
    config, windows = QuantizeConfig(group_size=32, symmetric=False, method="gptq", awq=True), _windows()
    state = QuantizePass(config).run(ModelState(model, tiny_tokenizer), PassContext(calibration=lambda: windows))

    quantize_checkpoint(tmp_path / "in", tmp_path / "out", config, export_format="onnx", calibration=windows)

    ids = np.array(tiny_tokenizer("for i in range(10):\n    print(i * 2)")["input_ids"], dtype=np.int64)
    with torch.no_grad():
        reference = state.model(torch.from_numpy(ids[None])).logits[0].numpy()  # (T, vocab)
    diff = np.abs(_run_with_cache(tmp_path / "out", ids, prompt=len(ids) - 4) - reference).max()
    print(f"max |dlogit| {diff:.2e}")
    assert diff < 1e-4


def test_streamed_gptq_without_a_tokenizer_is_refused_before_writing(tiny_tokenizer, tmp_path):
    tiny_llama().save_pretrained(tmp_path / "in", safe_serialization=True)  # weights and config only
    with pytest.raises(InputError) as caught:
        quantize_checkpoint(tmp_path / "in", tmp_path / "out", QuantizeConfig(method="gptq"))
    assert caught.value.message.startswith(f"GPTQ, AWQ and SignRound calibrate on text, and '{tmp_path / 'in'}' has no tokenizer")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options,fmt,message", [
    ({"embeddings": True}, "onnx", "quantize.embeddings: the streaming path runs weight-only quantization (RTN, "
                                   "GPTQ or SignRound, with or without AWQ)"),
    ({"bits": 8, "activations": "int8"}, "onnx", "quantize.activations: the streaming path runs weight-only"),
    ({"target_bits_per_weight": 6.0}, "onnx", "quantize.target_bits_per_weight: the streaming path runs weight-only"),
    ({"group_size": 256}, "onnx", "quantize.group_size: 256 does not divide"),
])
def test_unsupported_options_are_refused_before_writing(options, fmt, message, tiny_tokenizer, tmp_path):
    _checkpoint(tmp_path / "in", tiny_tokenizer)
    with pytest.raises(RecipeError) as caught:
        quantize_checkpoint(tmp_path / "in", tmp_path / "out", QuantizeConfig(**options), export_format=fmt)
    assert str(caught.value.message).startswith(message), caught.value.message
    assert caught.value.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_other_architectures_are_refused(tiny_tokenizer, tmp_path):
    _checkpoint(tmp_path / "in", tiny_tokenizer)
    config = json.loads((tmp_path / "in/config.json").read_text())
    (tmp_path / "in/config.json").write_text(json.dumps({**config, "model_type": "stablelm"}))
    with pytest.raises(RecipeError) as caught:
        quantize_checkpoint(tmp_path / "in", tmp_path / "out", QuantizeConfig())
    assert "the streaming path does not handle model_type 'stablelm'" in caught.value.message
    assert caught.value.hint.startswith("Supported: " + ", ".join(STREAMED) + ".")
    assert caught.value.exit_code == 2


@pytest.mark.parametrize("symmetric", [True, False])
def test_row_blocks_give_the_pass_codes(symmetric, monkeypatch):
    from llmopt import streaming
    from llmopt.passes.quantize import quantize_rtn

    monkeypatch.setattr(streaming, "_CHUNK_ELEMENTS", 64 * 7)  # 7 rows per block: 15 blocks, the last one short
    weight = torch.randn(100, 64, generator=torch.Generator().manual_seed(0))
    config = QuantizeConfig(group_size=32, symmetric=symmetric)
    blocked, whole = streaming.quantize_rows(weight, "w", config), quantize_rtn(weight, "w", "linear", config)
    assert np.array_equal(blocked.codes, whole.codes) and blocked.codes.shape == (100, 64)
    assert np.array_equal(blocked.scales, whole.scales) and np.array_equal(blocked.zero_points, whole.zero_points)


@pytest.mark.slow
def test_export_streaming_runs_a_recipe_layer_by_layer(tiny_model_dir, tmp_path):
    import llmopt
    from llmopt.artifact import verify_manifest

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {tiny_model_dir}\npasses:\n  - type: quantize\n    method: rtn\n"
                      "export:\n  format: safetensors\n  streaming: true\nchecks:\n  max_size_ratio: 0.4\n")

    from tests.conftest import ProgressRecorder

    progress = ProgressRecorder()  # the run's steps, and the blocks written in the streamed one
    result = llmopt.optimize(recipe, output=tmp_path / "out", resume=True, progress=progress)

    assert progress.steps[:3] == ["quantize and export, layer by layer", "quality (perplexity, KL, top-1)",
                                  "validate artifact"]
    layers = [(done, total) for step, done, total in progress.advances if step.startswith("quantize and export")]
    assert layers == [(i, 2 + 2) for i in range(1, 5)]  # the embedding, two decoder layers, the final block
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["passes"][0]["info"]["streaming"] is True and report["passes"][0]["info"]["quantized_tensors"] == 15
    assert "--resume: a streamed run keeps no checkpoints, so this one started over." in report["notes"]
    assert report["optimized"]["size_bytes"] == (tmp_path / "out/model.safetensors").stat().st_size
    assert report["baseline"]["size_bytes"] == (tiny_model_dir / "model.safetensors").stat().st_size
    assert report["quality"]["windows"] >= 1 and report["baseline"]["perplexity"] > 0  # evaluated layer by layer
    assert any(n.startswith("Quality measured layer by layer") for n in report["notes"])
    validation = report["validation"]  # the streamed artifact checked against the model it holds
    assert validation["passed"] and validation["long_tokens"] >= 256 and validation["decode_tokens"] == 16
    # The report every schedule writes: the model card and the HTML page too.
    assert "optimized with llmopt" in (tmp_path / "out/README.md").read_text() and (tmp_path / "out/report.html").exists()
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["recipe"]["export"]["streaming"] is True and "report.json" in manifest["files"]
    assert "torch" in manifest["versions"] and manifest["seed"] == 0
    assert verify_manifest(tmp_path / "out") == []
    ratio = report["optimized"]["size_bytes"] / report["baseline"]["size_bytes"]
    print(f"size ratio {ratio:.3f}")
    assert result.passed and report["checks"][0]["value"] == pytest.approx(ratio) and ratio < 0.4


@pytest.mark.slow
def test_export_streaming_runs_a_gptq_recipe_as_the_in_memory_pipeline_does(tiny_model_dir, tmp_path):
    import llmopt

    # The same evaluation section in both: calibration text is taken after the evaluation tokens.
    body = (f"model: {tiny_model_dir}\npasses:\n  - type: quantize\n    method: gptq\n    awq: true\n"
            "calibration:\n  samples: 4\n  seq_len: 32\nevaluation:\n  max_tokens: 256\n  window: 64\n"
            "  speed: {prompt_tokens: 8, new_tokens: 4, runs: 1}\nexport:\n  format: safetensors\n")
    (tmp_path / "streamed.yaml").write_text(body + "  streaming: true\n")
    (tmp_path / "in-memory.yaml").write_text(body)

    llmopt.optimize(tmp_path / "streamed.yaml", output=tmp_path / "streamed")
    llmopt.optimize(tmp_path / "in-memory.yaml", output=tmp_path / "in-memory")

    weights = [(tmp_path / f"{run}/model.safetensors").read_bytes() for run in ("streamed", "in-memory")]
    assert weights[0] == weights[1]
    reports = [json.loads((tmp_path / f"{run}/report.json").read_text()) for run in ("streamed", "in-memory")]
    streamed, in_memory = (r["passes"][0]["info"] for r in reports)
    assert streamed["streaming"] is True and streamed["gptq_layers"] == in_memory["gptq_layers"] == 14
    # The same quality figures: the streamed run walks both models layer by layer in PyTorch, the in-memory run
    # loads the baseline and the artifact whole (transformers dequantizes the stored codes to the same floats).
    for side in ("baseline", "optimized"):
        assert reports[0][side]["perplexity"] == pytest.approx(reports[1][side]["perplexity"], rel=1e-4)
    for key in ("kl_divergence", "top1_agreement", "tokens", "windows"):
        assert reports[0]["quality"][key] == pytest.approx(reports[1]["quality"][key], rel=1e-3, abs=1e-6)
    assert reports[0]["quality"]["intervals"].keys() == reports[1]["quality"]["intervals"].keys()
    assert streamed["awq_alpha_per_layer"] == in_memory["awq_alpha_per_layer"]
    assert streamed["calibration_tokens"] == 4 * 32
    assert any(n.startswith("calibration data: ") and "4 samples x 32 tokens" in n for n in reports[0]["notes"])


@pytest.mark.parametrize("passes,problem", [
    ("  - type: quantize\n    target_bits_per_weight: 6.0\n",
     "quantize.target_bits_per_weight: the streaming path runs weight-only quantization"),
    ("  - type: prune\n    method: depth\n    num_layers: 1\n  - type: quantize\n",
     "the streaming path runs recipes made of one"),
    ("  - type: quantize\nchecks:\n  min_decode_speedup: 1.5\n", "speed is not measured on a streamed run"),
    ("  - type: quantize\nevaluation:\n  tasks: [hellaswag]\n", "lm-eval tasks (evaluation.tasks) run the whole"),
])
def test_recipes_that_cannot_stream_say_why(passes, problem, tiny_model_dir, tmp_path):
    import llmopt

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {tiny_model_dir}\nexport:\n  streaming: true\npasses:\n{passes}")
    with pytest.raises(RecipeError) as caught:
        llmopt.optimize(recipe, output=tmp_path / "out")
    assert caught.value.message.startswith(f"export.streaming: this recipe cannot be streamed: {problem}")
    assert not (tmp_path / "out").exists()


def test_too_little_disk_is_refused_before_writing(tiny_tokenizer, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    _checkpoint(tmp_path / "in", tiny_tokenizer)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ResourceError) as caught:
        quantize_checkpoint(tmp_path / "in", tmp_path / "out", QuantizeConfig())
    assert caught.value.message.startswith("The artifact needs about 0.0 GB next to")
    assert caught.value.exit_code == 5
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.staging-*"))


def test_a_streamed_plan_needs_one_layer_of_memory_whatever_the_depth(tiny_tokenizer, tmp_path):
    """Pre-flight (and --dry-run) size a streamed run by its largest block, not by the whole model: eight layers
    need what two need, where the in-memory estimate grows with the depth."""
    from llmopt import preflight
    from llmopt.pipeline import plan
    from tests.core.test_architectures import tiny

    estimates = {}
    for layers in (2, 8):
        tiny("llama", num_hidden_layers=layers).save_pretrained(tmp_path / f"in{layers}", safe_serialization=True)
        tiny_tokenizer.save_pretrained(tmp_path / f"in{layers}")
        for streaming in (True, False):
            recipe = tmp_path / f"r{layers}{streaming}.yaml"
            recipe.write_text(f"model: {tmp_path / f'in{layers}'}\npasses:\n  - type: quantize\n    group_size: 16\n"
                              f"export:\n  streaming: {str(streaming).lower()}\n")
            estimates[layers, streaming] = preflight.estimate(plan(recipe), tmp_path / "out")
    assert estimates[2, True].memory_bytes == estimates[8, True].memory_bytes and estimates[8, True].streamed
    assert estimates[8, False].memory_bytes > 2 * estimates[2, False].memory_bytes
    assert estimates[8, True].output_disk_bytes > estimates[2, True].output_disk_bytes > 0


@pytest.mark.parametrize("model_type,module", [("gemma2", "gemma2"), ("mistral", None)])
def test_traces_run_attention_in_query_chunks_with_the_same_logits(model_type, module, monkeypatch):
    """The check's long sequence must outrun the attention window, and attention under a mask holds every
    query's scores (Gemma 2's soft-capped eager attention, Mistral's windowed sdpa): the traces run it a chunk
    of queries at a time, each chunk with its rows of the mask, and the logits stay those of the whole call,
    past the sliding window too."""
    import importlib

    import transformers.modeling_utils as modeling_utils

    from llmopt import streaming_reference
    from tests.core.test_architectures import tiny

    model = tiny(model_type)  # sliding window 8
    ids = torch.randint(3, 100, (1, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model(ids).logits
    calls = []  # the query rows of every attention call
    if module:  # eager: the family's own function
        family = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        original = family.eager_attention_forward
        monkeypatch.setattr(family, "eager_attention_forward", lambda m, query, *a, **k: calls.append(query.shape[2])
                            or original(m, query, *a, **k))
    else:
        original = modeling_utils.ALL_ATTENTION_FUNCTIONS["sdpa"]
        monkeypatch.setitem(modeling_utils.ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa",
                            lambda m, query, *a, **k: calls.append(query.shape[2]) or original(m, query, *a, **k))
    monkeypatch.setattr(streaming_reference, "QUERY_CHUNK", 16)
    streaming_reference._bounded_attention(model)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, whole, rtol=0, atol=1e-6)
    assert calls == [16, 16, 16, 16, 6] * model.config.num_hidden_layers


def test_a_check_that_would_not_fit_in_memory_is_skipped_and_the_report_says_so(tiny_tokenizer, tmp_path,
                                                                              monkeypatch):
    """The runtime holds the artifact and the long prefill's attention scratch at once: when that is more than
    the machine has free, the artifact is written unchecked and says so, rather than risking the kill."""
    import psutil

    _checkpoint(tmp_path / "in", tiny_tokenizer)
    free = type("Memory", (), {"available": 10_000, "total": 10**9})()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: free)
    result = quantize_checkpoint(tmp_path / "in", tmp_path / "out", QuantizeConfig(group_size=16))
    assert result.validation is None and (tmp_path / "out/model.onnx").is_file()
    assert any(n.startswith("validation: not run; onnxruntime would hold") for n in result.notes), result.notes


def _tiny(model_type):
    """A tiny Mistral (no sliding window) or Qwen2 (q/k/v biases) with tiny_llama's sizes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=384, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512, tie_word_embeddings=False, sliding_window=None)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # transformers initializes biases to zero: make them count
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    return model


STREAMED = sorted(t for t, a in ARCHITECTURES.items() if a.stream)


@pytest.mark.parametrize("options", [{}, {"method": "gptq", "awq": True}, {"method": "signround", "iters": 3}],
                         ids=["rtn", "awq+gptq", "signround"])
@pytest.mark.parametrize("model_type", STREAMED)
@pytest.mark.slow
def test_onnx_stream_every_family(model_type, options, tiny_tokenizer, tmp_path):
    """Each described dense family streamed to ONNX: the codes the in-memory pass chooses, and logits equal to the
    quantized torch model over a sequence past every window (8 tokens), in prefill and in cached decode."""
    from tests.core.test_architectures import tiny

    model = tiny(model_type)
    model.save_pretrained(tmp_path / "in", safe_serialization=True)
    config, windows = QuantizeConfig(group_size=16, **options), _windows()
    state = QuantizePass(config).run(ModelState(model, tiny_tokenizer), PassContext(calibration=lambda: windows))

    result = quantize_checkpoint(tmp_path / "in", tmp_path / "out", config, calibration=windows)

    ids = np.random.default_rng(2).integers(3, 200, 40).astype(np.int64)
    with torch.no_grad():
        reference = state.model(torch.from_numpy(ids[None])).logits[0].numpy()
    diff = np.abs(_run_with_cache(tmp_path / "out", ids, prompt=24) - reference).max()
    print(f"{model_type} {options}: max |dlogit| {diff:.2e} (logits up to {np.abs(reference).max():.2f})")
    assert diff < 1e-4 * max(1.0, np.abs(reference).max())
    stored = result.info["matmul_nbits"] + result.info.get("qmoe_experts", 0)  # experts: one QMoE per layer
    assert stored == len(state.quantized) == result.quantized_tensors
    # The check's reference, computed layer by layer as the layers were written, is that same model.
    v = result.validation
    assert v.passed and v.long_tokens >= 256 and v.max_abs_logit_diff < 1e-4 * max(1.0, np.abs(reference).max())
    assert (tmp_path / "out" / "genai_config.json").exists()  # sliding-window families too


@pytest.mark.parametrize("model_type", STREAMED)
def test_the_evaluation_baseline_walk_gives_the_models_logits_on_every_family(model_type, tmp_path, monkeypatch):
    """A streamed run's baseline: the checkpoint's float weights taken through the blocks one layer at a time
    (each matrix read again when its module runs) give the whole model's logits, over a sequence past every window
    (8 tokens), with attention in chunks of 16 queries: embedding scale, soft-caps, fused projections, experts and
    per-layer rotary tables included."""
    from dataclasses import replace

    from llmopt import streaming_reference
    from llmopt.streaming import plan_stream
    from tests.core.test_architectures import tiny

    model = tiny(model_type)
    model.save_pretrained(tmp_path / "in", safe_serialization=True)
    ids = np.random.default_rng(3).integers(3, 200, 40).astype(np.int64)
    with torch.no_grad():
        whole = model(torch.from_numpy(ids[None])).logits[0].numpy()
    monkeypatch.setattr(streaming_reference, "QUERY_CHUNK", 16)
    plan, reader = plan_stream(tmp_path / "in", QuantizeConfig(group_size=16))
    trace = streaming_reference.LayerTrace(reader, [ids], weights="checkpoint")
    for _ in replace(plan, observers=(trace,)).blocks(reader):
        pass
    diff = np.abs(trace.logits(0) - whole).max()
    print(f"{model_type}: max |dlogit| {diff:.2e} (logits up to {np.abs(whole).max():.2f})")
    assert diff < 1e-5 * max(1.0, np.abs(whole).max())


@pytest.mark.parametrize("model_type", STREAMED)
@pytest.mark.slow
def test_safetensors_stream_every_family(model_type, tiny_tokenizer, tmp_path):
    """Each described dense family streamed to compressed-tensors: the in-memory exporter's file, byte for byte
    (asymmetric groups on every other family, their zero points packed too)."""
    from tests.core.test_architectures import tiny

    model = tiny(model_type)
    model.save_pretrained(tmp_path / "in", safe_serialization=True)
    tiny_tokenizer.save_pretrained(tmp_path / "in")
    # transformers loads MoE experts back only when symmetric (refused otherwise: tested below)
    config = QuantizeConfig(group_size=16, symmetric=STREAMED.index(model_type) % 2 == 0 or model_type == "qwen3_moe")
    state = _quantized_in_memory(model, tiny_tokenizer, config)
    (tmp_path / "ref").mkdir()
    SafetensorsExporter(ExportConfig(format="safetensors")).export(state, tmp_path / "ref")
    result = quantize_checkpoint(tmp_path / "in", tmp_path / "out", config, export_format="safetensors")
    assert (tmp_path / "out/model.safetensors").read_bytes() == (tmp_path / "ref/model.safetensors").read_bytes()
    written, reference = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("out", "ref"))
    assert written["quantization_config"] == reference["quantization_config"]
    assert result.quantized_tensors == len(state.quantized)


@pytest.mark.parametrize("chunked", [False, True], ids=["one prefill", "chunked prefill"])
@pytest.mark.slow
def test_the_streamed_check_catches_a_window_wrong_past_it(chunked, tiny_tokenizer, tmp_path, monkeypatch):
    """A streamed artifact is checked as the pipeline checks its artifacts: a graph that windows Gemma 3's full
    attention layer too is right on short prompts and wrong past the window, and the stream fails (exit 4)
    without writing anything; also when the long sequence goes in as chunks through the KV cache (as a 7B-shaped
    windowed model's does, so that its attention scores fit)."""
    from llmopt import streaming_reference
    from llmopt.errors import ResultValidationError
    from llmopt.exporters import onnx_writer
    from tests.core.test_architectures import tiny

    if chunked:  # a budget that the tiny model's 256-token prefill exceeds: 64 tokens at a time
        monkeypatch.setattr(streaming_reference, "PREFILL_SCORES_BYTES", 1)
    tiny("gemma3_text").save_pretrained(tmp_path / "in", safe_serialization=True)
    tiny_tokenizer.save_pretrained(tmp_path / "in")
    config = QuantizeConfig(group_size=16)
    right = quantize_checkpoint(tmp_path / "in", tmp_path / "right", config)
    assert right.validation.passed and right.validation.long_tokens >= 256
    assert any("prefilled 64 tokens at a time" in note for note in right.notes) is chunked
    monkeypatch.setattr(onnx_writer, "attention_windows", lambda config: [8] * config.num_hidden_layers)
    with pytest.raises(ResultValidationError, match="does not reproduce the optimized model") as failed:
        quantize_checkpoint(tmp_path / "in", tmp_path / "wrong", config)
    print(failed.value)
    assert not (tmp_path / "wrong").exists()


def test_asymmetric_moe_safetensors_is_refused_before_writing(tiny_tokenizer, tmp_path):
    """transformers 5 drops asymmetric experts' zero points when it fuses them at load: a compressed-tensors MoE
    checkpoint that could not be loaded back is refused at plan time, streamed or not (ONNX takes it)."""
    import llmopt
    from tests.core.test_architectures import tiny

    tiny("qwen3_moe").save_pretrained(tmp_path / "in", safe_serialization=True)
    tiny_tokenizer.save_pretrained(tmp_path / "in")
    asymmetric = QuantizeConfig(group_size=16, symmetric=False)
    with pytest.raises(RecipeError, match="MoE checkpoint whose experts are quantized asymmetrically"):
        quantize_checkpoint(tmp_path / "in", tmp_path / "out", asymmetric, export_format="safetensors")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - type: quantize\n    symmetric: false\n    group_size: 16\n"
                      "export: {format: safetensors}\n")
    with pytest.raises(RecipeError, match="MoE checkpoint whose experts are quantized asymmetrically"):
        llmopt.validate(recipe, model=str(tmp_path / "in"))
    assert quantize_checkpoint(tmp_path / "in", tmp_path / "onnx", asymmetric).validation.passed
    assert not (tmp_path / "out").exists()


def test_a_graph_the_writer_cannot_express_is_refused_at_plan_time(tiny_tokenizer, tmp_path):
    _tiny("mistral").save_pretrained(tmp_path / "in", safe_serialization=True)
    config = json.loads((tmp_path / "in/config.json").read_text())
    (tmp_path / "in/config.json").write_text(json.dumps({**config, "head_dim": 16, "rope_scaling": {
        "rope_type": "dynamic", "factor": 2.0}}))
    with pytest.raises(RecipeError) as caught:
        quantize_checkpoint(tmp_path / "in", tmp_path / "onnx", QuantizeConfig())
    assert "rope type 'dynamic' changes the rotary frequencies" in caught.value.message
    assert not (tmp_path / "onnx").exists() and not list(tmp_path.glob(".onnx.staging-*"))
    quantize_checkpoint(tmp_path / "in", tmp_path / "st", QuantizeConfig(), export_format="safetensors")
    assert (tmp_path / "st/model.safetensors").is_file()


def test_row_blocks_pack_as_compressed_tensors_does(monkeypatch):
    from compressed_tensors.compressors import pack_to_int32

    from llmopt.exporters import safetensors_stream
    from llmopt.quantized import QuantizedTensor

    monkeypatch.setattr(safetensors_stream, "_PACK_ELEMENTS", 64 * 7)  # 7 rows per call: 43 blocks, the last short
    codes = np.random.default_rng(0).integers(0, 16, (300, 64)).astype(np.uint8)
    qt = QuantizedTensor("a.weight", "linear", 4, 32, True, codes, np.ones((300, 2), np.float32),
                         np.full((300, 2), 8, np.uint8))
    (name, packed), *_ = safetensors_stream._serialize("a.weight", qt)
    whole = pack_to_int32(torch.from_numpy(codes.astype(np.int16) - 8).to(torch.int8), 4)  # (300, 8) int32
    assert name == "a.weight_packed" and torch.equal(packed, whole)
