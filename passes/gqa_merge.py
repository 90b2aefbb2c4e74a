"""The gqa pass's merge math: per-layer statistics (LayerData), how a group of old KV heads becomes one new
head (mean or PCA merge, with its weighted residual error), and the choice of groups. Torch on calibration
statistics only; gqa.py reads the model and rewrites its weights."""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Callable


@dataclass
class LayerStats:
    """Second moments of one attention layer's projections over the calibration tokens (float64, CPU)."""

    q_energy: Any  # (H*hd,) mean of q^2 per output row
    k_cov: Any  # (kv*hd, kv*hd) mean of k k^T (pre-RoPE, pre-norm)
    v_cov: Any  # (kv*hd, kv*hd) mean of v v^T


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
        order = pair_order(pairs, hd)
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


def query_weights(heads: tuple[int, ...], queries: tuple[int, ...], kv_of: list[int]) -> list[float]:
    """Share of the group's query heads that each old KV head serves (1/G for whole heads)."""
    return [sum(kv_of[i] == g for i in queries) / len(queries) for g in heads]


def mean_merge(heads: tuple[int, ...], queries: tuple[int, ...], kv_of: list[int], hd: int) -> Merge:
    """Mean-pooling (Ainslie et al. 2023): the projections averaged, queries and outputs unchanged."""
    import torch

    w = torch.tensor(query_weights(heads, queries, kv_of), dtype=torch.float64)
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


def pair_order(pairs: tuple[list[int], list[int]] | None, hd: int) -> Any:
    """Head dimensions reordered so that each RoPE pair sits at (f, f + hd/2), as the merge math has it."""
    import torch

    return torch.arange(hd) if pairs is None else torch.tensor(pairs[0] + pairs[1])
