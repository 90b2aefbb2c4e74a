"""The family descriptions (llmopt.architectures) against the real transformers modules, for every described
family: each input group lists every reader of its source (a fold leaves the model's function unchanged), the
passes run on every family without an internal error and quantize every projection, KV heads and windows are
read under every spelling, and the fused ONNX graph keeps each layer's own window past it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmopt.architectures import ARCHITECTURES, InputGroup, attention_windows, describe, kv_heads
from llmopt.recipe import shipped_recipe_names
from tests.conftest import TINY_VOCAB

COMMON = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)
# model_type -> (config class, what differs from COMMON). Every described family has a row (checked below).
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32, "norm_topk_prob": True}),
    "smollm3": ("SmolLM3Config", {"no_rope_layer_interval": 2}),
    "granite": ("GraniteConfig", {"embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                                  "attention_multiplier": 0.3, "logits_scaling": 4.0}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 8}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 8,
                                         "layer_types": ["sliding_attention", "full_attention"]}),
    # RoPE on half of each head (Phi-4-mini: 3/4); heads of 32, so that the rotated width suits onnxruntime's
    # GroupQueryAttention
    "phi3": ("Phi3Config", {"partial_rotary_factor": 0.5, "head_dim": 32}),
    "olmo2": ("Olmo2Config", {}),
    "cohere": ("CohereConfig", {}),
}


def config_of(model_type: str, **overrides):
    import transformers

    name, extra = FAMILIES[model_type]
    fields = {**COMMON, **extra, **overrides}
    if "layer_types" in extra and "layer_types" not in overrides:  # the pattern repeated over the layers
        fields["layer_types"] = [extra["layer_types"][i % len(extra["layer_types"])]
                                 for i in range(fields["num_hidden_layers"])]
    return getattr(transformers, name)(**fields)


def tiny(model_type: str, **overrides):
    """A tiny random model of the family (config fields in `overrides` changed), its norms and biases moved off
    their init so that a wrong fold shows, as llmopt's passes see it (MoE experts one Linear each:
    llmopt.experts)."""
    from transformers import AutoModelForCausalLM

    from llmopt.experts import unfuse_experts

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_of(model_type, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.3)
    unfuse_experts(model)
    return model


def logits(model, length: int = 48) -> torch.Tensor:
    ids = torch.randint(3, TINY_VOCAB, (1, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_every_described_family_is_in_the_matrix():
    assert sorted(FAMILIES) == sorted(ARCHITECTURES)


def fold(model, arch, groups_of) -> None:
    """Scale every group's input channels by a random s: 1/s into the source, s into each reader."""
    from llmopt.passes.quantize_awq import _fold_into_previous

    g = torch.Generator().manual_seed(0)
    for layer in model.model.layers:
        for group in groups_of(layer):
            readers = [layer.get_submodule(n) for n in group.linears]
            s = torch.rand(readers[0].weight.shape[1], generator=g) * 1.5 + 0.25
            _fold_into_previous(layer.get_submodule(group.source), s, arch.norm)
            with torch.no_grad():
                for m in readers:
                    m.weight.mul_(s[None, :])


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_group_lists_every_reader_of_its_source(model_type):
    """What AWQ and SmoothQuant do to a family must leave its float function unchanged: a reader missing from a
    group, or a norm of another flavour, changes the logits."""
    model = tiny(model_type)
    arch = describe(model_type)
    before = logits(model)
    fold(model, arch, arch.layer_groups)
    change = relative(logits(model), before)
    print(f"{model_type}: {sum(len(arch.layer_groups(layer)) for layer in model.model.layers)} groups, "
          f"relative logit change {change:.2e}")
    assert change < 1e-4, f"{model_type}: {change:.2e}"


