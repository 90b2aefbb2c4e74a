"""What llmopt knows about each model family, in one place: every pass, exporter and check reads it.

One `Architecture` per transformers `model_type`, in the spirit of optimum's per-architecture normalized
configs: the decoder layers' module layout (which op's output each Linear reads, fused projections, MoE experts),
the norms' flavour and which of them sit after a block instead of before it, the rotary layout, and what each
pass can rewrite. The per-config facts (KV heads under every spelling, the attention window of every layer,
head size, norm epsilon, activation, the scalings and soft-caps around the blocks, which layers apply RoPE and
how wide, MoE routing, rope types under transformers 4's and 5's spellings) are read by functions here too, so
the passes and exporters do not look at `model_type` or at a config's raw attributes.

A family without an entry is refused at plan time by the passes that need the layout (`require`), naming the
families that are described; it is never partially quantized or rewritten.

Module paths are relative to one decoder layer (`model.layers[i]`), as transformers names them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from llmopt.errors import RecipeError

LAYERS = "model.layers"  # where every described family keeps its decoder layers
FINAL_NORM = "model.norm"  # and the norm between the last of them and lm_head


@dataclass(frozen=True)
class InputGroup:
    """Linears that read the output of one op (a norm, or up_proj for down_proj): a per-input-channel scale can
    be folded into `source` and multiplied into every one of `linears` with the function unchanged. `linears`
    lists *every* reader of `source`'s output: a reader left out would see the folded scale."""

    source: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class Architecture:
    model_type: str
    groups: tuple[InputGroup, ...]
    norm: Literal["rms", "rms_one_plus", "layernorm"] = "rms"  # rms_one_plus: Gemma's x * (1 + w)
    # Norms applied to a block's output before the residual add (Gemma 2/3, OLMo 2): nothing folds into them.
    post_norms: tuple[str, ...] = ()
    qk_norm: Literal["none", "per_head", "whole"] = "none"  # whole: one norm over all heads (OLMo 2)
    rotary: Literal["half", "interleaved"] = "half"  # which dimensions RoPE pairs: f with f + d/2, or 2f with 2f+1
    fused_qkv: bool = False  # one qkv_proj (Phi-3)
    fused_gate_up: bool = False  # one gate_up_proj (Phi-3)
    moe: bool = False  # MLP of routed experts
    parallel: bool = False  # attention and MLP side by side on one norm, both added to the stream (Cohere)
    scaled_embedding: bool = False  # the embedding's output times sqrt(hidden_size) (Gemma)
    # What the rewriting passes handle: `gqa` an attention with repeat_kv, `prune` (width) also a dense gated MLP;
    # depth and sparse pruning, quantize, half, distill and the exporters take every described family.
    gqa: bool = False
    prune: bool = False
    stream: bool = True  # the layer-by-layer writers (core/streaming.py) know its block (every family, MoE too)

    def layer_groups(self, layer: Any) -> tuple[InputGroup, ...]:
        """The groups of one decoder layer: an MoE family's sparse layers read the norm through a router and
        every expert (their count is the layer's), its dense layers through one MLP."""
        experts = getattr(getattr(layer, "mlp", None), "experts", None)
        if self.moe and experts is not None:
            return _moe_groups(len(experts))
        return self.groups


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
_DOWN = InputGroup("mlp.up_proj", ("mlp.down_proj",))
# Pre-norm decoder layer (Llama and most of its descendants).
_PRE_NORM = (InputGroup("input_layernorm", _QKV), InputGroup("post_attention_layernorm", _GATE_UP), _DOWN)
# Gemma 2/3: the MLP reads pre_feedforward_layernorm; post_attention_layernorm normalizes the attention's output.
_SANDWICH = (InputGroup("input_layernorm", _QKV), InputGroup("pre_feedforward_layernorm", _GATE_UP), _DOWN)


def _llama_like(model_type: str, **kw: Any) -> Architecture:
    return Architecture(model_type, _PRE_NORM, **kw)


