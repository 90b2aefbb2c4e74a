"""Width and depth pruning for `type: prune`: importance on calibration text, then model surgery.

Model-running code, imported by PrunePass.run only (torch at module scope is fine here).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from llmopt.architectures import Architecture, layer_kinds_config
from llmopt.passes.layerwise import decoder_layers, layout
from llmopt.passes.projections import gate_up, linear_like, per_head_norm, qkv, set_gate_up, set_head_weights, set_qkv

Progress = Callable[[int, int], None]


def calibration_forward(model: Any, batches: list[Any], progress: Progress, *, logits: bool = False) -> None:
    """Run each calibration window through the model once, for the hooks to measure.

    One window at a time, without the KV cache, so memory is that of a single forward pass;
    the decoder alone (no lm_head) unless the caller needs logits.
    """
    runner = model if logits else model.model
    for i, ids in enumerate(batches):
        runner(input_ids=torch.as_tensor(ids, dtype=torch.long)[None], use_cache=False)  # (1, T)
        progress(i + 1, len(batches))


class InputStats:
    """Running statistics of a linear layer's input channels, grouped into units of `group` channels.

    For each calibration window: the mean over tokens of each unit's L2 norm (a head's output norm
    for o_proj with group=head_dim, |activation| of an MLP channel for down_proj with group=1), and
    the sum over tokens of each channel's square (Wanda's ||x_j||^2).
    """

    def __init__(self, module: nn.Linear, group: int) -> None:
        self.group = group
        self.mean_norm_sq = torch.zeros(module.in_features // group)  # (units,)
        self.sum_sq = torch.zeros(module.in_features)  # (C,)
        self.windows = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().float().reshape(-1, module.in_features)  # (T, C): one window
        self.sum_sq += (x * x).sum(0)
        unit = x.reshape(x.shape[0], -1, self.group).norm(dim=-1).mean(0)  # (units,)
        self.mean_norm_sq += unit * unit
        self.windows += 1

    def activation(self) -> torch.Tensor:
        """Minitron: batch aggregation by root mean square, sequence aggregation by mean."""
        return (self.mean_norm_sq / max(self.windows, 1)).sqrt()  # (units,)

    def wanda(self, weight: torch.Tensor) -> torch.Tensor:
        """Sum over the unit's weights of |W_ij| x ||x_j||, where W (out, C) reads the channels."""
        per_channel = weight.detach().float().abs().sum(0) * self.sum_sq.sqrt()  # (C,)
        return per_channel.reshape(-1, self.group).sum(-1)  # (units,)


def prune_width(model: Any, batches: list[Any], *, mlp_remove: int, heads_remove: int, head_unit: str,
                importance: str, progress: Progress) -> dict[str, Any]:
    """Remove `mlp_remove` MLP channels and `heads_remove` heads from every layer, least important first."""
    config, layers, arch = model.config, decoder_layers(model), layout(model)
    head_dim = layers[0].self_attn.head_dim
    stats: list[tuple[InputStats, InputStats]] = []
    if importance != "magnitude" and (mlp_remove or heads_remove):
        stats = [(InputStats(layer.mlp.down_proj, 1), InputStats(layer.self_attn.o_proj, head_dim)) for layer in layers]
        try:
            calibration_forward(model, batches, progress)
        finally:
            for pair in stats:
                for s in pair:
                    s.handle.remove()

    removed_channels, removed_heads = [], []
    for i, layer in enumerate(layers):
        mlp, attn = layer.mlp, layer.self_attn
        if mlp_remove:
            if importance == "magnitude":
                gate, up = gate_up(mlp, arch)
                score = (gate.weight.pow(2).sum(1) + up.weight.pow(2).sum(1)
                         + mlp.down_proj.weight.pow(2).sum(0)).sqrt()  # (I,)
            else:
                s = stats[i][0]
                score = s.activation() if importance == "activation" else s.wanda(mlp.down_proj.weight)
            drop = _lowest(score, mlp_remove)
            _remove_mlp_channels(mlp, arch, drop)
            removed_channels.append(drop.tolist())
        if heads_remove:
            if importance == "magnitude":
                wq = qkv(attn, arch)[0].weight
                q = wq.reshape(-1, head_dim, wq.shape[1]).pow(2).sum((1, 2))  # (nh,)
                o = attn.o_proj.weight.reshape(attn.o_proj.out_features, -1, head_dim).pow(2).sum((0, 2))  # (nh,)
                score = (q + o).sqrt()
            else:
                s = stats[i][1]
                score = s.activation() if importance == "activation" else s.wanda(attn.o_proj.weight)
            drop = _choose_heads(score, heads_remove, config.num_key_value_heads, head_unit)
            _remove_heads(attn, arch, drop, config.num_key_value_heads, head_unit)
            removed_heads.append(drop.tolist())
        progress(i + 1, len(layers))

    before = {"intermediate_size": config.intermediate_size, "num_attention_heads": config.num_attention_heads,
              "num_key_value_heads": config.num_key_value_heads}
    if mlp_remove:
        config.intermediate_size -= mlp_remove
    if heads_remove:
        # head_dim stays; write it down, since some configs derive it as hidden_size // num_attention_heads.
        config.head_dim = head_dim
        if head_unit == "group":
            config.num_key_value_heads -= heads_remove // (config.num_attention_heads // config.num_key_value_heads)
        config.num_attention_heads -= heads_remove
    after = {k: getattr(config, k) for k in before}
    return {"importance": importance, "head_unit": head_unit, "before": before, "after": after,
            "removed_mlp_channels": removed_channels, "removed_heads": removed_heads}


