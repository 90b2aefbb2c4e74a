"""One decoder layer's projections as separate Linears, whatever the family fuses: the rewriting passes (`gqa`,
width pruning) work on q/k/v and gate/up and write the result back in the family's own layout.

Phi-3/Phi-4 store `qkv_proj` (rows: queries, keys, values) and `gate_up_proj` (rows: gate, up; the MLP chunks
it in two); every other described family has separate Linears. Model-running code, imported by pass run()
methods only.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from llmopt.architectures import Architecture, qk_norm


def linear_like(like: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A new Linear holding `weight` (out, in) and `bias`, with `like`'s dtype, device and gradient flag."""
    # On the meta device: no random initialisation to pay for (nor to draw from the global RNG).
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=like.weight.dtype)
    grad = like.weight.requires_grad
    new.weight = nn.Parameter(weight.detach().to(like.weight.device, like.weight.dtype).clone().contiguous(),
                              requires_grad=grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().to(like.weight.device, like.weight.dtype).clone(), requires_grad=grad)
    return new


def _split(linear: nn.Linear, sizes: list[int]) -> list[nn.Linear]:
    weights = linear.weight.split(sizes)
    biases = linear.bias.split(sizes) if linear.bias is not None else [None] * len(sizes)
    return [linear_like(linear, w, b) for w, b in zip(weights, biases)]


def _joined(parts: list[nn.Linear]) -> nn.Linear:
    bias = torch.cat([p.bias for p in parts]) if parts[0].bias is not None else None
    return linear_like(parts[0], torch.cat([p.weight for p in parts]), bias)


def _qkv_sizes(attn: nn.Module) -> list[int]:
    """Rows of queries, keys and values in a fused qkv_proj: queries are o_proj's input width."""
    q = attn.o_proj.in_features
    kv = (attn.qkv_proj.out_features - q) // 2
    return [q, kv, kv]


def qkv(attn: nn.Module, arch: Architecture) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """The query, key and value projections (copies when the family fuses them)."""
    if arch.fused_qkv:
        q, k, v = _split(attn.qkv_proj, _qkv_sizes(attn))
        return q, k, v
    return attn.q_proj, attn.k_proj, attn.v_proj


def set_qkv(attn: nn.Module, arch: Architecture, q: nn.Linear, k: nn.Linear, v: nn.Linear) -> None:
    if arch.fused_qkv:
        attn.qkv_proj = _joined([q, k, v])
    else:
        attn.q_proj, attn.k_proj, attn.v_proj = q, k, v


def gate_up(mlp: nn.Module, arch: Architecture) -> tuple[nn.Linear, nn.Linear]:
    if arch.fused_gate_up:
        half = mlp.gate_up_proj.out_features // 2
        gate, up = _split(mlp.gate_up_proj, [half, half])
        return gate, up
    return mlp.gate_proj, mlp.up_proj


def set_gate_up(mlp: nn.Module, arch: Architecture, gate: nn.Linear, up: nn.Linear) -> None:
    if arch.fused_gate_up:
        mlp.gate_up_proj = _joined([gate, up])
    else:
        mlp.gate_proj, mlp.up_proj = gate, up


def hook_qkv(attn: nn.Module, arch: Architecture,
             receive: Callable[[str, torch.Tensor], None]) -> list[Any]:
    """Forward hooks handing `receive('q' | 'k' | 'v', output)` each projection's output; returns the handles."""
    if arch.fused_qkv:
        sizes = _qkv_sizes(attn)

        def split(module, inputs, output) -> None:
            for key, part in zip("qkv", output.split(sizes, dim=-1)):
                receive(key, part)
        return [attn.qkv_proj.register_forward_hook(split)]
    return [getattr(attn, f"{key}_proj").register_forward_hook(
        lambda module, inputs, output, key=key: receive(key, output)) for key in "qkv"]


def per_head_norm(attn: nn.Module, which: str, config: Any) -> nn.Module | None:
    """`attn.q_norm` / `attn.k_norm` when its weight holds one slice per head (llmopt.architectures.qk_norm: OLMo
    2's norm over all heads, Cohere's optional per-head LayerNorm); None when there is none or its weight is shared
    by every head (Qwen3, Gemma 3), which head removal and merging leave as it is."""
    return getattr(attn, which, None) if qk_norm(config) in ("whole", "per_head_weights") else None


def set_head_weights(norm: nn.Module, per_head: torch.Tensor) -> None:
    """Give a per-head norm the weight `per_head` (new heads, head_dim), in the weight's own shape: (heads,
    head_dim) for Cohere, flat for OLMo 2."""
    old = norm.weight
    shaped = per_head if old.dim() == 2 else per_head.reshape(-1)
    norm.weight = nn.Parameter(shaped.to(old.device, old.dtype).contiguous(), requires_grad=old.requires_grad)
