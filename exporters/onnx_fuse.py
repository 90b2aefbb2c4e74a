"""Rewrite an exported decoder graph to onnxruntime's fused contrib ops (com.microsoft).

Two steps, the library first:

1. onnxruntime's transformer optimizer (``onnxruntime.transformers``, BERT-style fusions with attention
   fusion off) turns RMSNorm into ``SimplifiedLayerNormalization``, RMSNorm + residual into
   ``SkipSimplifiedLayerNormalization``, rotary embedding into ``RotaryEmbedding`` and tanh/erf GELU into
   ``FastGelu``/``Gelu`` on optimum's (TorchScript) export. onnxscript's ``optimize_for_ort`` was tried
   too: it is written for ``torch.onnx.export(dynamo=True)`` graphs and matched none of these patterns
   on optimum's export (0 fusions on a tiny Llama), so it is not used.
2. By hand, because neither library fuses the attention of this export (its attention fusions expect
   BERT/GPT-2 shapes, not a KV cache with repeated KV heads and a computed causal mask):
   * attention (Q·Kᵀ, mask, softmax, ·V, with past/present KV) -> ``GroupQueryAttention``, which reads
     and writes the cache in optimum's layout (batch, kv_heads, seq, head_dim), so
     ``ORTModelForCausalLM`` drives the fused model exactly as the unfused one;
   * x·sigmoid(x) (SiLU) -> ``QuickGelu`` with alpha 1 (ORT's fusion only knows alpha 1.702).

Each attention is matched by structure from its ``present.<i>.key``/``.value`` outputs, never by node
name; a layer whose pattern differs (e.g. logit soft-capping) is left as it was and reported.

GroupQueryAttention takes the causal mask from ``seqlens_k``/``total_sequence_length``, computed here
from ``attention_mask``: right for batch 1 or right padding, which is how the runners drive the model;
left-padded batches would need the mask-based attention (stated in the export notes).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"
FUSED_OPS = ("GroupQueryAttention", "MultiHeadAttention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization",
             "SimplifiedLayerNormalization", "SkipLayerNormalization", "LayerNormalization", "QuickGelu",
             "FastGelu", "Gelu", "BiasGelu")
# Protobuf cannot serialize a single message over 2 GiB; stay clear of it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Ops allowed between Q·Kᵀ and softmax·V in an attention we fuse: scaling, mask, softmax and the
# NaN guard torch's SDPA export adds. Anything else (soft-capping's Tanh, dropout...) means "not ours".
_SCORE_OPS = {"Mul", "Div", "Add", "Softmax", "IsNaN", "Where", "Cast"}


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    kv_heads: int
    head_dim: int
    # Per layer, the tokens a query attends to when the layer uses a local window (None: full attention).
    # Per layer because families mix them (Gemma 2 alternates, Gemma 3 has five local layers to one global).
    windows: tuple[int | None, ...] = ()
    max_positions: int | None = None  # the config's max_position_embeddings: rows the rotary tables need

    def window(self, layer: int) -> int | None:
        return self.windows[layer] if layer < len(self.windows) else None


@dataclass
class FuseStats:
    counts: dict[str, int] = field(default_factory=dict)  # fused op type -> nodes in the final graph
    unfused: list[str] = field(default_factory=list)  # what was left as it was, and why
    nodes_before: int = 0
    nodes_after: int = 0


def fuse_graph(model: onnx.ModelProto, shape: AttentionShape, *, attention: bool = True,
               norms: bool = True, rotary: bool = True, activations: bool = True) -> FuseStats:
    """Rewrite ``model`` in place; returns the fused-op counts and what stayed unfused."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    stats = FuseStats(nodes_before=len(model.graph.node))
    library_fusions(model, norms=norms, rotary=rotary, gelu=activations)
    graph = OnnxModel(model)
    if rotary and shape.max_positions:
        trim_rotary_tables(graph, shape.max_positions)
    if activations:
        fuse_silu(graph)
    if attention:
        stats.unfused += fuse_attention(graph, shape)
    graph.prune_graph()
    graph.topological_sort()
    counts = Counter(n.op_type for n in model.graph.node if n.domain == MS_DOMAIN or n.op_type in FUSED_OPS)
    stats.counts = {op: counts[op] for op in FUSED_OPS if counts[op]}
    stats.nodes_after = len(model.graph.node)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return stats


