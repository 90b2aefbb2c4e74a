"""Routed experts as one Linear per projection, whichever transformers loaded them.

transformers 5 keeps a Qwen3-MoE layer's experts as two 3-D parameters run by one module (`mlp.experts.gate_up_proj`
(experts, 2 * intermediate, hidden), gate rows first, and `mlp.experts.down_proj` (experts, hidden, intermediate));
transformers 4, the checkpoints on the hub, vLLM and compressed-tensors name them per expert
(`mlp.experts.<e>.gate_proj`). llmopt unfuses them once, when a model enters a pipeline (`ModelState`): every pass
then sees per-expert Linears, as on transformers 4 (GPTQ and AWQ hook each one and see only the tokens routed to
it), the architecture description has one expert layout to describe, and the exporters write the per-expert names
of the hub's checkpoints, which transformers 5 fuses again when it loads them.

Why by hand: transformers has the fusing direction only (its checkpoint conversion on load); there is no module
for per-expert weights in transformers 5 to swap in.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Expert(nn.Module):
    """One gated expert: down(act(gate(x)) * up(x)), as transformers 4's expert MLP."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act_fn: Any) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (_linear(w) for w in (gate, up, down))
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertList(nn.ModuleList):
    """The experts of one layer, called as the fused module is: (tokens (n, hidden), top-k expert indices (n, k),
    top-k weights (n, k)) -> (n, hidden). Experts run in ascending order and add into each token's row, as
    transformers 5's loop does, so the sums are the same to the last bit."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            tokens, slot = torch.where(top_k_index == e)
            if tokens.numel():
                y = expert(hidden_states[tokens]) * top_k_weights[tokens, slot, None]
                out.index_add_(0, tokens, y.to(out.dtype))
        return out


def unfuse_experts(model: Any) -> int:
    """Replace each fused experts module of `model` by an ExpertList holding the same weights (copied, one module at
    a time, so that no two parameters share storage when saved; the 3-D parameters are then released); returns how
    many were replaced (0 on transformers 4)."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if not _is_fused(name, module):
            continue
        gate_up, down = module.gate_up_proj.detach(), module.down_proj.detach()
        half = gate_up.shape[1] // 2
        experts = ExpertList(Expert(gate_up[e, :half], gate_up[e, half:], down[e], module.act_fn)
                             for e in range(gate_up.shape[0]))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, experts)
        replaced += 1
    return replaced


def fused_expert_tensors(name: str, tensor: Any) -> dict[str, Any] | None:
    """A fused experts parameter (`...mlp.experts.gate_up_proj` / `.down_proj`, 3-D) as per-expert weights under
    their per-expert names; None for any other parameter. For readers of a state dict of a fused model."""
    base, _, kind = name.rpartition(".")
    if not base.endswith("mlp.experts") or getattr(tensor, "ndim", 0) != 3:
        return None
    if kind == "gate_up_proj":
        half = tensor.shape[1] // 2
        return {**{f"{base}.{e}.gate_proj.weight": tensor[e, :half] for e in range(tensor.shape[0])},
                **{f"{base}.{e}.up_proj.weight": tensor[e, half:] for e in range(tensor.shape[0])}}
    if kind == "down_proj":
        return {f"{base}.{e}.down_proj.weight": tensor[e] for e in range(tensor.shape[0])}
    return None


def _is_fused(name: str, module: Any) -> bool:
    return (name.endswith("mlp.experts") and not isinstance(module, nn.ModuleList)
            and isinstance(getattr(module, "gate_up_proj", None), nn.Parameter)
            and getattr(module, "gate_up_proj").ndim == 3 and hasattr(module, "act_fn"))


def _linear(weight: torch.Tensor) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=False, device=weight.device, dtype=weight.dtype)
    layer.weight = nn.Parameter(weight.clone(), requires_grad=weight.requires_grad)
    return layer
