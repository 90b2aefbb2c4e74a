"""Pruning: identity at 0%, shapes and config, known-answer importance, plan-time checks, load/generate/export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmopt.architectures import ARCHITECTURES, describe
from llmopt.errors import RecipeError
from llmopt.model import ArchInfo
from llmopt.passes.prune import PruneConfig, PrunePass
from llmopt.passes.prune_sparse import lowest_mask, sparsegpt
from llmopt.recipe import load_recipe, parse_recipe
from llmopt.state import ModelState, PassContext
from tests.conftest import TINY_VOCAB, tiny_llama

SMOL = ArchInfo("llama", 30, 576, 1536, 9, 3, 64, 49152, True)  # SmolLM2-135M


def tiny(layers: int = 2, **overrides):
    """tiny_llama with another layer count."""
    from transformers import AutoModelForCausalLM

    config = tiny_llama(**{"num_hidden_layers": layers, **overrides}).config
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def windows(count: int = 4, length: int = 48, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, TINY_VOCAB, length).astype(np.int64) for _ in range(count)]


def prune(model, **config) -> dict:
    data = windows()
    state = PrunePass(PruneConfig(**config)).run(ModelState(model, None), PassContext(calibration=lambda: data))
    return state.pass_info["prune"]


def logits(model, ids: np.ndarray | None = None) -> torch.Tensor:
    ids = windows(1, 32, seed=9)[0] if ids is None else ids
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids)[None]).logits[0]  # (T, V)


@pytest.mark.parametrize("config", [
    {"method": "width", "mlp": 0.0, "heads": 0},
    {"method": "depth", "num_layers": 0},
    {"method": "unstructured", "sparsity": 0.0},
    {"method": "unstructured", "sparsity": 0.0, "criterion": "sparsegpt"},
])
def test_zero_pruning_is_the_identity(config):
    model = tiny()
    before = logits(model)
    info = prune(model, **config)
    diff = float((logits(model) - before).abs().max())
    print(config, "max |Δlogit| =", diff)
    assert diff == 0.0
    assert info["parameters"]["before"] == info["parameters"]["after"]


def test_width_shapes_config_and_record():
    model = tiny()
    info = prune(model, method="width", mlp=0.25, heads=2)  # 2 heads = one KV group of 2 query heads
    c = model.config
    assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (96, 2, 1, 16)
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        assert tuple(m.gate_proj.weight.shape) == tuple(m.up_proj.weight.shape) == (96, 64)
        assert tuple(m.down_proj.weight.shape) == (64, 96)
        assert tuple(a.q_proj.weight.shape) == (32, 64) and tuple(a.k_proj.weight.shape) == (16, 64)
        assert tuple(a.v_proj.weight.shape) == (16, 64) and tuple(a.o_proj.weight.shape) == (64, 32)
    assert ArchInfo.from_config(c) == PrunePass(PruneConfig(method="width", mlp=0.25, heads=2)).check(
        ArchInfo.from_config(tiny().config), "passes[0]")
    # 32 channels x 3 x 64 and 2 heads' q/o + one KV head's k/v (16 x 64 each), in each of 2 layers.
    expected = 123200 - 2 * (32 * 3 * 64 + 4 * 16 * 64 + 2 * 16 * 64)
    print(info["parameters"], "expected after:", expected)
    assert info["parameters"]["after"] == expected
    assert [len(r) for r in info["removed_mlp_channels"]] == [32, 32]
    assert all(len(r) == 2 and r[1] == r[0] + 1 and r[0] % 2 == 0 for r in info["removed_heads"])  # whole groups
    assert info["calibration_windows"] == 4
    # Seeded data and index tie-breaks: the same choice twice.
    assert prune(tiny(), method="width", mlp=0.25, heads=2)["removed_mlp_channels"] == info["removed_mlp_channels"]


def test_query_unit_keeps_the_kv_heads_and_groups_stay_uniform():
    model = tiny()
    info = prune(model, method="width", heads=2, head_unit="query", importance="wanda")
    c = model.config
    assert (c.num_attention_heads, c.num_key_value_heads) == (2, 2)
    for removed, layer in zip(info["removed_heads"], model.model.layers):
        assert sorted(h // 2 for h in removed) == [0, 1]  # one query head from each group
        assert layer.self_attn.num_key_value_groups == 1 and layer.self_attn.k_proj.out_features == 32
    logits(model)  # still runs


@pytest.mark.parametrize("importance", ["activation", "wanda", "magnitude"])
def test_a_dead_channel_and_a_dead_kv_group_go_first(importance):
    model = tiny()
    dead_channel, layer = 37, model.model.layers[1]
    with torch.no_grad():
        # The channel's output is act(gate) * up = 0 and nothing reads it.
        layer.mlp.gate_proj.weight[dead_channel] = 0
        layer.mlp.up_proj.weight[dead_channel] = 0
        layer.mlp.down_proj.weight[:, dead_channel] = 0
        # KV group 1 (query heads 2, 3): its values are zero, so both heads output zero and nothing reads them.
        layer.self_attn.v_proj.weight[16:32] = 0
        layer.self_attn.q_proj.weight[32:64] = 0
        layer.self_attn.o_proj.weight[:, 32:64] = 0
    info = prune(model, method="width", mlp=0.25, heads=2, importance=importance)
    print(importance, "removed in layer 1:", info["removed_mlp_channels"][1][:8], "...", info["removed_heads"][1])
    assert dead_channel in info["removed_mlp_channels"][1]
    assert info["removed_heads"][1] == [2, 3]


def test_block_influence_removes_a_layer_that_does_nothing_and_the_cache_still_works():
    model = tiny(layers=4)
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: output == input
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    before = logits(model)
    info = prune(model, method="depth", num_layers=1)
    print("block influence:", info["scores"])
    assert info["removed_layers"] == [2] and info["scores"][2] == pytest.approx(0, abs=1e-6)
    assert min(s for i, s in enumerate(info["scores"]) if i != 2) > 1e-3
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    diff = float((logits(model) - before).abs().max())
    assert diff < 1e-5, diff
    # Greedy decoding with the KV cache (indexed by layer_idx) agrees with recomputing everything.
    prompt = torch.as_tensor(windows(1, 8, seed=3)[0])[None]
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        ids = prompt
        for _ in range(6):
            ids = torch.cat([ids, model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, ids)


def test_depth_last_and_perplexity_choices():
    model = tiny(layers=4, layer_types=["full_attention"] * 4)
    info = prune(model, method="depth", ratio=0.5, layer_choice="last")
    assert info["removed_layers"] == [2, 3] and info["calibration_windows"] == 0
    assert model.config.layer_types == ["full_attention"] * 2  # per-layer config lists follow
    model = tiny(layers=4)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    info = prune(model, method="depth", num_layers=1, layer_choice="perplexity")
    print("loss increase when skipped:", info["scores"])
    assert info["scores"][1] == pytest.approx(0, abs=1e-6) and len(info["removed_layers"]) == 1


def test_wanda_keeps_the_weights_that_read_large_inputs():
    w = torch.ones(3, 8)
    norms = torch.tensor([1.0, 9, 1, 9, 1, 9, 1, 9])  # ||x_j||
    mask = lowest_mask(w * norms, 0.5, False, per_row=True)
    assert mask[:, ::2].all() and not mask[:, 1::2].any()
    mask = lowest_mask(torch.randn(5, 16).abs(), 0.5, True, per_row=False)
    assert torch.equal(mask.reshape(5, 4, 4).sum(-1), torch.full((5, 4), 2))  # exactly 2 of every 4


def reference_obs(w: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SparseGPT's update for a given mask, written the slow way: for each column in turn, invert the
    Hessian of the columns not yet fixed and move them to absorb the error of zeroing (float64)."""
    w, cols = w.double().clone(), w.shape[1]
    h = hessian.double() + 0.01 * hessian.diag().double().mean() * torch.eye(cols, dtype=torch.float64)
    for i in range(cols):
        hinv = torch.linalg.inv(h[i:, i:])  # (cols - i, cols - i)
        kept = torch.where(mask[:, i], torch.zeros_like(w[:, i]), w[:, i])
        w[:, i:] -= ((w[:, i] - kept) / hinv[0, 0])[:, None] * hinv[0][None, :]
        w[:, i] = kept
    return w