def fuse_file(path: Path, shape: AttentionShape, *, external_data: bool | None = None, **switches: bool) -> FuseStats:
    """Load ``path`` (with its external data), fuse, and write it back in place."""
    return rewrite_file(path, lambda model: fuse_graph(model, shape, **switches), external_data)


def rewrite_file(path: Path, rewrite: Callable[[onnx.ModelProto], Any], external_data: bool | None = None) -> Any:
    """Load ``path`` with its external data, apply ``rewrite`` in place, write it back; returns what it returned."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    path = Path(path)
    model = onnx.load(str(path), load_external_data=True)
    old_data = {e.value for init in model.graph.initializer if init.data_location == TensorProto.EXTERNAL
                for e in init.external_data if e.key == "location"}
    result = rewrite(model)
    for init in model.graph.initializer:  # loaded in memory now; saving decides where they go
        init.data_location = TensorProto.DEFAULT
        del init.external_data[:]
    size = sum(init.ByteSize() for init in model.graph.initializer)
    use_external = size > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    for name in old_data:
        (path.parent / name).unlink(missing_ok=True)
    data_file = path.with_name(path.name + ".data")
    data_file.unlink(missing_ok=True)
    OnnxModel(model).save_model_to_file(str(path), use_external_data_format=use_external, all_tensors_to_one_file=True)
    if use_external and not data_file.exists():  # ORT's helper names it <model>.data; keep one name
        written = path.with_name(path.stem + ".onnx.data")
        if written.exists():
            written.rename(data_file)
    return result


def library_fusions(model: onnx.ModelProto, *, norms: bool, rotary: bool, gelu: bool) -> None:
    """onnxruntime's own fusions for norms, rotary embedding and GELU (attention fusion off: ours)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_by_fusion

    options = FusionOptions("bert")
    options.enable_attention = False  # BERT/GPT-2 attention shapes: fused by hand below instead
    options.enable_embed_layer_norm = False  # BERT's embedding + LayerNorm, not a decoder's
    options.enable_qordered_matmul = False
    options.enable_bias_skip_layer_norm = False
    options.enable_layer_norm = norms
    options.enable_skip_layer_norm = norms
    options.enable_rotary_embeddings = rotary
    options.enable_gelu = gelu
    options.enable_bias_gelu = gelu
    fused = optimize_by_fusion(model, model_type="bert", num_heads=0, hidden_size=0, optimization_options=options)
    if fused.model is not model:
        model.CopyFrom(fused.model)


def trim_rotary_tables(graph: Any, max_positions: int) -> int:
    """Cut RotaryEmbedding's cos/sin tables to the model's positions; returns the bytes saved.

    onnxruntime's rotary fusion writes tables for a fixed 131,072 positions (16 MB each at head_dim 64),
    far beyond what a model's config allows (8,192 for SmolLM2); the op reads row ``position`` only.
    """
    saved = 0
    tables = {name for node in graph.model.graph.node if node.op_type == "RotaryEmbedding" for name in node.input[2:4]}
    for name in tables:
        table = graph.get_initializer(name)
        if table is None or len(table.dims) != 2 or table.dims[0] <= max_positions:
            continue
        array = numpy_helper.to_array(table)
        saved += array.nbytes - array[:max_positions].nbytes
        table.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array[:max_positions]), name))
    return saved