def _moe_groups(experts: int) -> tuple[InputGroup, ...]:
    """Pre-norm layer whose MLP is a router (`mlp.gate`) and `experts` gated experts."""
    readers = ("mlp.gate", *(f"mlp.experts.{e}.{p}" for e in range(experts) for p in ("gate_proj", "up_proj")))
    downs = tuple(InputGroup(f"mlp.experts.{e}.up_proj", (f"mlp.experts.{e}.down_proj",)) for e in range(experts))
    return (InputGroup("input_layernorm", _QKV), InputGroup("post_attention_layernorm", readers), *downs)


ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    _llama_like("llama", gqa=True, prune=True),
    _llama_like("qwen3_moe", qk_norm="per_head", moe=True, gqa=True),
    _llama_like("mistral", gqa=True, prune=True),
    _llama_like("qwen2", gqa=True, prune=True),
    _llama_like("qwen3", qk_norm="per_head", gqa=True, prune=True),
    # every fourth layer without RoPE (a RoPE-commuting map commutes there too)
    _llama_like("smollm3", gqa=True, prune=True),
    # embedding, residual, attention and logit multipliers: inside the modules
    _llama_like("granite", gqa=True, prune=True),
    _llama_like("gemma", norm="rms_one_plus", scaled_embedding=True, gqa=True, prune=True),
    Architecture("gemma2", _SANDWICH, norm="rms_one_plus", scaled_embedding=True, gqa=True,
                 prune=True, post_norms=("post_attention_layernorm", "post_feedforward_layernorm")),
    Architecture("gemma3_text", _SANDWICH, norm="rms_one_plus", scaled_embedding=True, qk_norm="per_head", gqa=True,
                 prune=True, post_norms=("post_attention_layernorm", "post_feedforward_layernorm")),
    # Phi-3/Phi-4: fused projections. down_proj reads act(gate) * up, and up is half of gate_up_proj's rows:
    # no whole module to fold into, so that group is not offered.
    Architecture("phi3", (InputGroup("input_layernorm", ("self_attn.qkv_proj",)),
                          InputGroup("post_attention_layernorm", ("mlp.gate_up_proj",))),
                 fused_qkv=True, fused_gate_up=True, gqa=True, prune=True),
    # OLMo 2: norms after each block only, so q/k/v and gate/up read the residual stream (nothing to fold into).
    Architecture("olmo2", (_DOWN,), qk_norm="whole", gqa=True, prune=True,
                 post_norms=("post_attention_layernorm", "post_feedforward_layernorm")),
    # Cohere: attention and MLP in parallel on one LayerNorm (no bias); RoPE on interleaved pairs.
    Architecture("cohere", (InputGroup("input_layernorm", (*_QKV, *_GATE_UP)), _DOWN), norm="layernorm",
                 rotary="interleaved", parallel=True, gqa=True, prune=True),
)}


def describe(model_type: str) -> Architecture | None:
    return ARCHITECTURES.get(model_type)


def require(model_type: str, what: str, where: str, *, capability: str | None = None) -> Architecture:
    """The family's description, or a plan-time RecipeError naming what is supported. With `capability` ('gqa',
    'prune', 'stream'), the family must also allow that rewrite."""
    arch = describe(model_type)
    able = [t for t, a in sorted(ARCHITECTURES.items()) if capability is None or getattr(a, capability)]
    if arch is None or (capability is not None and not getattr(arch, capability)):
        raise RecipeError(f"{where}: {what} does not handle model_type '{model_type}'.",
                          f"Supported: {', '.join(able)}. Remove it from the recipe for this model.")
    return arch