@pytest.mark.parametrize("two_four", [False, True])
def test_sparsegpt_matches_a_reference_and_beats_wanda(two_four):
    torch.manual_seed(0)
    x = torch.randn(2048, 32) @ torch.randn(32, 32)  # (tokens, in): correlated inputs, where the update matters
    w = torch.randn(16, 32)
    hessian = x.T @ x / len(x)
    pruned = sparsegpt(w, hessian, 0.5, two_four)
    reference_diff = float((pruned.double() - reference_obs(w, hessian, pruned == 0)).abs().max())
    wanda = w.masked_fill(lowest_mask(w.abs() * hessian.diag().sqrt(), 0.5, two_four, per_row=True), 0)
    errors = {name: float(((x @ (w - v).T) ** 2).mean()) for name, v in (("sparsegpt", pruned), ("wanda", wanda))}
    print(f"two_four={two_four}: output error {errors}, |ours - reference| {reference_diff:.1e}")
    assert reference_diff < 1e-4
    assert float((pruned == 0).float().mean()) == 0.5
    assert errors["sparsegpt"] < 0.85 * errors["wanda"]


@pytest.mark.parametrize("method,criterion", [("unstructured", "wanda"), ("unstructured", "magnitude"),
                                              ("2:4", "wanda"), ("2:4", "sparsegpt")])
