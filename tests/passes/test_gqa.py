"""GQA rewrite: identity at K = KV heads, shapes and record, mean-pooling reference, PCA vs mean, grouping,
plan-time checks, other architectures, save/reload/generate and export."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch

from llmopt.architectures import ARCHITECTURES, describe
from llmopt.errors import InputError, RecipeError
from llmopt.model import ArchInfo
from llmopt.passes.gqa import GqaConfig, GqaPass
from llmopt.passes.gqa_merge import choose_groups
from llmopt.recipe import parse_recipe
from llmopt.state import ModelState, PassContext
from tests.conftest import TINY_VOCAB, tiny_llama

SMOL = ArchInfo("llama", 30, 576, 1536, 9, 3, 64, 49152, True)  # SmolLM2-135M: 9 query heads, 3 KV heads


def tiny(kv: int = 2, layers: int = 2, heads: int = 4, hidden: int = 64, **overrides):
    """tiny_llama (4 query heads of 16) with another KV head count, layer count, head count or width."""
    from transformers import AutoModelForCausalLM

    config = tiny_llama(**overrides).config
    config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers = heads, kv, layers
    config.hidden_size = hidden
    config.head_dim = hidden // heads
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def windows(count: int = 8, length: int = 48, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, TINY_VOCAB, length).astype(np.int64) for _ in range(count)]


def gqa(model, k: int, method: str = "pca", data: list[np.ndarray] | None = None, seed: int = 0) -> dict:
    data = windows() if data is None else data
    state = GqaPass(GqaConfig(num_key_value_heads=k, method=method)).run(
        ModelState(model, None), PassContext(seed=seed, calibration=lambda: data))
    return state.pass_info["gqa"]


def logits(model, ids: np.ndarray | list[np.ndarray] | None = None) -> torch.Tensor:
    ids = windows(2, 32, seed=9) if ids is None else ids
    batch = torch.as_tensor(np.stack(ids) if isinstance(ids, list) else ids[None])
    with torch.no_grad():
        return model(input_ids=batch).logits  # (B, T, V)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the spread of b."""
    return float((a - b).abs().max() / (b - b.mean()).abs().max())


def kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean KL(reference || other) per position, nats."""
    p, q = reference.log_softmax(-1), other.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def merged_to_two(base, label: str = "", methods: tuple[str, ...] = ("mean", "pca")) -> tuple[dict, dict]:
    """Each method's 4 -> 2 KV-head merge of a copy of `base`: the relative logit change and the groups chosen."""
    reference = logits(base)
    errors, groups = {}, {}
    for method in methods:
        model = copy.deepcopy(base)
        info = gqa(model, 2, method)
        errors[method], groups[method] = relative(logits(model), reference), info["groups"]
        print(f"{label} {method}: groups {groups[method][0]}, relative max |Δlogit| {errors[method]:.2e}")
    return errors, groups


def heads_of(linear: torch.nn.Linear, hd: int = 16) -> torch.Tensor:
    return linear.weight.detach().reshape(-1, hd, linear.in_features)  # (heads, hd, in)


@pytest.fixture(scope="module")
def text_windows(tiny_tokenizer) -> list[np.ndarray]:
    """Real text: 16 calibration windows of 64 tokens, then 4 held-out evaluation windows."""
    from llmopt.evaluation.quality import token_windows
    from llmopt.evaluation.text import builtin_text

    return token_windows(tiny_tokenizer, builtin_text()[200_000:], 20 * 64, 64)


# ---- identity, shapes, record -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["mean", "pca"])
@pytest.mark.parametrize("kv", [4, 2])
def test_keeping_the_kv_heads_is_the_identity(method, kv):
    model = tiny(kv=kv)
    before = logits(model)
    info = gqa(model, kv, method)
    diff = relative(logits(model), before)
    print(f"{method} {kv}->{kv}: relative max |Δlogit| = {diff:.2e}, groups {info['groups']}")
    assert diff < (1e-6 if method == "mean" else 1e-4), f"diff={diff:.2e}"
    assert info["groups"] == [[[g] for g in range(kv)]] * 2
    assert model.config.num_key_value_heads == kv