def fuse_silu(graph: Any) -> int:
    """Mul(x, Sigmoid(x)) -> QuickGelu(x, alpha=1): SiLU as one op (ORT's fusion wants alpha 1.702)."""
    fused = 0
    producers = graph.output_name_to_node()
    for node in list(graph.nodes()):
        if node.op_type != "Mul" or node.domain not in ("", "ai.onnx"):
            continue
        for i in (0, 1):
            sigmoid = producers.get(node.input[1 - i])
            if sigmoid is not None and sigmoid.op_type == "Sigmoid" and sigmoid.input[0] == node.input[i]:
                graph.add_node(helper.make_node("QuickGelu", [node.input[i]], list(node.output),
                                                name=(node.name or "silu") + "_QuickGelu", domain=MS_DOMAIN, alpha=1.0))
                graph.remove_node(node)
                fused += 1
                break
    return fused


def fuse_attention(graph: Any, shape: AttentionShape) -> list[str]:
    """Every layer's attention -> GroupQueryAttention; returns a note per layer left as it was."""
    outputs = [o.name for o in graph.model.graph.output]
    layers = sorted(int(name.split(".")[1]) for name in outputs
                    if name.startswith("present.") and name.endswith(".key"))
    if not layers:
        return ["attention: no present.<i>.key outputs (exported without KV cache); not fused"]
    if "attention_mask" not in {i.name for i in graph.model.graph.input}:
        return ["attention: the graph has no attention_mask input; not fused"]
    seqlens, total = _sequence_lengths(graph)
    notes = []
    for layer in layers:
        try:
            match = _match_attention(graph, layer)
        except _NoMatch as why:
            notes.append(f"attention of layer {layer} not fused: {why}")
            continue
        query = _to_bsh(graph, match.query, shape.num_heads, f"layer{layer}_q")
        key = _to_bsh(graph, match.key, shape.kv_heads, f"layer{layer}_k")
        value = _to_bsh(graph, match.value, shape.kv_heads, f"layer{layer}_v")
        attrs: dict[str, Any] = {"num_heads": shape.num_heads, "kv_num_heads": shape.kv_heads, "scale": match.scale}
        if shape.window(layer):
            attrs["local_window_size"] = shape.window(layer)
        for node in match.replaced:  # nodes whose outputs the fused op now produces
            graph.remove_node(node)
        graph.add_node(helper.make_node(
            "GroupQueryAttention", [query, key, value, match.past_key, match.past_value, seqlens, total],
            [match.output, f"present.{layer}.key", f"present.{layer}.value"],
            name=f"layer{layer}_GroupQueryAttention", domain=MS_DOMAIN, **attrs))
    return notes


class _NoMatch(Exception):
    pass


@dataclass
class _Attention:
    query: str  # (B, num_heads, S, head_dim), after rotary, before scaling
    key: str  # (B, kv_heads, S, head_dim): the new keys appended to the cache
    value: str
    past_key: str
    past_value: str
    output: str  # (B, S, num_heads * head_dim): what o_proj reads
    scale: float
    replaced: list = field(default_factory=list)