def test_sparsity_is_achieved_and_recorded(method, criterion):
    model = tiny()
    info = prune(model, method=method, criterion=criterion)
    layer = model.model.layers[0]
    down = layer.mlp.down_proj.weight
    print(method, criterion, info["achieved_sparsity"], info["sparsity_per_layer"])
    assert info["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    if method == "2:4":
        assert bool(((down.reshape(64, -1, 4) == 0).sum(-1) >= 2).all())
    elif criterion == "wanda":
        assert bool(((down == 0).sum(1) == 64).all())  # Wanda compares within each output row
    assert model.config.llmopt_sparsity["achieved_sparsity"] == info["achieved_sparsity"]
    assert "no faster" in info["note"] and model.lm_head.weight.count_nonzero() == model.lm_head.weight.numel()


def test_check_returns_the_planned_shape():
    def planned(**config):
        return PrunePass(PruneConfig(**config)).check(SMOL, "passes[0]")

    assert planned(method="width", mlp=0.25).intermediate_size == 1152
    arch = planned(method="width", heads=3)
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim) == (6, 2, 64)
    arch = planned(method="width", heads=0.34, head_unit="query")
    assert (arch.num_heads, arch.num_kv_heads) == (6, 3)
    assert planned(method="depth", num_layers=4).num_layers == 26
    assert planned(method="depth", ratio=0.5).num_layers == 15
    assert planned(method="2:4") == SMOL
    budget = planned(method="width", params=0.2)
    print("params 0.2 ->", budget.intermediate_size)
    assert budget.intermediate_size % 32 == 0 and 900 < budget.intermediate_size < 1100


@pytest.mark.parametrize("config,arch,match", [
    ({"method": "width", "heads": 2}, SMOL, r"passes\[0\]\.heads: 2 of 9 heads.*allows 3, 6 heads"),
    ({"method": "width", "heads": 9}, SMOL, r"passes\[0\]\.heads"),
    ({"method": "width", "heads": 2, "head_unit": "query"}, SMOL, r"query heads from each of the 3"),
    ({"method": "width", "mlp": 0.01}, SMOL, r"passes\[0\]\.mlp: .*keeps 1536"),
    ({"method": "width", "params": 0.9}, SMOL, r"passes\[0\]\.params"),
    ({"method": "depth", "num_layers": 30}, SMOL, r"passes\[0\]\.num_layers: removing 30 .* leaves none"),
    ({"method": "depth", "ratio": 0.99}, SMOL, r"passes\[0\]\.ratio"),
    ({"method": "unstructured"}, ArchInfo("gpt2", 2, 64, 256, 4, 4, 16, 100, False),
     r"passes\[0\]\.method: unstructured pruning does not handle model_type 'gpt2'"),
    ({"method": "width", "mlp": 0.5}, ArchInfo("qwen3_moe", 2, 64, 256, 4, 4, 16, 100, False),
     r"passes\[0\]\.method: width pruning does not handle model_type 'qwen3_moe'"),
])
def test_impossible_targets_fail_at_plan_time(config, arch, match):
    with pytest.raises(RecipeError, match=match):
        PrunePass(PruneConfig(**config)).check(arch, "passes[0]")


@pytest.mark.parametrize("body,message", [
    ("method: depth\n    mlp: 0.25\n", "mlp (width) do not apply to method 'depth'"),
    ("method: width\n", "needs a target"),
    ("method: width\n    mlp: 0.2\n    params: 0.2\n", "not both"),
    ("method: depth\n", "exactly one of num_layers"),
    ("method: width\n    heads: 1.5\n", "a fraction must be in [0, 1)"),
    ("method: 2:4\n    sparsity: 0.6\n", "sparsity (unstructured) do not apply"),  # unquoted 2:4 too
    ("method: width\n    mlp: 1.0\n", "passes[0].mlp"),
])
def test_bad_combinations_are_recipe_errors(body, message):
    with pytest.raises(RecipeError) as info:
        parse_recipe("passes:\n  - type: prune\n    " + body, "r.yaml")
    print(info.value)
    assert message in str(info.value) and "r.yaml:" in str(info.value)


