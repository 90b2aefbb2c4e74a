"""`type: gqa` — fewer key/value heads: multi-head or grouped attention rewritten to `num_key_value_heads: K`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from itertools import combinations
from typing import Any, Callable, Literal

from pydantic import Field

from llmopt.architectures import Architecture, qk_norm, require, rotary_pairs
from llmopt.errors import InputError, RecipeError
from llmopt.model import ArchInfo
from llmopt.passes.base import Pass, PassConfig
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


@dataclass
class LayerStats:
    """Second moments of one attention layer's projections over the calibration tokens (float64, CPU)."""

    q_energy: Any  # (H*hd,) mean of q^2 per output row
    k_cov: Any  # (kv*hd, kv*hd) mean of k k^T (pre-RoPE, pre-norm)
    v_cov: Any  # (kv*hd, kv*hd) mean of v v^T


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


@dataclass
class LayerData:
    """Per-layer statistics in the shapes the merge needs."""

    key_cov: Any  # (F, kv, kv) complex: E[z_g conj(z_h)] for each RoPE pair f, z = k[first[f]] + i k[second[f]]
    query_energy: Any  # (H, F): E|q_f|^2 per query head and pair
    value_cov: Any  # (kv, hd, kv, hd): E[v v^T]
    out_metric: Any  # (H, hd, hd): O_i^T O_i, O_i = o_proj columns of query head i
    kv_of: list[int]
    hd: int
    key_energy: float  # totals for relative errors: sum_g sum_f s2 * E|z|^2, sum_g tr(W_g E[v_g v_g^T])
    value_energy: float

    @classmethod
    def build(cls, stats: LayerStats, o_weight: Any, kv_of: list[int], hd: int,
              pairs: tuple[list[int], list[int]] | None = None) -> "LayerData":
        """`pairs`: the head dimensions RoPE rotates together (llmopt.architectures.rotary_pairs); by default
        half-split RoPE over the whole head."""
        import torch

        kv, f, heads = max(kv_of) + 1, hd // 2, len(kv_of)
        order = _pair_order(pairs, hd)
        kc = stats.k_cov.reshape(kv, hd, kv, hd)[:, order][:, :, :, order]  # pair f's dimensions at f and f + F
        diag = lambda block: torch.diagonal(block, dim1=1, dim2=3).permute(2, 0, 1)  # (kv,F,kv,F) -> (F,kv,kv)
        aa, bb = diag(kc[:, :f, :, :f]), diag(kc[:, f:, :, f:])
        ba, ab = diag(kc[:, f:, :, :f]), diag(kc[:, :f, :, f:])
        key_cov = torch.complex(aa + bb, ba - ab)
        qe = stats.q_energy.reshape(heads, hd)[:, order]
        query_energy = qe[:, :f] + qe[:, f:]  # (H, F)
        o = o_weight.detach().to("cpu", torch.float64).reshape(-1, heads, hd).permute(1, 0, 2)  # (H, hidden, hd)
        out_metric = o.transpose(1, 2) @ o  # (H, hd, hd)
        value_cov = stats.v_cov.reshape(kv, hd, kv, hd)
        kv_of_t = torch.tensor(kv_of)
        s2 = torch.stack([query_energy[kv_of_t == g].sum(0) for g in range(kv)], 1)  # (F, kv)
        key_energy = float((s2 * torch.diagonal(key_cov, dim1=1, dim2=2).real).sum())
        value_energy = sum(float(torch.trace(out_metric[i] @ value_cov[kv_of[i], :, kv_of[i], :])) for i in range(heads))
        return cls(key_cov, query_energy, value_cov, out_metric, kv_of, hd, key_energy, value_energy)


# ---- one group: merge coefficients -----------------------------------------------------------------


@dataclass
class Merge:
    """How one new KV head is made from old KV heads `heads`, serving query heads `queries`."""

    heads: tuple[int, ...]
    queries: tuple[int, ...]
    alpha: Any  # (F, S) complex: merged key pair f = sum_g alpha[f, g] * key pair f of heads[g]
    gamma: Any  # (F, S) complex: key pair f of heads[g] ~ gamma[f, g] * merged pair f
    p: Any  # (hd, S*hd): merged value = p @ [v_heads[0]; ...; v_heads[S-1]]
    m: Any  # (S, hd, hd): value of heads[g] ~ m[g] @ merged value
    key_error: float = math.nan  # weighted residuals on the calibration statistics (see LayerData)
    value_error: float = math.nan