def _match_attention(graph: Any, layer: int) -> _Attention:
    producers = graph.output_name_to_node()
    consumers = graph.input_name_to_nodes()
    concat_k = producers.get(f"present.{layer}.key")
    concat_v = producers.get(f"present.{layer}.value")
    for concat in (concat_k, concat_v):
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 2 \
                or concat.input[0] not in {i.name for i in graph.model.graph.input}:
            raise _NoMatch("present key/value is not Concat(past, new)")
    # Forward from present.key to the first MatMul that reads it as its B input (Q·Kᵀ), collecting
    # the constant factors on the way (SDPA's export scales K and Q by sqrt(scale) each).
    scale = 1.0
    name, path_k = f"present.{layer}.key", []
    while True:
        users = [n for n in consumers.get(name, []) if n.op_type != "Shape"]
        if len(users) != 1:
            raise _NoMatch(f"the key cache feeds {len(users)} ops, expected one path to Q·Kᵀ")
        node = users[0]
        if node.op_type == "MatMul":
            if node.input[1] != name:
                raise _NoMatch("the keys are not the B input of Q·Kᵀ")
            qk = node
            break
        if node.op_type in ("Mul", "Div"):
            scale = _times_constant(graph, node, name, scale)
        elif node.op_type not in ("Unsqueeze", "Expand", "Reshape", "Transpose"):
            raise _NoMatch(f"unexpected {node.op_type} between the key cache and Q·Kᵀ")
        path_k.append(node)
        name = node.output[0]
        if len(path_k) > 12:
            raise _NoMatch("no Q·Kᵀ within 12 ops of the key cache")
    # Back from Q·Kᵀ's A input to the query, through constant scalings.
    name = qk.input[0]
    while (node := producers.get(name)) is not None and node.op_type in ("Mul", "Div"):
        variable = next((i for i in node.input if graph.get_constant_value(i) is None), None)
        if variable is None or node.op_type == "Div" and variable != node.input[0]:
            raise _NoMatch("query scaling is not by a constant")
        scale = _times_constant(graph, node, variable, scale)
        name = variable
    query = name
    # Forward from Q·Kᵀ through scaling, mask and softmax to softmax·V.
    node, name = qk, qk.output[0]
    while True:
        users = consumers.get(name, [])
        if len(users) != 1 and not (len(users) == 2 and {u.op_type for u in users} == {"IsNaN", "Where"}):
            raise _NoMatch(f"attention scores feed {len(users)} ops")
        node = next(u for u in users if u.op_type != "IsNaN") if len(users) == 2 else users[0]
        if node.op_type == "MatMul":
            break
        if node.op_type not in _SCORE_OPS:
            raise _NoMatch(f"{node.op_type} between Q·Kᵀ and softmax·V (e.g. soft-capping) is not supported")
        if node.op_type in ("Mul", "Div") and all(graph.get_constant_value(i) is None for i in node.input):
            raise _NoMatch("attention scores scaled by a computed value")
        if node.op_type in ("Mul", "Div"):
            scale = _times_constant(graph, node, name, scale)
        name = node.output[0]
    pv = node
    if pv.input[0] != name or not _reaches(producers, pv.input[1], f"present.{layer}.value", limit=6):
        raise _NoMatch("softmax·V does not read the value cache")
    transpose = _single_user(consumers, pv.output[0], "Transpose")
    reshape = _single_user(consumers, transpose.output[0], "Reshape")
    if _perm(transpose) != [0, 2, 1, 3]:
        raise _NoMatch("attention output is not transposed back to (B, S, heads, head_dim)")
    return _Attention(query=query, key=concat_k.input[1], value=concat_v.input[1], past_key=concat_k.input[0],
                      past_value=concat_v.input[0], output=reshape.output[0], scale=scale,
                      replaced=[concat_k, concat_v, reshape])


def _times_constant(graph: Any, node: Any, variable: str, scale: float) -> float:
    other = next(i for i in node.input if i != variable) if node.input[0] != node.input[1] else None
    value = graph.get_constant_value(other) if other is not None else None
    if value is None or np.asarray(value).size != 1:
        raise _NoMatch(f"{node.op_type} by a non-scalar or computed value in the attention")
    factor = float(np.asarray(value).reshape(()))
    return scale * factor if node.op_type == "Mul" else scale / factor


def _reaches(producers: dict, name: str, target: str, limit: int) -> bool:
    """``name`` is ``target`` seen through at most ``limit`` single-input reshaping ops (repeat_kv)."""
    for _ in range(limit + 1):
        if name == target:
            return True
        node = producers.get(name)
        if node is None or node.op_type not in ("Unsqueeze", "Expand", "Reshape", "Transpose"):
            return False
        name = node.input[0]
    return False


def _single_user(consumers: dict, name: str, op_type: str) -> Any:
    users = consumers.get(name, [])
    if len(users) != 1 or users[0].op_type != op_type:
        raise _NoMatch(f"expected one {op_type} after {name.rsplit('/', 1)[-1]}")
    return users[0]