def kv_heads(config: Any) -> int:
    """Key/value heads under every spelling transformers configs use."""
    heads = _first(config, "num_attention_heads", "n_head", "num_heads")
    for key in ("num_key_value_heads", "n_head_kv"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    if config.model_type == "falcon":  # num_kv_heads is read only by the new decoder architecture
        if getattr(config, "new_decoder_architecture", False):
            return int(getattr(config, "num_kv_heads", None) or heads)
        return 1 if getattr(config, "multi_query", True) else heads
    if getattr(config, "multi_query", False):  # GPT-BigCode
        return 1
    return int(heads)


def attention_windows(config: Any) -> list[int | None]:
    """Per decoder layer, the tokens a query may attend to (a sliding window), or None for full attention."""
    layers = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    window = window if isinstance(window, int) and window > 0 else None
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return [window if kind == "sliding_attention" else None for kind in kinds]
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return [None] * layers
    return [window] * layers


@dataclass(frozen=True)
class Scalings:
    """The constant factors and caps a family applies around its blocks (1.0 or None where it applies none)."""

    embedding: float  # times the embedding's output: Gemma's sqrt(hidden) (in float32), Granite's multiplier
    residual: float  # times each block's output before the residual add (Granite)
    attention: float  # the softmax scale: head_dim**-0.5, Granite's multiplier, Gemma 2/3's query_pre_attn_scalar
    logits: float  # times the logits: Cohere's logit_scale, 1 / Granite's logits_scaling
    attention_softcap: float | None  # cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None  # cap * tanh(logits / cap) (Gemma 2)

    def final_logits(self, logits: Any) -> Any:
        """lm_head's output (a torch tensor) with the logit scale and soft-cap, as the family's model applies them.
        The tensor's own tanh keeps this module free of torch (the CLI imports it at start-up)."""
        logits = logits * self.logits
        return (logits / self.final_softcap).tanh() * self.final_softcap if self.final_softcap else logits


def scalings(config: Any) -> Scalings:
    arch = describe(config.model_type)
    embedding = float(_np_float32(config.hidden_size ** 0.5)) if arch is not None and arch.scaled_embedding else 1.0
    embedding *= float(getattr(config, "embedding_multiplier", None) or 1.0)
    attention = getattr(config, "attention_multiplier", None)
    if attention is None and getattr(config, "query_pre_attn_scalar", None) is not None:
        attention = float(config.query_pre_attn_scalar) ** -0.5
    logits = float(getattr(config, "logit_scale", None) or 1.0) / float(getattr(config, "logits_scaling", None) or 1.0)
    return Scalings(embedding=embedding, residual=float(getattr(config, "residual_multiplier", None) or 1.0),
                    attention=float(attention if attention is not None else head_dim(config) ** -0.5),
                    logits=logits, attention_softcap=getattr(config, "attn_logit_softcapping", None) or None,
                    final_softcap=getattr(config, "final_logit_softcapping", None) or None)


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def norm_eps(config: Any) -> float:
    return float(_first(config, "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon") or 1e-6)


def activation(config: Any) -> str:
    """The MLP's activation, under transformers' two spellings (Gemma writes hidden_activation)."""
    return str(getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu"))


def qk_norm(config: Any) -> str:
    """The model's q/k norms: the family's (`Architecture.qk_norm`), or "per_head_weights" where a config switches
    on optional ones with a weight per head (Cohere's `use_qk_norm`)."""
    arch = describe(config.model_type)
    if getattr(config, "use_qk_norm", False):
        return "per_head_weights"
    return arch.qk_norm if arch is not None else "none"


def rotary_layers(config: Any) -> list[bool]:
    """Per decoder layer, whether it applies RoPE (SmolLM3 leaves it out of every few layers: no_rope_layers 0)."""
    no_rope = getattr(config, "no_rope_layers", None)
    return [bool(no_rope[i]) if no_rope is not None else True for i in range(config.num_hidden_layers)]


def rotary_width(config: Any) -> int:
    """Dimensions of each head that RoPE rotates (partial_rotary_factor of head_dim: Phi-4-mini rotates 3/4)."""
    return int(head_dim(config) * float(getattr(config, "partial_rotary_factor", None) or 1.0))


def rotary_pairs(config: Any) -> tuple[list[int], list[int]]:
    """The head dimensions RoPE rotates together, as two lists: dimension first[f] pairs with second[f].

    Half-split RoPE pairs f with f + r/2 over the rotated width r, interleaved RoPE (Cohere) 2f with 2f + 1.
    Dimensions past r are not rotated; they are paired among themselves (any map commutes with no rotation), so
    every head dimension is in exactly one pair. The gqa pass merges keys by maps that commute with RoPE: per
    pair, a rotation and a scale."""
    hd, width = head_dim(config), rotary_width(config)
    arch = describe(config.model_type)
    if arch is not None and arch.rotary == "interleaved":
        first, second = list(range(0, width, 2)), list(range(1, width, 2))
    else:
        first, second = list(range(width // 2)), list(range(width // 2, width))
    rest = hd - width
    first += list(range(width, width + rest // 2))
    second += list(range(width + rest // 2, width + 2 * (rest // 2)))
    if rest % 2:
        raise RecipeError(f"model: {rest} head dimensions outside RoPE's rotated width ({width} of {hd}) is odd; "
                          "the gqa pass pairs them.", "Use `method: mean` for this model.")
    return first, second


def routing(config: Any) -> tuple[int, bool]:
    """An MoE family's experts per token and whether their top-k router weights are renormalized."""
    return int(config.num_experts_per_tok), bool(getattr(config, "norm_topk_prob", False))


def layer_kinds_config(config: Any, dense: list[bool]) -> dict[str, Any]:
    """Config fields that make layer i dense (one MLP) exactly where `dense[i]`, for an MoE family whose config
    says by index which layers route to experts (Qwen3-MoE: `mlp_only_layers`, `decoder_sparse_step`); what depth
    pruning writes after renumbering the layers. Empty for families that have no such fields."""
    if not hasattr(config, "mlp_only_layers"):
        return {}
    return {"mlp_only_layers": [i for i, d in enumerate(dense) if d], "decoder_sparse_step": 1}


def _np_float32(value: float) -> float:
    import numpy as np

    return float(np.float32(value))


def rope_types(config: Any) -> set[str]:
    """The rope types a config uses: transformers 5's `rope_parameters` (one mapping, or one per layer type, as
    Gemma 3 has) or transformers 4's `rope_scaling` (absent for plain RoPE)."""
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = getattr(config, "rope_scaling", None) or {}
    mappings = list(params.values()) if params and all(isinstance(v, dict) for v in params.values()) else [params]
    return {str(m.get("rope_type", m.get("type", "default"))) for m in mappings}


def _first(config: Any, *keys: str) -> Any:
    return next((getattr(config, k) for k in keys if getattr(config, k, None) is not None), None)


def support_markdown() -> str:
    """The README's family x pass/exporter table, from the descriptions above (a test keeps the README in sync)."""
    rows = ["| family (`model_type`) | quantize (RTN, GPTQ, SignRound, W8A8) | AWQ / SmoothQuant scales folded into | gqa | prune "
            "| streaming | ONNX, safetensors |", "|---|---|---|---|---|---|---|"]
    mark = {True: "yes", False: "refused"}
    for name, arch in sorted(ARCHITECTURES.items()):
        sources = ", ".join(dict.fromkeys(g.source.split(".")[-1] for g in arch.groups))
        if arch.moe:
            sources += " (router and every expert)"
        prune = "yes" if arch.prune else "depth, sparse (width refused)"
        rows.append(f"| `{name}` | yes | {sources} | {mark[arch.gqa]} | {prune} | {mark[arch.stream]} | yes |")
    return "\n".join(rows) + "\n"