def contiguous_groups(num_heads: int, kv_of: list[int], k: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(old KV heads, query heads) of each new head when query heads are taken in order, H/K at a time."""
    per = num_heads // k
    groups = []
    for j in range(k):
        queries = tuple(range(j * per, (j + 1) * per))
        groups.append((tuple(sorted({kv_of[i] for i in queries})), queries))
    return groups


def _query_weights(heads: tuple[int, ...], queries: tuple[int, ...], kv_of: list[int]) -> list[float]:
    """Share of the group's query heads that each old KV head serves (1/G for whole heads)."""
    return [sum(kv_of[i] == g for i in queries) / len(queries) for g in heads]


def mean_merge(heads: tuple[int, ...], queries: tuple[int, ...], kv_of: list[int], hd: int) -> Merge:
    """Mean-pooling (Ainslie et al. 2023): the projections averaged, queries and outputs unchanged."""
    import torch

    w = torch.tensor(_query_weights(heads, queries, kv_of), dtype=torch.float64)
    f, s = hd // 2, len(heads)
    eye = torch.eye(hd, dtype=torch.float64)
    return Merge(heads, queries, alpha=w.to(torch.complex128).expand(f, s).clone(),
                 gamma=torch.ones(f, s, dtype=torch.complex128),
                 p=torch.cat([wg * eye for wg in w], 1), m=eye.expand(s, hd, hd).clone())


def pca_merge(data: LayerData, heads: tuple[int, ...], queries: tuple[int, ...], rope_keys: bool) -> Merge:
    """Activation-aware merge of one group (see GqaPass): complex PCA per RoPE pair for keys, PCA for values."""
    import torch

    hd, s = data.hd, len(heads)
    merge = mean_merge(heads, queries, data.kv_of, hd)  # the starting point for what PCA does not change
    idx = torch.tensor(heads)
    kv_of_q = torch.tensor([data.kv_of[i] for i in queries])
    q_idx = torch.tensor(queries)
    tiny = torch.finfo(torch.float64).tiny

    if rope_keys:
        c = data.key_cov[:, idx][:, :, idx]  # (F, S, S)
        s2 = torch.stack([data.query_energy[q_idx[kv_of_q == g]].sum(0) for g in heads], 1)  # (F, S)
        d = (s2 + 1e-6 * s2.mean() + tiny).sqrt()  # floor: a pair no query uses still gets a merge
        _, vecs = torch.linalg.eigh(d[:, :, None] * c * d[:, None, :])
        alpha = vecs[..., -1].conj() * d  # (F, S): the top weighted direction, w = u^H D z
        phase = alpha.sum(-1, keepdim=True)
        alpha = alpha * (phase.conj() / phase.abs().clamp_min(tiny))  # fix the eigenvector's free phase
        ew = torch.einsum("fg,fgh,fh->f", alpha, c, alpha.conj()).real  # E|w|^2
        target = torch.diagonal(c, dim1=1, dim2=2).real.mean(-1)
        alpha = alpha * (target / ew.clamp_min(tiny)).sqrt()[:, None]  # merged keys as large as the originals
        ew = torch.einsum("fg,fgh,fh->f", alpha, c, alpha.conj()).real
        zw = torch.einsum("fgh,fh->fg", c, alpha.conj())  # E[z_g conj(w)]
        merge.alpha, merge.gamma = alpha, zw / ew.clamp_min(tiny)[:, None]  # least squares z_g ~ gamma_g w

    # Values: PCA in the output metric W_g = sum_i O_i^T O_i, then least-squares reconstruction.
    vc = data.value_cov[idx][:, :, idx].reshape(s * hd, s * hd)  # (S*hd, S*hd)
    roots = []
    for g in heads:
        w = data.out_metric[q_idx[kv_of_q == g]].sum(0)  # (hd, hd)
        evals, evecs = torch.linalg.eigh(w)
        evals = evals.clamp_min(0) + 1e-6 * evals.clamp_min(0).mean() + tiny
        roots.append(evecs @ torch.diag(evals.sqrt()) @ evecs.T)
    root = torch.block_diag(*roots)
    root = root / (torch.trace(root) / (s * hd))  # unit mean scale: merged values as large as the originals
    _, vecs = torch.linalg.eigh(root @ vc @ root)
    p = vecs[:, -hd:].flip(-1).T @ root  # (hd, S*hd), strongest direction first
    merge.p = p
    c1, c2 = vc @ p.T, p @ vc @ p.T  # E[v v'^T] (S*hd, hd), E[v' v'^T] (hd, hd)
    ridge = 1e-9 * torch.trace(c2) / hd + tiny
    merge.m = torch.linalg.solve(c2 + ridge * torch.eye(hd, dtype=c2.dtype), c1.T).T.reshape(s, hd, hd)
    return merge


def merge_errors(data: LayerData, merge: Merge) -> Merge:
    """Fill in the weighted residuals of a merge: sum of s2 |z - gamma w|^2 and tr(W (v - M v')(v - M v')^T)."""
    import torch

    idx = torch.tensor(merge.heads)
    kv_of_q = torch.tensor([data.kv_of[i] for i in merge.queries])
    q_idx = torch.tensor(merge.queries)
    hd, s = data.hd, len(merge.heads)
    c = data.key_cov[:, idx][:, :, idx]  # (F, S, S)
    s2 = torch.stack([data.query_energy[q_idx[kv_of_q == g]].sum(0) for g in merge.heads], 1)  # (F, S)
    ew = torch.einsum("fg,fgh,fh->f", merge.alpha, c, merge.alpha.conj()).real
    zw = torch.einsum("fgh,fh->fg", c, merge.alpha.conj())
    residual = (torch.diagonal(c, dim1=1, dim2=2).real - 2 * (merge.gamma.conj() * zw).real
                + merge.gamma.abs() ** 2 * ew[:, None])
    merge.key_error = float((s2 * residual).sum())
    vc = data.value_cov[idx][:, :, idx].reshape(s * hd, s * hd)
    c1, c2 = (vc @ merge.p.T).reshape(s, hd, hd), merge.p @ vc @ merge.p.T
    value_error = 0.0
    for j, g in enumerate(merge.heads):
        w = data.out_metric[q_idx[kv_of_q == g]].sum(0)
        m = merge.m[j]
        err = vc[j * hd:(j + 1) * hd, j * hd:(j + 1) * hd] - m @ c1[j].T - c1[j] @ m.T + m @ c2 @ m.T
        value_error += float(torch.trace(w @ err))
    merge.value_error = value_error
    return merge


# ---- grouping ---------------------------------------------------------------------------------------


def pca_layer(data: LayerData, k: int, qk_norm: bool, seed: int = 0) -> list[Merge]:
    """The merges of one layer: groups of whole KV heads chosen by merge error, or contiguous query heads."""
    heads, kv = len(data.kv_of), max(data.kv_of) + 1
    rope_keys = not qk_norm

    def merged(group: tuple[int, ...]) -> Merge:
        queries = tuple(i for i in range(heads) if data.kv_of[i] in group)
        return merge_errors(data, pca_merge(data, group, queries, rope_keys))

    def cost(group: tuple[int, ...]) -> float:
        m = merged(group)
        return m.key_error / max(data.key_energy, 1e-30) + m.value_error / max(data.value_energy, 1e-30)

    if kv % k:  # a KV head's query heads would be split between new heads: take query heads in order
        return [merge_errors(data, pca_merge(data, hs, qs, rope_keys)) for hs, qs in contiguous_groups(heads, data.kv_of, k)]
    size = kv // k
    if math.comb(kv, size) > 256:  # too many candidate groups to score each: score a group by its pairs
        pair = {g: cost(g) for g in combinations(range(kv), 2)}
        group_cost = lambda group: sum(pair[g] for g in combinations(group, 2))  # noqa: E731
    else:
        group_cost = cost
    return [merged(group) for group in choose_groups(kv, size, group_cost, seed)]


def _partition_count(n: int, size: int) -> int:
    return math.factorial(n) // (math.factorial(size) ** (n // size) * math.factorial(n // size))


def _partitions(items: tuple[int, ...], size: int):
    """Every partition of `items` into groups of `size` (each group starts with its smallest item)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for others in combinations(rest, size - 1):
        remaining = tuple(i for i in rest if i not in others)
        for tail in _partitions(remaining, size):
            yield [(first, *others), *tail]


def choose_groups(n: int, size: int, cost: Callable[[tuple[int, ...]], float], seed: int = 0,
                  max_enumerate: int = 20_000, restarts: int = 4) -> list[tuple[int, ...]]:
    """The partition of range(n) into groups of `size` with the smallest summed cost (groups sorted).

    Exhaustive when there are at most `max_enumerate` partitions; otherwise a local search (best pairwise
    swap between two groups until none helps) from the contiguous partition and `restarts - 1` random
    ones drawn with `seed`, so the result is deterministic for a seed.
    """
    import numpy as np

    cache: dict[tuple[int, ...], float] = {}

    def score(group: tuple[int, ...]) -> float:
        if group not in cache:
            cache[group] = cost(group)
        return cache[group]

    if size == 1 or size == n:
        return [tuple(range(i, i + size)) for i in range(0, n, size)]
    if _partition_count(n, size) <= max_enumerate:
        best = min(_partitions(tuple(range(n)), size), key=lambda p: sum(score(g) for g in p))
        return sorted(best)
    rng = np.random.default_rng(seed)
    orders = [list(range(n))] + [rng.permutation(n).tolist() for _ in range(restarts - 1)]
    best, best_total = None, math.inf
    for order in orders:
        groups = [tuple(sorted(order[j:j + size])) for j in range(0, n, size)]
        for _ in range(100 * n):  # bounded: each accepted swap strictly lowers the total
            move, gain = None, 1e-12
            for a, b in combinations(range(len(groups)), 2):
                before = score(groups[a]) + score(groups[b])
                for x in groups[a]:
                    for y in groups[b]:
                        ga = tuple(sorted([*(i for i in groups[a] if i != x), y]))
                        gb = tuple(sorted([*(i for i in groups[b] if i != y), x]))
                        if before - score(ga) - score(gb) > gain:
                            move, gain = (a, b, ga, gb), before - score(ga) - score(gb)
            if move is None:
                break
            groups[move[0]], groups[move[1]] = move[2], move[3]
        total = sum(score(g) for g in groups)
        if total < best_total:
            best, best_total = sorted(groups), total
    return best


# ---- rewriting the weights --------------------------------------------------------------------------


def _augmented(linear: Any) -> Any:
    """[W | b] in float64 (out, in + 1): a bias transforms with its rows."""
    import torch

    w = linear.weight.detach().to("cpu", torch.float64)
    b = linear.bias.detach().to("cpu", torch.float64) if linear.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    return torch.cat([w, b[:, None]], 1)


def _pair_order(pairs: tuple[list[int], list[int]] | None, hd: int) -> Any:
    """Head dimensions reordered so that each RoPE pair sits at (f, f + hd/2), as the merge math has it."""
    import torch

    return torch.arange(hd) if pairs is None else torch.tensor(pairs[0] + pairs[1])


def apply_merges(attn: Any, family: Architecture, merges: list[Merge], kv_of: list[int], hd: int,
                 pairs: tuple[list[int], list[int]] | None = None) -> None:
    """Write the merged k/v projections and the matching q/o projections into one attention module.

    New KV head j serves merges[j].queries, so query heads are reordered (q rows, o columns, and a q norm's
    per-head weights) to keep HF's contiguous repeat_kv layout.
    """
    import torch

    from llmopt.passes.projections import linear_like, per_head_norm, qkv, set_head_weights, set_qkv

    f = hd // 2
    order = _pair_order(pairs, hd)
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
                sum(w * old[g] for w, g in zip(_query_weights(m.heads, m.queries, kv_of), m.heads)) for m in merges]))
    def built(like: Any, rows: list[Any]) -> Any:  # rows of [W | b]
        augmented = torch.cat(rows)
        return linear_like(like, augmented[:, :-1], augmented[:, -1] if like.bias is not None else None)

    set_qkv(attn, family, built(q_proj, q_rows), built(k_proj, k_rows), built(v_proj, v_rows))