def test_the_fold_check_sees_the_gemma2_layout_bug():
    """The check above can fail: Gemma 2's MLP reads pre_feedforward_layernorm; folding into
    post_attention_layernorm (the Llama layout, what llmopt did before) changes the model."""
    model = tiny("gemma2")
    before = logits(model)
    wrong = (InputGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
             InputGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
    fold(model, describe("gemma2"), lambda layer: wrong)
    change = relative(logits(model), before)
    print(f"gemma2 with the Llama layout: relative logit change {change:.2e}")
    assert change > 1e-2


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
@pytest.mark.slow
def test_quantize_covers_every_projection_of_every_family(model_type, tiny_tokenizer):
    """AWQ + GPTQ int4 through the pass on each family: no internal error, every Linear of every decoder layer
    quantized (GPT-2's Conv1D family, undescribed, is refused at plan time instead), the float model the AWQ
    folds produce identical before quantizing."""
    from llmopt.evaluation.calibration import calibration_batches
    from llmopt.model import ArchInfo
    from llmopt.passes.quantize import QuantizeConfig, QuantizePass
    from llmopt.state import ModelState, PassContext

    model = tiny(model_type)
    config = QuantizeConfig(method="gptq", awq=True, bits=4, group_size=16)
    qpass = QuantizePass(config)
    qpass.check(ArchInfo.from_config(model.config), "passes[0]")
    windows, _ = calibration_batches(tiny_tokenizer, data="builtin", text_field="text", samples=2, seq_len=32, seed=0)
    state = QuantizePass(config).run(ModelState(model, tiny_tokenizer),
                                     PassContext(seed=0, progress=lambda *_: None, calibration=lambda: windows))
    linears = {f"{n}.weight" for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
    missing = linears - set(state.quantized)
    assert not missing, sorted(missing)[:5]
    info = state.pass_info["quantize"]
    print(f"{model_type}: {len(linears)} layer Linears quantized, AWQ alphas {info['awq_alpha_per_layer']}")
    assert info["quantized_parameters"] <= sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_layer_by_layer_inputs_are_the_models_own(model_type):
    """GPTQ, AWQ and the sparse pruners run one decoder layer at a time on recorded inputs: chained layer by
    layer over a sequence past every window, they give the model's own hidden states. Gemma 2/3's full-attention
    layers get another mask and other rotary tables than their sliding ones, which a single recorded call (what
    llmopt did before) gets wrong."""
    from llmopt.passes.layerwise import capture_layer_inputs, decoder_layers, run_layer

    model = tiny(model_type)
    layers = decoder_layers(model)
    outputs = []
    hooks = [layer.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for layer in layers]
    ids = torch.randint(3, TINY_VOCAB, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.model(input_ids=ids[None], use_cache=False)
        for hook in hooks:
            hook.remove()
        inputs = capture_layer_inputs(model, [ids.tolist()])
        for i, layer in enumerate(layers):
            inputs = run_layer(layer, i, inputs)
            assert relative(inputs.hidden[0], outputs[i]) < 1e-5, f"{model_type}: layer {i}"


def test_undescribed_families_are_refused_at_plan_time():
    from llmopt.errors import RecipeError
    from llmopt.model import ArchInfo
    from llmopt.passes.quantize import QuantizeConfig, QuantizePass
    from transformers import GPT2Config

    arch = ArchInfo.from_config(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=TINY_VOCAB))
    with pytest.raises(RecipeError, match="the quantize pass does not handle model_type 'gpt2'") as refused:
        QuantizePass(QuantizeConfig(group_size=16)).check(arch, "passes[0]")
    assert "Supported: cohere, gemma, gemma2" in refused.value.hint


def test_kv_heads_under_every_spelling():
    from transformers import FalconConfig, GPTBigCodeConfig

    from llmopt.model import ArchInfo

    assert kv_heads(FalconConfig(num_attention_heads=8, new_decoder_architecture=True, num_kv_heads=2)) == 2
    assert kv_heads(FalconConfig(num_attention_heads=8, multi_query=True)) == 1
    assert kv_heads(FalconConfig(num_attention_heads=8, multi_query=False)) == 8
    assert kv_heads(GPTBigCodeConfig(n_head=8, multi_query=True)) == 1
    assert kv_heads(config_of("qwen3")) == 2
    falcon = ArchInfo.from_config(FalconConfig(hidden_size=64, num_attention_heads=8, num_hidden_layers=2,
                                               new_decoder_architecture=True, num_kv_heads=2))
    assert falcon.kv_cache_bytes_per_token() == 2 * 2 * 2 * 8 * 4  # k and v, 2 layers, 2 KV heads of 8, fp32


def test_attention_windows_per_layer():
    assert attention_windows(config_of("gemma2")) == [8, None]
    assert attention_windows(config_of("gemma3_text")) == [8, None]
    assert attention_windows(config_of("mistral")) == [8, 8]
    assert attention_windows(config_of("qwen2")) == [None, None]  # use_sliding_window is off
    assert attention_windows(config_of("llama")) == [None, None]


def test_fused_attention_keeps_each_layers_window_past_it(tmp_path):
    """Gemma 3 with a window of 8 on layer 0 and full attention on layer 1: the fused graph's
    GroupQueryAttention must window layer 0 only. Compared with PyTorch over 48 tokens in one prefill and
    through a cached decode (a window shorter than the prompt is where a wrong window shows)."""
    import onnx

    from llmopt.evaluation.runners import OrtRunner, TorchRunner
    from tests.conftest import write_onnx

    model = tiny("gemma3_text")
    write_onnx(model, tmp_path)
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph
    windows = {n.name: {a.name: a.i for a in n.attribute}.get("local_window_size")
               for n in graph.node if n.op_type == "GroupQueryAttention"}
    assert windows == {"/model/layers.0/attn/GroupQueryAttention": 8,
                       "/model/layers.1/attn/GroupQueryAttention": None}, windows
    runner, reference = OrtRunner(tmp_path), TorchRunner(model)
    ids = np.random.default_rng(3).integers(3, TINY_VOCAB, 48)
    diff = float(np.abs(runner.logits(ids) - reference.logits(ids)).max())
    print(f"gemma3_text fused, 48 tokens: max |Δlogit| {diff:.2e}")
    assert diff < 1e-3, diff
    assert np.array_equal(runner.generate(ids[:20], 16), reference.generate(ids[:20], 16))


@pytest.mark.parametrize("share_buffer", [False, True])
def test_cached_decoding_of_given_tokens_matches_one_prefill(tmp_path, share_buffer):
    """decode_logits, which the artifact check runs: a prefill of 20 tokens, then 28 fed one at a time through the
    KV cache (growing, or one buffer the graph updates in place as generate() runs it), past Gemma 3's window of 8:
    the same logits as one prefill over all 48, in onnxruntime and in PyTorch."""
    from llmopt.evaluation.runners import OrtRunner, TorchRunner
    from tests.conftest import write_onnx

    model = tiny("gemma3_text")
    write_onnx(model, tmp_path)
    runner, reference = OrtRunner(tmp_path), TorchRunner(model)
    runner.loop.share_buffer = share_buffer
    ids = np.random.default_rng(3).integers(3, TINY_VOCAB, 48)
    expected = reference.logits(ids)[20:]
    onnx_steps, torch_steps = runner.decode_logits(ids, 20), reference.decode_logits(ids, 20)
    print(f"share_buffer={share_buffer}: onnx {np.abs(onnx_steps - expected).max():.2e}, "
          f"torch {np.abs(torch_steps - expected).max():.2e}")
    assert onnx_steps.shape == torch_steps.shape == (28, TINY_VOCAB)
    assert np.abs(onnx_steps - expected).max() < 1e-3 and np.abs(torch_steps - expected).max() < 1e-4


@pytest.mark.slow
def test_the_artifact_check_catches_a_window_wrong_past_it(tmp_path, tiny_tokenizer, monkeypatch):
    """The pipeline's artifact check runs a sequence longer than every window, in one prefill and in cached
    decoding: with the old single-window fusion (every layer windowed) it fails the run (exit 4) instead of
    writing a model that is right only on short prompts."""
    import llmopt
    from llmopt.errors import ResultValidationError

    folder = tmp_path / "gemma3"
    tiny("gemma3_text").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - type: fuse\nevaluation: {enabled: false}\n")
    report = llmopt.optimize(recipe, model=str(folder), output=tmp_path / "right").report
    v = report.validation
    print(f"right windows: {v}")
    assert v.passed and v.long_tokens >= 256 and v.decode_top1_agreement == 1.0
    # ... with the KV cache in one buffer updated in place, as onnxruntime-genai runs it (see the test below).
    assert (tmp_path / "right" / "genai_config.json").exists()
    from llmopt.exporters import onnx_writer

    monkeypatch.setattr(onnx_writer, "attention_windows", lambda config: [8] * config.num_hidden_layers)
    with pytest.raises(ResultValidationError, match="does not reproduce the optimized model") as failed:
        llmopt.optimize(recipe, model=str(folder), output=tmp_path / "wrong")
    print(failed.value)
    assert not (tmp_path / "wrong").exists()


@pytest.mark.parametrize("model_type", ["gemma3_text", "gemma2", "mistral"])
def test_a_windowed_graph_decodes_right_in_a_shared_kv_buffer(model_type, tmp_path):
    """The written graph's sliding-window layers decode as PyTorch does when past and present share one buffer
    (onnxruntime-genai's mode), past the window: the exporter offers genai_config.json for them. (The graph the
    old fuse pass rewrote from optimum's export did not: greedy agreement 50-94% after the window.) The artifact
    check would see it fail: it decodes the same way when genai_config.json is there."""
    from llmopt.evaluation.runners import OrtRunner, PlainOnnxLoop, TorchRunner
    from tests.conftest import write_onnx

    model = tiny(model_type)
    write_onnx(model, tmp_path)
    runner, reference = OrtRunner(tmp_path), TorchRunner(model)
    assert attention_windows(model.config)[0] == 8
    ids = np.random.default_rng(3).integers(3, TINY_VOCAB, 256)
    shared = PlainOnnxLoop.optimum_layout(runner.session, share_buffer=True)
    growing = runner.generate(ids, 16)
    assert np.array_equal(shared.generate(ids, 16), growing)
    assert np.array_equal(growing, reference.generate(ids, 16))


# ---- every family through the pipeline ------------------------------------------------------------------

# Every shipped recipe. onnxruntime's MoE op takes weight-only codes of one bit width per layer: W8A8 and mixed
# 4/8-bit experts are refused at plan time (tested above), and width pruning needs a dense MLP.
END_TO_END = tuple(shipped_recipe_names())
REFUSED_END_TO_END = {("qwen3_moe", "int8-w8a8-onnx"), ("qwen3_moe", "int4-mixed-onnx"), ("qwen3_moe", "prune-width"),
                      ("qwen3_moe", "prune-width-distill")}


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory, tiny_tokenizer):
    """model_type -> a saved tiny checkpoint (weights, config, tokenizer), written on first use."""
    made = {}

    def folder(model_type: str):
        if model_type not in made:
            path = tmp_path_factory.mktemp(f"family-{model_type}")
            tiny(model_type).save_pretrained(path)
            tiny_tokenizer.save_pretrained(path)
            made[model_type] = path
        return made[model_type]

    return folder


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_shipped_recipe_plans_or_is_refused_on_every_family(model_type, family_dirs):
    """No recipe reaches a pass or an exporter with a family it cannot handle: plan() accepts it or refuses
    it (exit 2) naming what is supported."""
    import llmopt
    from llmopt.errors import RecipeError
    from llmopt.recipe import shipped_recipe_names

    outcomes = {}
    for name in shipped_recipe_names():
        try:
            llmopt.validate(name, model=str(family_dirs(model_type)))
            outcomes[name] = "plans"
        except RecipeError as refused:
            # a family a pass does not describe, a group size that does not divide, or what the ONNX exporter's
            # MoE op cannot hold
            assert "Supported:" in refused.hint or "group_size" in str(refused) or \
                "or export safetensors" in refused.hint, str(refused)
            outcomes[name] = "refused"
    print(model_type, outcomes)
    arch = describe(model_type)
    for name in ("gqa-distill",):
        assert outcomes[name] == ("plans" if arch.gqa else "refused")
    assert outcomes["prune-depth"] == "plans"
    assert outcomes["prune-width"] == ("plans" if arch.prune else "refused")
    assert all(outcomes[name] == "plans" for name in END_TO_END if (model_type, name) not in REFUSED_END_TO_END)
    for model_type_refused, name in REFUSED_END_TO_END:
        if model_type == model_type_refused:
            assert outcomes[name] == "refused"


@pytest.mark.parametrize("recipe_name", END_TO_END)
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
@pytest.mark.slow
def test_every_family_end_to_end(model_type, recipe_name, family_dirs, tmp_path):
    """Every shipped recipe (distillation cut to 2 steps) on every family, evaluation off: the artifact passes the
    pipeline's check against the in-memory model (prompts, one sequence longer than every window, cached
    decoding)."""
    import llmopt
    from llmopt.recipe import EvaluationConfig, load_recipe

    if (model_type, recipe_name) in REFUSED_END_TO_END:
        pytest.skip("refused at plan time (test_every_shipped_recipe_plans_or_is_refused_on_every_family)")
    recipe = load_recipe(recipe_name)
    calibration = recipe.calibration.model_copy(update={"samples": 2, "seq_len": 32})
    passes = [p.model_copy(update={"steps": 2, "batch_size": 2, "eval_every": 1}) if p.type == "distill" else p
              for p in recipe.passes]
    recipe = recipe.model_copy(update={"evaluation": EvaluationConfig(enabled=False), "calibration": calibration,
                                       "passes": passes})
    v = llmopt.optimize(recipe, model=str(family_dirs(model_type)), output=tmp_path / "out").report.validation
    print(f"{model_type} {recipe_name}: max |Δlogit| {v.max_abs_logit_diff:.3g}, top-1 {v.top1_agreement:.3f}, "
          f"decode {v.decode_top1_agreement:.3f} after {v.long_tokens} tokens")
    assert v.passed and v.long_tokens >= 256


def test_the_readme_table_is_generated_from_the_descriptions():
    from pathlib import Path

    from llmopt.architectures import support_markdown

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    block = readme[readme.index("<!-- families -->\n") + len("<!-- families -->\n"):readme.index("<!-- /families -->")]
    assert block == support_markdown(), "README's family table is stale: run `python docs/regenerate.py`"


def test_the_onnx_exporter_refuses_undescribed_families_at_plan_time():
    from transformers import FalconConfig

    from llmopt.errors import RecipeError
    from llmopt.exporters.onnx import OnnxExporter
    from llmopt.model import ArchInfo
    from llmopt.recipe import ExportConfig

    falcon = ArchInfo.from_config(FalconConfig(hidden_size=64, num_attention_heads=8, num_hidden_layers=2,
                                               new_decoder_architecture=True, num_kv_heads=2))
    with pytest.raises(RecipeError, match="the ONNX exporter does not handle model_type 'falcon'"):
        OnnxExporter(ExportConfig()).check(falcon)
    OnnxExporter(ExportConfig()).check(ArchInfo.from_config(config_of("phi3")))  # described: accepted


def test_a_fold_that_changes_the_model_fails_the_pass(monkeypatch, tiny_tokenizer):
    """The quantize pass checks its AWQ folds against the float model before them: a wrong layout (here Gemma
    2 described as Llama) is an error naming the family, not a quietly worse model."""
    import dataclasses

    import llmopt.architectures as architectures
    from llmopt.errors import ResultValidationError
    from llmopt.evaluation.calibration import calibration_batches
    from llmopt.passes.quantize import QuantizeConfig, QuantizePass
    from llmopt.state import ModelState, PassContext

    wrong = dataclasses.replace(describe("gemma2"), groups=describe("llama").groups)
    monkeypatch.setitem(architectures.ARCHITECTURES, "gemma2", wrong)
    windows, _ = calibration_batches(tiny_tokenizer, data="builtin", text_field="text", samples=2, seq_len=32, seed=0)
    with pytest.raises(ResultValidationError, match="awq scale folds changed the float model") as failed:
        QuantizePass(QuantizeConfig(awq=True, group_size=16)).run(
            ModelState(tiny("gemma2"), tiny_tokenizer),
            PassContext(seed=0, progress=lambda *_: None, calibration=lambda: windows))
    print(failed.value)
    assert "model_type 'gemma2'" in failed.value.hint
