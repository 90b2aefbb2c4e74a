"""RoPE for the ONNX writer: each layer's cos/sin tables as the model's own rotary module computes them, stored
once per distinct table in the graph (GroupQueryAttention applies them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmopt.architectures import Architecture, attention_windows, rotary_layers
from llmopt.exporters.onnx_graph import NUMPY_DTYPE, Graph


@dataclass(frozen=True)
class Rotary:
    cos: str
    sin: str


def rotary_tables(g: Graph, model: Any, arch: Architecture, dtype: int) -> list[Rotary | None]:
    """Per layer, its cos/sin tables (None: a layer without RoPE) in the attention's element type, stored once per
    distinct table."""
    tables: dict[int, Rotary] = {}
    out: list[Rotary | None] = []
    for cos, sin in rotary_caches(model, interleaved=arch.rotary == "interleaved"):
        if cos is None:
            out.append(None)
            continue
        if id(cos) not in tables:
            n = len(tables)
            tables[id(cos)] = Rotary(g.constant(f"cos_cache_{n}", cos.astype(NUMPY_DTYPE[dtype])),
                                      g.constant(f"sin_cache_{n}", sin.astype(NUMPY_DTYPE[dtype])))
        out.append(tables[id(cos)])
    return out


def rotary_caches(model: Any, *, interleaved: bool = False) -> list[tuple[Any, Any]]:
    """Per decoder layer, cos and sin (max_positions, rotary_dim / 2) float32 as the model's own rotary module
    computes them, or (None, None) for a layer without RoPE; layers that share a table share the arrays.

    The module, not a re-derivation of transformers' formulas: it carries the rope type, its scaling and
    attention factor, partial rotary and each layer type's base (Gemma 3's local layers), under the spelling
    of whichever transformers is installed (`rope_scaling` in 4.x, `rope_parameters` in 5.x). `model` may hold
    its weights on the meta device: the rotary frequencies are buffers."""
    import torch

    config, core = model.config, model.model
    with_rope = rotary_layers(config)
    kinds = getattr(config, "layer_types", None) or [None] * config.num_hidden_layers
    windows = attention_windows(config)
    positions = torch.arange(config.max_position_embeddings)[None]
    probe = torch.zeros(1, dtype=torch.float32)
    computed: dict[tuple, tuple[Any, Any]] = {}
    out: list[tuple[Any, Any]] = []
    for i in range(config.num_hidden_layers):
        if not with_rope[i]:
            out.append((None, None))
            continue
        module, kwargs = core.rotary_emb, {}
        if windows[i] is not None and hasattr(core, "rotary_emb_local"):  # Gemma 3 on transformers 4
            module = core.rotary_emb_local
        elif isinstance(getattr(module, "rope_type", None), dict):  # transformers 5: one module, per layer type
            kwargs = {"layer_type": kinds[i]}
        key = (id(module), kinds[i] if kwargs else None)
        if key not in computed:
            with torch.no_grad():
                cos, sin = module(probe, positions, **kwargs)  # (1, positions, rotary_dim): each angle twice
            pick = slice(None, None, 2) if interleaved else slice(None, cos.shape[-1] // 2)
            computed[key] = (cos[0, :, pick].float().numpy().copy(), sin[0, :, pick].float().numpy().copy())
        out.append(computed[key])
    return out