def _lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k lowest scores, ascending by index (ties go to the lower index)."""
    return torch.sort(torch.argsort(score, stable=True)[:k]).values


def _choose_heads(score: torch.Tensor, n: int, kv: int, unit: str) -> torch.Tensor:
    """Query-head indices to drop; heads are numbered group-major (head h belongs to group h // per_group)."""
    per_group = score.numel() // kv
    by_group = score.reshape(kv, per_group)  # (kv, per_group)
    if unit == "group":
        groups = _lowest(by_group.sum(1), n // per_group)  # (g,)
        heads = groups[:, None] * per_group + torch.arange(per_group)  # (g, per_group)
    else:
        within = torch.argsort(by_group, dim=1, stable=True)[:, : n // kv]  # (kv, r)
        heads = torch.arange(kv)[:, None] * per_group + within
    return torch.sort(heads.flatten()).values


def _remove_mlp_channels(mlp: nn.Module, arch: Architecture, drop: torch.Tensor) -> None:
    keep = _complement(drop, mlp.down_proj.in_features)
    gate, up = gate_up(mlp, arch)
    set_gate_up(mlp, arch, sliced_linear(gate, rows=keep), sliced_linear(up, rows=keep))
    mlp.down_proj = sliced_linear(mlp.down_proj, cols=keep)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = keep.numel()


def _remove_heads(attn: nn.Module, arch: Architecture, drop: torch.Tensor, kv: int, unit: str) -> None:
    d, heads = attn.head_dim, attn.o_proj.in_features // attn.head_dim
    per_group = heads // kv
    keep = _complement(drop, heads)
    q, k, v = qkv(attn, arch)
    _slice_head_norm(attn, arch, "q_norm", q, keep, heads)
    q = sliced_linear(q, rows=_head_rows(keep, d))
    attn.o_proj = sliced_linear(attn.o_proj, cols=_head_rows(keep, d))
    if unit == "group":
        keep_kv = _complement(torch.unique(drop // per_group), kv)
        _slice_head_norm(attn, arch, "k_norm", k, keep_kv, kv)
        k = sliced_linear(k, rows=_head_rows(keep_kv, d))
        v = sliced_linear(v, rows=_head_rows(keep_kv, d))
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = keep_kv.numel()
    else:
        attn.num_key_value_groups = per_group - drop.numel() // kv  # repeat_kv reads it
    set_qkv(attn, arch, q, k, v)


def _slice_head_norm(attn: nn.Module, arch: Architecture, which: str, projection: nn.Linear, keep: torch.Tensor,
                     heads: int) -> None:
    """Keep the `keep` heads' slices of a q/k norm whose weight has one per head (OLMo 2, Cohere).

    OLMo 2's norm divides by the RMS over *all* heads, which removing heads changes. Its kept weight is scaled
    by sqrt(N/N' * E_kept/E), N and N' the widths before and after, E the heads' share of the projection's
    weight energy (the output energy for inputs of equal size in every direction): exact when the removed
    heads' projections are zero, 1 when they are as large as the rest.
    """
    norm = per_head_norm(attn, which, attn.config)
    if norm is None:
        return
    per_head = norm.weight.detach().reshape(heads, -1)[keep]  # (kept, head_dim)
    if arch.qk_norm == "whole":
        rows = projection.weight.detach().double().reshape(heads, -1).pow(2).sum(1)  # (heads,)
        if projection.bias is not None:
            rows = rows + projection.bias.detach().double().reshape(heads, -1).pow(2).sum(1)
        share = float(rows[keep].sum() / rows.sum().clamp_min(torch.finfo(torch.float64).tiny))
        per_head = per_head * (heads / keep.numel() * share) ** 0.5
    set_head_weights(norm, per_head)


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()  # (len(heads) * head_dim,)


def _complement(drop: torch.Tensor, size: int) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[drop] = False
    return keep.nonzero().flatten()


def sliced_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding the chosen output rows and input columns of `linear` (bias kept)."""
    weight = linear.weight.detach()  # (out, in)
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if cols is not None:
        weight = weight[:, cols]
    return linear_like(linear, weight, bias)


def prune_depth(model: Any, batches: list[Any], *, remove: int, choice: str, progress: Progress) -> dict[str, Any]:
    """Remove `remove` decoder layers chosen by `choice`; re-index the rest for the KV cache."""
    layers = decoder_layers(model)
    count = len(layers)
    scores: list[float] | None = None
    if remove and choice == "block_influence":
        scores = block_influence(model, batches, progress)
    elif remove and choice == "perplexity":
        scores = skip_loss_increase(model, batches, progress)
    if not remove:
        drop: list[int] = []
    elif scores is None:  # last
        drop = list(range(count - remove, count))
    else:
        drop = _lowest(torch.tensor(scores), remove).tolist()
    remove_layers(model, drop)
    info: dict[str, Any] = {"layer_choice": choice, "removed_layers": drop, "layers": [count, count - len(drop)]}
    if scores is not None:
        info["scores"] = [round(s, 6) for s in scores]
        info["score"] = ("1 - mean cos(input, output) per layer" if choice == "block_influence"
                         else "calibration loss increase (nats/token) when the layer alone is skipped")
    return info


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # older transformers return tuples


def block_influence(model: Any, batches: list[Any], progress: Progress) -> list[float]:
    """ShortGPT's block influence of each layer: 1 - mean over tokens of cos(input, output)."""
    layers = decoder_layers(model)
    cos_sum = torch.zeros(len(layers), dtype=torch.float64)  # (layers,)
    handles = []

    def hook(index: int):
        def measure(module, args, kwargs, output):
            x, y = _hidden_in(args, kwargs), _hidden_out(output)  # (1, T, H) each
            cos_sum[index] += float(nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).sum())
        return measure

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(hook(i), with_kwargs=True))
    try:
        calibration_forward(model, batches, progress)
    finally:
        for h in handles:
            h.remove()
    tokens = sum(len(ids) for ids in batches)
    return (1 - cos_sum / max(tokens, 1)).tolist()


def skip_loss_increase(model: Any, batches: list[Any], progress: Progress) -> list[float]:
    """Increase of the mean next-token loss on the calibration windows when each layer alone is skipped."""
    layers = decoder_layers(model)

    def loss() -> float:
        total, count = 0.0, 0
        for ids in batches:
            x = torch.as_tensor(ids, dtype=torch.long)[None]  # (1, T)
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()  # (T-1, V)
            total += float(nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            count += x.shape[1] - 1
        return total / max(count, 1)

    base = loss()
    increases = []
    for i, layer in enumerate(layers):
        # The hook hands the layer's input on as its output: the residual stream skips the layer.
        handle = layer.register_forward_hook(
            lambda m, args, kwargs, out: (_hidden_in(args, kwargs),) + out[1:] if isinstance(out, tuple)
            else _hidden_in(args, kwargs), with_kwargs=True)
        try:
            increases.append(loss() - base)
        finally:
            handle.remove()
        progress(i + 1, len(layers))
    return increases


def remove_layers(model: Any, drop: list[int]) -> None:
    """Drop decoder layers, renumber `layer_idx` (the KV cache's index) and per-layer config lists."""
    config, layers = model.config, decoder_layers(model)
    count = len(layers)
    if not drop:
        return
    keep = [i for i in range(count) if i not in set(drop)]
    dense = [getattr(getattr(layers[i], "mlp", None), "experts", None) is None for i in keep]
    model.model.layers = nn.ModuleList(layers[i] for i in keep)
    for new_index, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    for key, value in list(config.to_dict().items()):
        # Per-layer lists such as layer_types; token-id lists that happen to have the same length are not.
        if isinstance(value, list) and len(value) == count and not key.endswith(("_id", "_ids")):
            setattr(config, key, [value[i] for i in keep])
    for key, value in layer_kinds_config(config, dense).items():  # MoE layers named by index (Qwen3-MoE)
        setattr(config, key, value)
    config.num_hidden_layers = len(keep)
