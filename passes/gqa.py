"""`type: gqa` — fewer key/value heads: multi-head or grouped attention rewritten to `num_key_value_heads: K`."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable, Literal, Sequence

from pydantic import Field

from llmopt.architectures import Architecture, qk_norm, require, rotary_pairs
from llmopt.errors import InputError, RecipeError
from llmopt.model import ArchInfo
from llmopt.passes.base import Pass, PassConfig, refuse_after_quantize
from llmopt.passes.gqa_merge import (LayerData, LayerStats, Merge, contiguous_groups, mean_merge, pair_order, pca_layer,
                                     query_weights)
from llmopt.state import ModelState, PassContext

_BATCH = 8  # calibration windows per forward: bounds activation memory


class GqaConfig(PassConfig):
    type: Literal["gqa"] = "gqa"
    num_key_value_heads: int = Field(
        ..., ge=1, description="KV heads per layer after the pass (1 = multi-query attention). Must divide the "
                               "query heads and be at most the model's current KV heads.")
    method: Literal["mean", "pca"] = Field(
        "pca", description="mean: average the key/value projections of each group of heads (Ainslie et al. 2023), "
                           "no data. pca: activation-aware: heads grouped by merge error, keys and values merged by "
                           "weighted PCA of their calibration activations (RoPE-compatible), folded into q/o_proj.")


def valid_kv_heads(num_heads: int, num_kv_heads: int) -> list[int]:
    """The K this pass accepts: divisors of the query heads that are at most the current KV heads."""
    return [k for k in range(1, num_kv_heads + 1) if num_heads % k == 0]


def _require_supported(model_type: str, where: str) -> Architecture:
    """The family's description; RecipeError naming the family when the pass cannot rewrite it. The families it
    takes (llmopt.architectures, `gqa=True`) have q/k/v (or a fused qkv) and o projections in `self_attn`, RoPE on
    pairs of head dimensions (llmopt.architectures.rotary_pairs) and repeat_kv driven by `num_key_value_groups`."""
    return require(model_type, "the gqa pass", where, capability="gqa")


class GqaPass(Pass):
    """Rewrite attention to K key/value heads; the result is a standard model of the same architecture.

    Query heads are split into K groups; each group's key and value heads become one head, and the
    q_proj rows / o_proj columns of its query heads absorb the change, so that only k_proj, v_proj,
    the config's `num_key_value_heads` and the KV cache shrink.

    `mean` (Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models from
    Multi-Head Checkpoints", arXiv:2305.13245): contiguous groups, k_proj/v_proj of a group averaged.

    `pca`, activation-aware, after Yu et al. 2024 ("Effectively Compress KV Heads for LLM",
    arXiv:2406.07056: low-rank compression of the KV heads on calibration activations, folded into
    the query and output projections) with the RoPE-commuting alignment of Jin et al. 2024 ("Align
    Attention Heads Before Merging Them", arXiv:2412.20677), done in closed form:
      - values: the group's stacked values v = [v_1; ...; v_G] are projected on their top head_dim
        principal directions, v' = P v, in the metric of the output projection (each head weighted
        by sum_i O_i^T O_i over its query heads i, so directions o_proj ignores cost nothing); each
        head is rebuilt by least squares, v_g ~ M_g v', and M_g is folded into o_proj (O_i <- O_i M_g).
      - keys: only maps that commute with RoPE can be folded into q_proj. RoPE rotates each pair
        (f, f + head_dim/2) as a complex number z_f by a position-dependent phase, so the maps that
        commute are per-pair complex scalings (a rotation and a scale, 2x2 blocks [[a, -b], [b, a]]).
        Per pair f, the group's G complex keys get their best rank-1 fit (complex PCA, each head
        weighted by its query heads' energy in that pair): w_f = sum_g alpha_g z_g and
        z_g ~ gamma_g w_f (least squares); q_f <- conj(gamma_g) q_f keeps q·k for the query heads of g.
        This is Procrustes alignment restricted to per-frequency rotations, plus optimal weights.
        With q_norm/k_norm (Qwen3, Gemma 3, OLMo 2) no map can pass the norm, so keys are mean-pooled before
        it; a norm with a weight per head (OLMo 2, Cohere) gets the group's weights averaged the same way.
      - grouping: which KV heads share a new head minimises the summed relative merge error
        (exhaustive when the partitions are few, else a seeded swap search on pairwise errors).
    K equal to the current KV heads leaves the model's function unchanged (up to float rounding for pca).
    """

    type = "gqa"
    Config = GqaConfig
    config: GqaConfig
    needs_calibration = True  # `mean` never calls it

    def check_order(self, earlier: Sequence[PassConfig], where: str) -> None:
        refuse_after_quantize(self.type, earlier, where)

    def check(self, arch: ArchInfo, where: str) -> ArchInfo:
        _require_supported(arch.model_type, where)
        k = self.config.num_key_value_heads
        valid = valid_kv_heads(arch.num_heads, arch.num_kv_heads)
        if k not in valid:
            raise RecipeError(
                f"{where}.num_key_value_heads: {k} is not valid for this model ({arch.num_heads} query heads, "
                f"{arch.num_kv_heads} KV heads): it must divide the query heads and be at most the current KV heads.",
                f"Valid values: {', '.join(map(str, valid))} (1 = multi-query attention).")
        return replace(arch, num_kv_heads=k)

    def run(self, state: ModelState, ctx: PassContext) -> ModelState:
        import torch

        started = time.perf_counter()
        model, method = state.model, self.config.method
        family = _require_supported(model.config.model_type, "gqa")
        arch = ArchInfo.from_config(model.config)
        self.check(arch, "gqa")
        attns = _attention_modules(model, family)
        normed = qk_norm(model.config) != "none"  # no RoPE-commuting map passes a norm: keys are mean-pooled
        pairs = rotary_pairs(model.config) if method == "pca" else None  # mean's merges are the same on any pairs
        heads, kv_before, hd = arch.num_heads, arch.num_kv_heads, attns[0].head_dim
        k = self.config.num_key_value_heads
        kv_of = [i // (heads // kv_before) for i in range(heads)]  # query head -> its KV head (repeat_kv order)

        stats: list[LayerStats] = []
        windows: list[Any] = []
        tokens = 0
        if method == "pca":
            windows = ctx.calibration_windows("The gqa pass with method 'pca'")
        offset = len(_batches_of(windows, _BATCH))  # progress: calibration batches, then layers
        steps = offset + len(attns)
        if method == "pca":
            stats, tokens = collect_stats(model, attns, family, windows, lambda done, _: ctx.progress(done, steps))

        chosen, key_errors, value_errors = [], [], []
        with torch.no_grad():
            for layer, attn in enumerate(attns):
                if method == "mean":
                    merges = [mean_merge(hs, qs, kv_of, hd) for hs, qs in contiguous_groups(heads, kv_of, k)]
                else:
                    data = LayerData.build(stats[layer], attn.o_proj.weight, kv_of, hd, pairs)
                    merges = pca_layer(data, k, normed, seed=ctx.seed)
                    key_errors.append(sum(m.key_error for m in merges) / data.key_energy)
                    value_errors.append(sum(m.value_error for m in merges) / data.value_energy)
                apply_merges(attn, family, merges, kv_of, hd, pairs)
                attn.num_key_value_groups = heads // k
                if hasattr(attn, "num_key_value_heads"):
                    attn.num_key_value_heads = k
                chosen.append([list(m.heads) for m in merges])
                ctx.progress(offset + layer + 1, steps)
        model.config.num_key_value_heads = k

        info: dict[str, Any] = {
            "method": method,
            "num_key_value_heads_before": kv_before,
            "num_key_value_heads_after": k,
            "kv_cache_bytes_per_token_before": arch.kv_cache_bytes_per_token(),
            "kv_cache_bytes_per_token_after": replace(arch, num_kv_heads=k).kv_cache_bytes_per_token(),
            "keys": "mean of pre-norm projections" if (normed or method == "mean") else "RoPE-commuting PCA",
            # Per layer, the old KV heads each new KV head was made from.
            "groups": chosen,
            "seconds": round(time.perf_counter() - started, 2),
        }
        if method == "pca":
            info.update(calibration_tokens=tokens,
                        relative_error_keys=[round(e, 5) for e in key_errors],
                        relative_error_values=[round(e, 5) for e in value_errors])
        state.pass_info["gqa"] = info
        return state


def _decoder(model: Any) -> Any:
    """The decoder stack (`model.model`): `base_model` is the whole model when `base_model_prefix` does not
    name the attribute (Gemma3ForCausalLM's is 'language_model')."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    return decoder if hasattr(decoder, "layers") else getattr(model, "base_model", None)


def _attention_modules(model: Any, family: Architecture) -> list[Any]:
    import torch

    layers = getattr(_decoder(model), "layers", None) or []
    attns = [getattr(layer, "self_attn", None) for layer in layers]
    names = ("qkv_proj", "o_proj") if family.fused_qkv else ("q_proj", "k_proj", "v_proj", "o_proj")
    if not attns or any(a is None or not all(isinstance(getattr(a, n, None), torch.nn.Linear) for n in names)
                        for a in attns):
        raise InputError(
            f"The gqa pass found no q/k/v/o_proj attention in every layer of this {type(model).__name__} "
            f"(model_type '{model.config.model_type}').",
            "It rewrites the standard Hugging Face attention of the families `llmopt inspect` says it applies to.")
    return attns


# ---- calibration statistics -------------------------------------------------------------------------


def _batches_of(windows: list[Any], size: int) -> list[list[Any]]:
    """Consecutive windows of equal length, at most `size` per batch."""
    batches: list[list[Any]] = []
    for w in windows:
        if batches and len(batches[-1]) < size and len(batches[-1][0]) == len(w):
            batches[-1].append(w)
        else:
            batches.append([w])
    return batches


def collect_stats(model: Any, attns: list[Any], family: Architecture, windows: list[Any],
                  progress: Callable[[int, int], None] = lambda done, total: None) -> tuple[list[LayerStats], int]:
    """One pass of the calibration windows through the decoder, accumulating q/k/v moments with hooks.

    Only (kv*hd)^2 numbers per layer are kept, never the activations, so memory does not grow with the data.
    """
    import numpy as np
    import torch

    from llmopt.passes.projections import hook_qkv

    sums = [{"q": 0.0, "k": 0.0, "v": 0.0} for _ in attns]
    handles = []

    def hook(store: dict):
        def accumulate(key: str, output: Any) -> None:
            y = output.detach().reshape(-1, output.shape[-1]).to("cpu", torch.float64)  # (N, out)
            store[key] = store[key] + ((y * y).sum(0) if key == "q" else y.T @ y)
        return accumulate

    device = next(model.parameters()).device
    batches = _batches_of(windows, _BATCH)
    tokens = 0
    try:
        for attn, store in zip(attns, sums):
            handles += hook_qkv(attn, family, hook(store))
        with torch.no_grad():
            for i, batch in enumerate(batches):
                ids = torch.from_numpy(np.stack(batch).astype(np.int64)).to(device)  # (B, T)
                _decoder(model)(input_ids=ids, use_cache=False)  # no lm_head: its logits are the largest tensor
                tokens += ids.numel()
                progress(i + 1, len(batches))
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise InputError("The gqa pass got no calibration tokens.", "Set `calibration.samples` to at least 1.")
    return [LayerStats(s["q"] / tokens, s["k"] / tokens, s["v"] / tokens) for s in sums], tokens


# ---- rewriting the weights --------------------------------------------------------------------------


def _augmented(linear: Any) -> Any:
    """[W | b] in float64 (out, in + 1): a bias transforms with its rows."""
    import torch

    w = linear.weight.detach().to("cpu", torch.float64)
    b = linear.bias.detach().to("cpu", torch.float64) if linear.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    return torch.cat([w, b[:, None]], 1)


def apply_merges(attn: Any, family: Architecture, merges: list[Merge], kv_of: list[int], hd: int,
                 pairs: tuple[list[int], list[int]] | None = None) -> None:
    """Write the merged k/v projections and the matching q/o projections into one attention module.

    New KV head j serves merges[j].queries, so query heads are reordered (q rows, o columns, and a q norm's
    per-head weights) to keep HF's contiguous repeat_kv layout.
    """
    import torch

    from llmopt.passes.projections import linear_like, per_head_norm, qkv, set_head_weights, set_qkv

    f = hd // 2
    order = pair_order(pairs, hd)
    back = torch.argsort(order)
    q_proj, k_proj, v_proj = qkv(attn, family)
    wq, wk, wv = _augmented(q_proj), _augmented(k_proj), _augmented(v_proj)
    cols = wq.shape[1]
    # (heads, hd, in+1), the head dimensions of q and k in pair order
    wq, wk, wv = wq.reshape(-1, hd, cols)[:, order], wk.reshape(-1, hd, cols)[:, order], wv.reshape(-1, hd, cols)
    wo = attn.o_proj.weight.detach().to("cpu", torch.float64)
    wo = wo.reshape(wo.shape[0], -1, hd)  # (hidden, H, hd)
    q_rows, o_cols, k_rows, v_rows = [], [], [], []
    for merge in merges:
        idx = list(merge.heads)
        a, b = wk[idx, :f], wk[idx, f:]  # (S, F, in+1): real and imaginary parts of each RoPE pair
        p, r = merge.alpha.real.T[..., None], merge.alpha.imag.T[..., None]  # (S, F, 1)
        k_rows.append(torch.cat([(p * a - r * b).sum(0), (r * a + p * b).sum(0)])[back])  # alpha * z, summed
        v_rows.append(merge.p @ wv[idx].reshape(-1, cols))  # (hd, in+1)
        for i in merge.queries:
            g = idx.index(kv_of[i])
            c, d = merge.gamma[:, g].real[:, None], merge.gamma[:, g].imag[:, None]  # (F, 1)
            qa, qb = wq[i, :f], wq[i, f:]
            q_rows.append(torch.cat([c * qa + d * qb, c * qb - d * qa])[back])  # conj(gamma) * q
            o_cols.append(wo[:, i] @ merge.m[g])  # (hidden, hd)
    queries = [i for merge in merges for i in merge.queries]
    heads = len(kv_of)
    q_norm, k_norm = per_head_norm(attn, "q_norm", attn.config), per_head_norm(attn, "k_norm", attn.config)
    with torch.no_grad():
        attn.o_proj.weight.copy_(torch.cat(o_cols, 1))
        if q_norm is not None:
            set_head_weights(q_norm, q_norm.weight.detach().reshape(heads, hd)[queries])
        if k_norm is not None:  # keys are mean-pooled before the norm: its per-head weights are averaged alike
            old = k_norm.weight.detach().reshape(-1, hd)
            set_head_weights(k_norm, torch.stack([
                sum(w * old[g] for w, g in zip(query_weights(m.heads, m.queries, kv_of), m.heads)) for m in merges]))
    def built(like: Any, rows: list[Any]) -> Any:  # rows of [W | b]
        augmented = torch.cat(rows)
        return linear_like(like, augmented[:, :-1], augmented[:, -1] if like.bias is not None else None)

    set_qkv(attn, family, built(q_proj, q_rows), built(k_proj, k_rows), built(v_proj, v_rows))