def test_shipped_recipes_plan_on_smollm2_shapes():
    for name in ("prune-width", "prune-depth", "sparse-2of4"):
        (config,) = load_recipe(name).passes
        arch = PrunePass(config).check(SMOL, "passes[0]")
        print(name, arch.intermediate_size, arch.num_layers)
    assert PrunePass(load_recipe("prune-width").passes[0]).check(SMOL, "p").intermediate_size == 1152


# ---- every family -------------------------------------------------------------------------------------

WIDTH_FAMILIES = sorted(t for t, a in ARCHITECTURES.items() if a.prune)
# Cohere's q/k norms (off by default) have a weight per head, which head removal slices.
VARIANTS = [(t, {}) for t in WIDTH_FAMILIES] + [("cohere", {"use_qk_norm": True})]


def family(model_type: str, **overrides):
    """The family-matrix model (tests/core/test_architectures.py), norms and biases off their init."""
    from tests.core.test_architectures import tiny as tiny_family

    return tiny_family(model_type, **overrides)


@pytest.mark.parametrize("head_unit", ["group", "query"])
@pytest.mark.parametrize("model_type,overrides", VARIANTS, ids=[t + ("+qk_norm" if o else "") for t, o in VARIANTS])
def test_removing_what_carries_nothing_keeps_the_function_on_every_family(model_type, overrides, head_unit):
    """MLP channel 5 and the query heads of KV group 1 (with head_unit query: head 1 of each group) zeroed where
    they are read and written: magnitude pruning removes exactly them and the logits do not move, on every family
    width pruning takes (fused qkv and gate_up, q/k norms shared, per head or over all heads, parallel blocks).
    The pruned model saves and reloads."""
    import copy

    from llmopt.architectures import describe
    from llmopt.passes.projections import gate_up, qkv, set_gate_up, set_qkv

    model = family(model_type, num_hidden_layers=3, **overrides)
    arch, hd = describe(model_type), model.model.layers[0].self_attn.head_dim
    heads = [2, 3] if head_unit == "group" else [1, 3]
    with torch.no_grad():
        # A residual stream well above the norms' epsilon: OLMo 2's q/k norms read it directly, and at the init's
        # 0.02 their epsilon (which nothing can rescale) would be a sizeable part of the variance they divide by.
        model.model.embed_tokens.weight.mul_(500)
        for layer in model.model.layers:
            gate, up = gate_up(layer.mlp, arch)
            gate.weight[5], up.weight[5] = 0, 0
            layer.mlp.down_proj.weight[:, 5] = 0
            set_gate_up(layer.mlp, arch, gate, up)
            attn = layer.self_attn
            q, k, v = qkv(attn, arch)
            for h in heads:
                q.weight[h * hd:(h + 1) * hd] = 0
                attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
            if head_unit == "group":  # the group's keys too: OLMo 2's k norm runs over every KV head
                k.weight[hd:] = 0
            for proj in (q, k):
                if proj.bias is not None:
                    proj.bias.zero_()
            set_qkv(attn, arch, q, k, v)
    before = logits(model)
    pruned = copy.deepcopy(model)
    info = prune(pruned, method="width", mlp=1 / 128, multiple_of=1, heads=2, head_unit=head_unit,
                 importance="magnitude")
    change = float((logits(pruned) - before).abs().max() / before.abs().max())
    print(f"{model_type}{overrides} {head_unit}: removed heads {info['removed_heads'][0]}, channels "
          f"{info['removed_mlp_channels'][0]}, relative logit change {change:.2e}")
    assert info["removed_mlp_channels"] == [[5]] * 3 and info["removed_heads"] == [heads] * 3
    assert change < 1e-5, f"{model_type}: {change:.2e}"


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_family_prunes_saves_and_reloads(model_type, tmp_path):
    """Width (where the family takes it) and depth pruning, then save and reload: the same logits and the
    planned shapes, through the KV cache too."""
    import transformers

    from tests.passes.test_gqa import cached_decode_matches

    model = family(model_type, num_hidden_layers=3)
    width = describe(model_type).prune
    if width:
        prune(model, method="width", mlp=0.25, heads=2, head_unit="query")
    prune(model, method="depth", num_layers=1)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    diff = float((logits(loaded) - logits(model)).abs().max())
    cached = cached_decode_matches(loaded, torch.as_tensor(windows(1, 40, seed=5)[0])[None])
    print(model_type, loaded.config.intermediate_size, loaded.config.num_attention_heads, diff, cached)
    shape = (96, 2, 2) if width else (128, 4, 2)
    config = loaded.config
    assert (config.intermediate_size, config.num_attention_heads, config.num_hidden_layers) == shape
    assert diff < 1e-5 and cached < 1e-4