def test_mean_needs_no_calibration_and_pca_says_it_does():
    model = tiny(kv=4)
    GqaPass(GqaConfig(num_key_value_heads=2, method="mean")).run(ModelState(model, None), PassContext())
    assert model.config.num_key_value_heads == 2
    with pytest.raises(InputError, match="calibration"):
        GqaPass(GqaConfig(num_key_value_heads=1)).run(ModelState(tiny(kv=4), None), PassContext())


@pytest.mark.parametrize("method", ["mean", "pca"])
@pytest.mark.parametrize("kv,k", [(4, 2), (4, 1), (2, 1)])
def test_shapes_config_and_record(method, kv, k):
    model = tiny(kv=kv)
    planned = GqaPass(GqaConfig(num_key_value_heads=k, method=method)).check(
        ArchInfo.from_config(model.config), "passes[0]")
    info = gqa(model, k, method)
    for layer in model.model.layers:
        a = layer.self_attn
        assert tuple(a.k_proj.weight.shape) == tuple(a.v_proj.weight.shape) == (k * 16, 64)
        assert tuple(a.q_proj.weight.shape) == tuple(a.o_proj.weight.shape) == (64, 64)
        assert a.num_key_value_groups == 4 // k
    assert model.config.num_key_value_heads == k and ArchInfo.from_config(model.config) == planned
    before, after = info["kv_cache_bytes_per_token_before"], info["kv_cache_bytes_per_token_after"]
    print(f"{method} {kv}->{k}: KV bytes/token {before} -> {after}, groups {info['groups']}")
    assert before == 2 * 2 * kv * 16 * 4 and after == before * k // kv
    assert (info["num_key_value_heads_before"], info["num_key_value_heads_after"], info["method"]) == (kv, k, method)
    assert len(info["groups"]) == 2
    for groups in info["groups"]:  # each layer: K groups of equal size covering every old KV head once
        assert len(groups) == k and sorted(itertools.chain(*groups)) == list(range(kv))
        assert {len(g) for g in groups} == {kv // k}
    if method == "pca":
        assert info["calibration_tokens"] == 8 * 48 and info["keys"] == "RoPE-commuting PCA"
        assert len(info["relative_error_keys"]) == len(info["relative_error_values"]) == 2
        assert all(0 <= e < 1 for e in info["relative_error_keys"] + info["relative_error_values"]), info
    else:
        assert info["groups"] == [[list(range(j * kv // k, (j + 1) * kv // k)) for j in range(k)]] * 2


def test_saves_reloads_and_generates_with_the_kv_cache(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny(kv=4)
    gqa(model, 1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    diff = float((logits(loaded) - logits(model)).abs().max())
    print("reloaded max |Δlogit| =", diff)
    assert loaded.config.num_key_value_heads == 1 and loaded.model.layers[0].self_attn.k_proj.out_features == 16
    assert diff < 1e-6, f"diff={diff:.2e}"

    ids = torch.as_tensor(windows(1, 10, seed=3)[0])[None]
    with torch.no_grad():
        cache = loaded(input_ids=ids, use_cache=True).past_key_values
        keys = cache.layers[0].keys if hasattr(cache, "layers") else cache.key_cache[0]
        options = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=2)
        cached = loaded.generate(ids, use_cache=True, **options)
        uncached = loaded.generate(ids, use_cache=False, **options)
        in_memory = model.generate(ids, use_cache=True, **options)
    print("cache keys", tuple(keys.shape), "tokens", cached[0, 10:].tolist())
    assert tuple(keys.shape) == (1, 1, 10, 16)  # (batch, KV heads, positions, head_dim)
    assert cached.shape == (1, 18)
    assert torch.equal(cached, uncached) and torch.equal(cached, in_memory)


# ---- what the merges compute --------------------------------------------------------------------


@pytest.mark.parametrize("kv,k", [(4, 2), (2, 1)])
def test_mean_pooling_averages_contiguous_heads(kv, k):
    model = tiny(kv=kv)
    old = [{n: getattr(l.self_attn, n).weight.detach().clone() for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
           for l in model.model.layers]
    gqa(model, k, "mean")
    per = kv // k
    for layer, before in zip(model.model.layers, old):
        a = layer.self_attn
        for name in ("k_proj", "v_proj"):
            heads = before[name].reshape(kv, 16, 64)
            expected = torch.cat([heads[j * per:(j + 1) * per].mean(0) for j in range(k)])  # by hand
            err = float((getattr(a, name).weight - expected).abs().max())
            print(f"{name}: max |new - mean of old heads| = {err:.2e}")
            assert err < 1e-7, f"{name} err={err:.2e}"
        assert torch.equal(a.q_proj.weight, before["q_proj"]) and torch.equal(a.o_proj.weight, before["o_proj"])


def interleaved_duplicates(**overrides):
    """MHA (4 KV heads) where KV head 2 is a copy of head 0 and head 3 of head 1 (keys and values)."""
    model = tiny(kv=4, **overrides)
    with torch.no_grad():
        for layer in model.model.layers:
            for name in ("k_proj", "v_proj"):
                w = heads_of(getattr(layer.self_attn, name))  # a view on the weight
                w[2], w[3] = w[0].clone(), w[1].clone()
    return model


def test_pca_finds_non_contiguous_duplicate_heads_and_is_lossless():
    base = interleaved_duplicates()
    reference = logits(base)
    errors = {}
    for method in ("mean", "pca"):
        model = copy.deepcopy(base)
        info = gqa(model, 2, method)
        out = logits(model)
        errors[method] = (relative(out, reference), kl(reference, out))
        print(f"{method}: groups {info['groups']}, relative max |Δlogit| {errors[method][0]:.2e}, "
              f"KL {errors[method][1]:.2e}")
        if method == "pca":
            assert info["groups"] == [[[0, 2], [1, 3]]] * 2
            assert max(info["relative_error_keys"] + info["relative_error_values"]) < 1e-6, info
        else:
            assert info["groups"] == [[[0, 1], [2, 3]]] * 2
    (pca_diff, pca_kl), (mean_diff, mean_kl) = errors["pca"], errors["mean"]
    assert pca_diff < 1e-4, f"pca diff={pca_diff:.2e}"
    assert mean_diff > 1e-2, f"mean diff={mean_diff:.2e}"
    assert pca_kl < 1e-4 * mean_kl, f"KL pca={pca_kl:.2e} mean={mean_kl:.2e}"


@pytest.mark.parametrize("kv,k", [(4, 2), (4, 1), (2, 1)])
def test_pca_beats_mean_on_real_text(text_windows, kv, k):
    calibration, held_out = text_windows[:16], text_windows[16:]
    base = tiny(kv=kv)
    reference = logits(base, held_out)
    scores = {}
    for method in ("mean", "pca"):
        model = copy.deepcopy(base)
        gqa(model, k, method, data=calibration)
        out = logits(model, held_out)
        scores[method] = (float(((out - reference) ** 2).mean() / reference.var()), kl(reference, out))
    print(f"{kv}->{k}: logit MSE/var mean {scores['mean'][0]:.3e} pca {scores['pca'][0]:.3e}; "
          f"KL mean {scores['mean'][1]:.2e} pca {scores['pca'][1]:.2e}")
    assert scores["pca"][0] < 0.7 * scores["mean"][0], scores
    assert scores["pca"][1] < 0.7 * scores["mean"][1], scores


def test_pca_merges_heads_that_differ_by_a_rope_commuting_rotation_losslessly():
    """Key head 2 = head 0 with every RoPE pair rotated and scaled (a complex scale per pair), value head 2 =
    an invertible mix of head 0's values, same for heads 3 and 1: PCA merges {0, 2} and {1, 3} exactly."""
    base = tiny(kv=4)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in base.model.layers:
            k, v = heads_of(layer.self_attn.k_proj), heads_of(layer.self_attn.v_proj)
            for src, dst in ((0, 2), (1, 3)):
                theta = torch.rand(8, 1, generator=gen) * 6.28
                scale = 0.5 + torch.rand(8, 1, generator=gen)
                re, im = k[src, :8], k[src, 8:]
                c, s = scale * torch.cos(theta), scale * torch.sin(theta)
                k[dst] = torch.cat([c * re - s * im, s * re + c * im])
                v[dst] = (torch.eye(16) + 0.3 * torch.randn(16, 16, generator=gen)) @ v[src]
    errors, groups = merged_to_two(base)
    assert groups["pca"] == [[[0, 2], [1, 3]]] * 2
    assert errors["pca"] < 1e-4, f"pca={errors['pca']:.2e}"
    assert errors["mean"] > 100 * errors["pca"], f"mean={errors['mean']:.2e} pca={errors['pca']:.2e}"


def test_k_that_does_not_divide_the_kv_heads_splits_a_kv_head_between_groups(text_windows):
    """6 query heads on 3 KV heads -> 2: query heads 0-2 and 3-5, so old KV head 1 serves both new heads."""
    calibration, held_out = text_windows[:16], text_windows[16:]
    base = tiny(kv=3, heads=6, hidden=96)
    reference = logits(base, held_out)
    errors = {}
    for method in ("mean", "pca"):
        model = copy.deepcopy(base)
        info = gqa(model, 2, method, data=calibration)
        out = logits(model, held_out)
        errors[method] = float(((out - reference) ** 2).mean() / reference.var())
        a = model.model.layers[0].self_attn
        print(f"{method}: groups {info['groups']}, logit MSE/var {errors[method]:.3e}")
        assert info["groups"] == [[[0, 1], [1, 2]]] * 2
        assert tuple(a.k_proj.weight.shape) == (32, 96) and tuple(a.q_proj.weight.shape) == (96, 96)
        assert bool(torch.isfinite(out).all())
    assert errors["pca"] < 0.7 * errors["mean"], errors


# ---- grouping -------------------------------------------------------------------------------------


def clustered_cost(positions: list[float]):
    return lambda group: sum((positions[a] - positions[b]) ** 2 for a, b in itertools.combinations(group, 2))


@pytest.mark.parametrize("max_enumerate", [20_000, 0])  # exhaustive, then the seeded local search
@pytest.mark.parametrize("positions,size,optimum", [
    ([0, 5, 10, 15, 0.1, 5.1, 10.1, 15.1], 2, [(0, 4), (1, 5), (2, 6), (3, 7)]),
    ([0, 5, 0.1, 5.1, 0.2, 5.2, 0.3, 5.3], 4, [(0, 2, 4, 6), (1, 3, 5, 7)]),
    ([7, 0, 3, 0.2, 7.1, 3.3, 0.1, 3.1, 7.2], 3, [(0, 4, 8), (1, 3, 6), (2, 5, 7)]),
])
def test_choose_groups_finds_a_known_optimum(positions, size, optimum, max_enumerate):
    cost = clustered_cost(positions)
    groups = choose_groups(len(positions), size, cost, seed=0, max_enumerate=max_enumerate)
    total = sum(cost(g) for g in groups)
    print(f"max_enumerate={max_enumerate}: {groups} total cost {total:.3f}")
    assert groups == optimum, f"total={total:.3f}"


def test_choose_groups_exhaustive_is_the_brute_force_minimum_and_search_is_seeded():
    rng = np.random.default_rng(1)
    table = {g: float(rng.random()) for g in itertools.combinations(range(6), 2)}
    cost = lambda g: table[tuple(sorted(g))]  # noqa: E731
    brute = min((sum(cost(p[j:j + 2]) for j in (0, 2, 4)), p) for p in itertools.permutations(range(6)))[0]
    groups = choose_groups(6, 2, cost)
    total = sum(cost(g) for g in groups)
    print(f"exhaustive {groups} total {total:.4f}, brute force {brute:.4f}")
    assert abs(total - brute) < 1e-12
    runs = [choose_groups(6, 2, cost, seed=s, max_enumerate=0) for s in (3, 3, 4)]
    assert runs[0] == runs[1]
    assert all(sum(cost(g) for g in r) >= brute - 1e-12 for r in runs)
    assert choose_groups(6, 1, cost) == [(i,) for i in range(6)] and choose_groups(6, 6, cost) == [tuple(range(6))]


def test_same_seed_same_weights_with_many_heads_local_search():
    # 16 KV heads of 4 into 8 pairs: 2,027,025 partitions, so the pass takes the seeded local search.
    base = tiny(kv=16, heads=16, layers=1)
    models, infos = [copy.deepcopy(base) for _ in range(2)], []
    for model in models:
        infos.append(gqa(model, 8, data=windows(4, 32), seed=0))
    print("groups:", infos[0]["groups"])
    assert infos[0]["groups"] == infos[1]["groups"]
    a, b = models[0].state_dict(), models[1].state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert models[0].model.layers[0].self_attn.k_proj.out_features == 8 * 4


# ---- plan-time checks ---------------------------------------------------------------------------


MHA = ArchInfo("llama", 2, 64, 128, 4, 4, 16, TINY_VOCAB, False)


@pytest.mark.parametrize("k,arch,match,valid", [
    (3, MHA, r"passes\[0\]\.num_key_value_heads: 3 is not valid .*4 query heads, 4 KV heads", "1, 2, 4"),
    (8, MHA, r"passes\[0\]\.num_key_value_heads: 8 is not valid", "1, 2, 4"),
    (4, ArchInfo("llama", 2, 64, 128, 4, 2, 16, TINY_VOCAB, False), r"at most the current KV heads", "1, 2"),
    (2, SMOL, r"9 query heads, 3 KV heads", "1, 3"),
    (1, ArchInfo("gpt2", 2, 64, 256, 4, 4, 16, 100, False), r"model_type 'gpt2'", None),
])
def test_impossible_targets_fail_at_plan_time(k, arch, match, valid):
    with pytest.raises(RecipeError, match=match) as info:
        GqaPass(GqaConfig(num_key_value_heads=k)).check(arch, "passes[0]")
    print(info.value)
    if valid is not None:
        assert f"Valid values: {valid} " in info.value.hint
    else:
        from llmopt.architectures import ARCHITECTURES

        able = ", ".join(t for t, a in sorted(ARCHITECTURES.items()) if a.gqa)
        assert f"Supported: {able}." in info.value.hint and "llama" in able


def test_check_returns_the_planned_shape():
    arch = GqaPass(GqaConfig(num_key_value_heads=1)).check(SMOL, "passes[0]")
    assert arch == ArchInfo("llama", 30, 576, 1536, 9, 1, 64, 49152, True)
    assert arch.kv_cache_bytes_per_token() * 3 == SMOL.kv_cache_bytes_per_token()


def test_an_unsupported_model_is_refused_by_run():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=TINY_VOCAB, n_embd=64, n_layer=1, n_head=4)).eval()
    with pytest.raises(RecipeError, match="model_type 'gpt2'"):
        gqa(model, 2)


@pytest.mark.parametrize("body,message", [
    ("num_key_value_heads: 0\n", "num_key_value_heads"),
    ("num_key_value_heads: 2\n    method: svd\n", "method"),
    ("method: pca\n", "num_key_value_heads"),
])
def test_bad_configs_are_recipe_errors(body, message):
    with pytest.raises(RecipeError) as info:
        parse_recipe("passes:\n  - type: gqa\n    " + body, "r.yaml")
    print(info.value)
    assert message in str(info.value) and "r.yaml:" in str(info.value)


def test_validate_rejects_an_invalid_k_for_the_model(tiny_model_dir, fast_recipe):
    import llmopt

    ok = llmopt.validate(fast_recipe("passes:\n  - type: gqa\n    num_key_value_heads: 1\n"), model=str(tiny_model_dir))
    assert (ok.arch.num_kv_heads, ok.planned_arch.num_kv_heads) == (2, 1)
    with pytest.raises(RecipeError, match=r"passes\[0\]\.num_key_value_heads: 3") as info:
        llmopt.validate(fast_recipe("passes:\n  - type: gqa\n    num_key_value_heads: 3\n"), model=str(tiny_model_dir))
    print(info.value)
    assert "Valid values: 1, 2 " in str(info.value)


# ---- every family ------------------------------------------------------------------------------------

GQA_FAMILIES = sorted(t for t, a in ARCHITECTURES.items() if a.gqa)
# Cohere's q/k norms (off by default) have a weight per head: merging averages them, reordering moves them.
VARIANTS = [(t, {}) for t in GQA_FAMILIES] + [("cohere", {"use_qk_norm": True})]


def family(model_type: str, **overrides):
    """The family-matrix model (tests/core/test_architectures.py), norms and biases off their init."""
    from tests.core.test_architectures import tiny as tiny_family

    return tiny_family(model_type, **overrides)


def attention_parts(attn, model_type: str):
    from llmopt.passes.projections import qkv

    return qkv(attn, describe(model_type))


def cached_decode_matches(model, ids: torch.Tensor) -> float:
    """max |logit difference| between one forward over `ids` and a prefill of all but the last 8 tokens
    followed by 8 single-token steps through the KV cache: the rewritten cache layout must hold."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.40's name
    with torch.no_grad():
        full = model(input_ids=ids).logits
        out = model(input_ids=ids[:, :-8], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(ids.shape[1] - 8, ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{name: cache})
            cache = out.past_key_values
            steps.append(out.logits)
    return float((torch.cat(steps, 1) - full).abs().max())


@pytest.mark.parametrize("model_type", GQA_FAMILIES)
def test_every_family_identity_merge_cached_decode_save_and_reload(model_type, tmp_path):
    """On every family the pass takes: K = current KV heads keeps the function; 2 -> 1 changes it, decodes through
    the KV cache as it computes in one pass (over a sequence past every window), saves and reloads."""
    from transformers import AutoModelForCausalLM

    base = family(model_type)
    reference = logits(base)
    same = copy.deepcopy(base)
    gqa(same, 2)
    identity = relative(logits(same), reference)

    model = copy.deepcopy(base)
    info = gqa(model, 1)
    out = logits(model)
    ids = torch.as_tensor(windows(1, 40, seed=5)[0])[None]
    cached = cached_decode_matches(model, ids)
    model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    reload = float((logits(loaded) - out).abs().max())
    print(f"{model_type}: identity {identity:.2e}, 2->1 relative {relative(out, reference):.2e}, keys: "
          f"{info['keys']}, cached decode {cached:.2e}, reload {reload:.2e}")
    assert identity < 1e-4, f"identity={identity:.2e}"
    assert bool(torch.isfinite(out).all()) and relative(out, reference) > 1e-4  # it did change something
    assert cached < 1e-4, f"cached decode={cached:.2e}"
    attn = loaded.model.layers[1].self_attn
    _, _, v = attention_parts(attn, model_type)
    assert loaded.config.num_key_value_heads == 1 and v.out_features == attn.head_dim
    assert reload < 1e-6, f"reload={reload:.2e}"
    qk_norm = describe(model_type).qk_norm != "none"
    assert info["keys"] == ("mean of pre-norm projections" if qk_norm else "RoPE-commuting PCA")


@pytest.mark.parametrize("model_type,overrides", VARIANTS, ids=[t + ("+qk_norm" if o else "") for t, o in VARIANTS])
def test_pca_merges_duplicate_heads_losslessly_on_every_family(model_type, overrides):
    """KV heads 2 and 3 copies of 0 and 1 (with their per-head norm weights): PCA pairs {0, 2} and {1, 3} and the
    logits do not move, on every family: fused qkv (Phi-3), q/k norms shared, per head (Cohere) or over all heads
    (OLMo 2), whose query heads' weights move with the reordered query heads. Mean pooling pairs {0, 1} and
    {2, 3} and changes the model."""
    from llmopt.passes.projections import per_head_norm, set_qkv

    base = family(model_type, num_key_value_heads=4, **overrides)
    arch = describe(model_type)
    with torch.no_grad():
        for layer in base.model.layers:
            attn = layer.self_attn
            q, k, v = attention_parts(attn, model_type)
            for proj in (k, v):
                w = proj.weight.reshape(4, -1, proj.in_features)
                w[2], w[3] = w[0].clone(), w[1].clone()
                if proj.bias is not None:
                    b = proj.bias.reshape(4, -1)
                    b[2], b[3] = b[0].clone(), b[1].clone()
            set_qkv(attn, arch, q, k, v)
            norm = per_head_norm(attn, "k_norm", base.config)
            if norm is not None:
                w = norm.weight.reshape(4, -1)
                w[2], w[3] = w[0].clone(), w[1].clone()
    errors, groups = merged_to_two(base, f"{model_type}{overrides}")
    assert groups["pca"][0] == [[0, 2], [1, 3]] and groups["mean"][0] == [[0, 1], [2, 3]]
    assert errors["pca"] < 1e-4, f"pca={errors['pca']:.2e}"
    assert errors["mean"] > 1e-3, f"mean={errors['mean']:.2e}"


@pytest.mark.parametrize("model_type", ["llama", "cohere", "phi3"])
def test_pca_merges_rope_rotated_heads_losslessly_on_every_rope_layout(model_type):
    """Key head 2 = head 0 with every RoPE pair rotated and scaled, as the family pairs dimensions: half-split
    (Llama), interleaved (Cohere), half-split over part of the head with the rest unrotated (the Phi-3 row rotates
    half of each head; its qkv is fused). PCA merges {0, 2} and {1, 3} exactly only with the family's pairs."""
    from llmopt.architectures import rotary_pairs
    from llmopt.passes.projections import set_qkv

    base = family(model_type, num_key_value_heads=4)
    first, second = (torch.tensor(p) for p in rotary_pairs(base.config))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in base.model.layers:
            q, k, v = attention_parts(layer.self_attn, model_type)
            hd = layer.self_attn.head_dim
            kh, vh = heads_of(k, hd), heads_of(v, hd)
            for src, dst in ((0, 2), (1, 3)):
                theta = torch.rand(len(first), 1, generator=gen) * 6.28
                scale = 0.5 + torch.rand(len(first), 1, generator=gen)
                re, im = kh[src, first], kh[src, second]
                c, s = scale * torch.cos(theta), scale * torch.sin(theta)
                kh[dst, first], kh[dst, second] = c * re - s * im, s * re + c * im
                vh[dst] = (torch.eye(hd) + 0.3 * torch.randn(hd, hd, generator=gen)) @ vh[src]
                for proj in (k, v):
                    if proj.bias is not None:
                        proj.bias.zero_()
            set_qkv(layer.self_attn, describe(model_type), q, k, v)
    errors, groups = merged_to_two(base, model_type, methods=("pca",))
    assert groups["pca"][0] == [[0, 2], [1, 3]]
    assert errors["pca"] < 1e-4, f"{model_type}: {errors['pca']:.2e}"


# ---- end to end ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_end_to_end_safetensors_loads_and_generates(tiny_model_dir, fast_recipe, tmp_path, tiny_tokenizer):
    import json

    import llmopt
    from transformers import AutoModelForCausalLM

    recipe = fast_recipe("passes:\n  - type: gqa\n    num_key_value_heads: 1\n    method: pca\n"
                         "export: {format: safetensors}\ncalibration: {samples: 4, seq_len: 64}\n")
    result = llmopt.optimize(recipe, model=str(tiny_model_dir), output=tmp_path / "out")
    report = result.report
    b, o = report.baseline.parameters, report.optimized.parameters
    print(f"parameters {b} -> {o}, perplexity {report.baseline.perplexity:.1f} -> {report.optimized.perplexity:.1f}")
    assert b - o == 2 * 2 * 16 * 64  # one of two KV heads (k and v, 16 x 64 each) in each of 2 layers
    info = report.passes[0].info
    assert (info["num_key_value_heads_before"], info["num_key_value_heads_after"]) == (2, 1)
    assert info["kv_cache_bytes_per_token_after"] * 2 == info["kv_cache_bytes_per_token_before"]
    assert info["calibration_tokens"] == 4 * 64 and info["groups"] == [[[0, 1]]] * 2
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_key_value_heads"] == 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert model.model.layers[0].self_attn.k_proj.out_features == 16
    ids = tiny_tokenizer("def f(x):", return_tensors="pt")
    # The rewritten KV heads through the cache: the same greedy tokens as recomputing every step without it.
    options = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=2)
    cached, uncached = model.generate(**ids, **options), model.generate(**ids, use_cache=False, **options)
    assert torch.equal(cached, uncached), (cached, uncached)


def test_onnx_of_a_gqa_model_matches_torch(tmp_path):
    from llmopt.evaluation.runners import OrtRunner, TorchRunner
    from tests.conftest import write_onnx

    model = tiny(kv=4)
    gqa(model, 2)
    write_onnx(model, tmp_path)
    runner = OrtRunner(tmp_path)
    ids = windows(1, 12, seed=5)[0]
    diff = float(np.abs(runner.logits(ids) - TorchRunner(model).logits(ids)).max())
    print("max |Δlogit| ONNX vs torch:", diff)
    assert diff < 1e-4, f"diff={diff:.2e}"
    assert np.array_equal(runner.generate(ids, 4), TorchRunner(model).generate(ids, 4))