def _perm(node: Any) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def _to_bsh(graph: Any, bnsh: str, heads: int, prefix: str) -> str:
    """A (B, S, heads * head_dim) view of a (B, heads, S, head_dim) tensor for GroupQueryAttention.

    When the tensor is Transpose(Reshape(P)) of a projection P, P itself; when it is RotaryEmbedding
    of such a transpose, RotaryEmbedding of P in its 3-D form (no transposes at all); otherwise a
    Transpose and Reshape back.
    """
    producers = graph.output_name_to_node()
    node = producers.get(bnsh)
    rotary = None
    if node is not None and node.op_type == "RotaryEmbedding" and node.domain == MS_DOMAIN:
        rotary, node = node, producers.get(node.input[0])
    projection = None
    if node is not None and node.op_type == "Transpose" and _perm(node) == [0, 2, 1, 3]:
        reshape = producers.get(node.input[0])
        if reshape is not None and reshape.op_type == "Reshape":
            projection = reshape.input[0]
    if projection is not None and rotary is None:
        return projection
    if projection is not None:
        attrs = {a.name: helper.get_attribute_value(a) for a in rotary.attribute}
        attrs["num_heads"] = heads  # the 3-D form needs it to find the heads in the hidden axis
        out = f"{prefix}_rotary_bsh"
        graph.add_node(helper.make_node("RotaryEmbedding", [projection, *rotary.input[1:]], [out],
                                        name=f"{prefix}_RotaryEmbedding", domain=MS_DOMAIN, **attrs))
        return out
    shape_name = f"{prefix}_bsh_shape"
    graph.add_initializer(numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), shape_name))
    graph.add_node(helper.make_node("Transpose", [bnsh], [f"{prefix}_bsnh"], name=f"{prefix}_to_bsnh", perm=[0, 2, 1, 3]))
    graph.add_node(helper.make_node("Reshape", [f"{prefix}_bsnh", shape_name], [f"{prefix}_bsh"], name=f"{prefix}_to_bsh"))
    return f"{prefix}_bsh"


def _sequence_lengths(graph: Any) -> tuple[str, str]:
    """The sequence-length inputs of GroupQueryAttention, added to ``graph`` (see sequence_length_nodes)."""
    nodes, initializers, seqlens, total = sequence_length_nodes("fuse")
    for init in initializers:
        graph.add_initializer(init)
    for node in nodes:
        graph.add_node(node)
    return seqlens, total


def sequence_length_nodes(prefix: str) -> tuple[list[onnx.NodeProto], list[TensorProto], str, str]:
    """GroupQueryAttention's seqlens_k (B,) int32 = tokens per row - 1, and total_sequence_length int32
    scalar = the mask's width (past + new), both from ``attention_mask``: the nodes, their constants, and the
    two output names."""
    one, axis = f"{prefix}_one_i64", f"{prefix}_axis_1"
    initializers = [numpy_helper.from_array(np.array(1, dtype=np.int64), one),
                    numpy_helper.from_array(np.array([1], dtype=np.int64), axis)]
    nodes = [
        helper.make_node("ReduceSum", ["attention_mask", axis], [f"{prefix}_mask_tokens"], keepdims=0),
        helper.make_node("Sub", [f"{prefix}_mask_tokens", one], [f"{prefix}_seqlens_i64"]),
        helper.make_node("Cast", [f"{prefix}_seqlens_i64"], [f"{prefix}_seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], [f"{prefix}_mask_shape"]),
        helper.make_node("Gather", [f"{prefix}_mask_shape", one], [f"{prefix}_total_i64"], axis=0),
        helper.make_node("Cast", [f"{prefix}_total_i64"], [f"{prefix}_total_sequence_length"], to=TensorProto.INT32),
    ]
    for node in nodes:
        node.name = node.output[0] + "_node"
    return nodes, initializers, f"{prefix}_seqlens_k", f"{prefix}_total_sequence_length"


def attention_shape(config: Any) -> AttentionShape:
    """Head counts and each layer's local window of a transformers config (llmopt.architectures reads them)."""
    from llmopt.architectures import attention_windows, kv_heads

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return AttentionShape(heads, kv_heads(config), head_dim, tuple(attention_windows(config)),
                          getattr(config, "max_position_embeddings", None))


__all__ = ["FUSED_OPS", "AttentionShape", "FuseStats", "attention_shape", "fuse_file", "fuse_graph", "rewrite_file",
           "sequence_length_nodes"]