def test_depth_pruning_keeps_which_moe_layers_are_dense():
    """Qwen3-MoE names its dense layers by index (mlp_only_layers): removing layer 0 of [sparse, dense, sparse]
    must leave [dense, sparse] after a reload, not the old indices."""
    import transformers

    model = family("qwen3_moe", num_hidden_layers=3, mlp_only_layers=[1])
    prune(model, method="depth", num_layers=1, layer_choice="last")  # removes layer 2
    assert model.config.mlp_only_layers == [1]
    model = family("qwen3_moe", num_hidden_layers=3, mlp_only_layers=[1])
    from llmopt.passes.prune_structured import remove_layers

    remove_layers(model, [0])
    reloaded = transformers.AutoModelForCausalLM.from_config(model.config)
    kinds = [hasattr(layer.mlp, "experts") for layer in reloaded.model.layers]
    assert model.config.mlp_only_layers == [0] and kinds == [False, True]


@pytest.mark.slow
def test_end_to_end_safetensors_loads_and_generates(tiny_model_dir, fast_recipe, tmp_path, tiny_tokenizer):
    import llmopt
    from transformers import AutoModelForCausalLM

    recipe = fast_recipe("passes:\n  - type: prune\n    method: width\n    mlp: 0.25\n    heads: 2\n"
                         "export: {format: safetensors}\ncalibration: {samples: 4, seq_len: 64}\n")
    result = llmopt.optimize(recipe, model=str(tiny_model_dir), output=tmp_path / "out")
    report = result.report
    b, o = report.baseline.parameters, report.optimized.parameters
    print(f"parameters {b} -> {o}, perplexity {report.baseline.perplexity:.1f} -> {report.optimized.perplexity:.1f}")
    assert b - o == 2 * (32 * 3 * 64 + 4 * 16 * 64 + 2 * 16 * 64)
    assert report.optimized.size_bytes < report.baseline.size_bytes
    info = report.passes[0].info
    assert info["after"] == {"intermediate_size": 96, "num_attention_heads": 2, "num_key_value_heads": 1}
    assert len(info["removed_mlp_channels"]) == 2 and info["calibration_windows"] == 4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert model.config.intermediate_size == 96 and model.model.layers[0].self_attn.k_proj.out_features == 16
    ids = tiny_tokenizer("def f(x):", return_tensors="pt")
    # The rewritten KV heads through the cache: the same greedy tokens as recomputing every step without it.
    options = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=2)
    cached, uncached = model.generate(**ids, **options), model.generate(**ids, use_cache=False, **options)
    assert torch.equal(cached, uncached), (cached, uncached)


@pytest.mark.slow
def test_end_to_end_onnx_of_a_width_pruned_model(tiny_model_dir, fast_recipe, tmp_path):
    import llmopt

    recipe = fast_recipe("passes:\n  - type: prune\n    method: width\n    mlp: 0.5\n"
                         "calibration: {samples: 4, seq_len: 64}\n")
    result = llmopt.optimize(recipe, model=str(tiny_model_dir), output=tmp_path / "onnx")
    r = result.report
    print(f"ONNX: parameters {r.baseline.parameters} -> {r.optimized.parameters}, max |Δlogit| vs torch "
          f"{r.validation.max_abs_logit_diff:.2e}, decode {r.baseline.decode_tokens_per_s:.0f} -> "
          f"{r.optimized.decode_tokens_per_s:.0f} tok/s")
    assert r.baseline.parameters - r.optimized.parameters == 2 * 64 * 3 * 64
    assert r.validation.passed and r.validation.max_abs_logit_diff < 1e-3


def test_onnx_of_a_head_pruned_model_matches_torch(tmp_path):
    from llmopt.evaluation.runners import OrtRunner, TorchRunner
    from tests.conftest import write_onnx

    model = tiny()
    prune(model, method="width", heads=2)
    write_onnx(model, tmp_path)
    runner = OrtRunner(tmp_path)  # the cache's head_dim (16, not hidden_size // heads = 32) read from the graph
    ids = windows(1, 12, seed=5)[0]
    diff = float(np.abs(runner.logits(ids) - TorchRunner(model).logits(ids)).max())
    print("max |Δlogit| ONNX vs torch:", diff)
    assert diff < 1e-4
    assert np.array_equal(runner.generate(ids, 4), TorchRunner(model).generate(ids, 4))
