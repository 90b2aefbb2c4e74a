"""Pack sibling projections of a fused decoder graph into one matmul each, after the weights are final.

Decoding one token runs every projection as its own small matmul; packing the ones that read the same
input cuts the calls per layer from 7 to 4 (what onnxruntime-genai's builder emits for Q/K/V, plus gate/up):

* Q, K, V -> one projection read by GroupQueryAttention as packed QKV, with the rotary embedding done
  inside the attention (``do_rotary=1``): 3 matmuls and 2 RotaryEmbedding become 1 matmul per layer;
* gate, up -> one projection and a Split whose outputs keep the old names, so the MLP reads them as before.

Runs last among the graph rewrites, after MatMulNBits (``onnx_blockquant``): a packed MatMulNBits weight is
the quantize pass's own integers, scales and zero points of each projection concatenated along N (each
row of N carries its own blocks, so nothing is re-quantized); a float MatMul's weights concatenate the same
way. Written by hand: onnxruntime's transformer optimizer and onnxscript's ort_fusions pack float Q/K/V of
their own attention fusions at most, never MatMulNBits weights.

GroupQueryAttention computes rotary positions from ``seqlens_k`` (tokens so far), which equals optimum's
``position_ids`` for right-padded batches — the same condition as its causal mask (see onnx_fuse); the
``position_ids`` input stays in the interface, unread, so ORTModelForCausalLM drives the graph unchanged.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from llmopt.exporters.onnx_fuse import FUSED_OPS, MS_DOMAIN


@dataclass
class PackStats:
    qkv: int = 0  # layers whose Q, K, V became one projection read by GroupQueryAttention
    gate_up: int = 0  # MLPs whose gate and up became one projection
    unpacked: list[str] = field(default_factory=list)  # attentions left as they were, and why
    counts: dict[str, int] = field(default_factory=dict)  # fused op type -> nodes in the packed graph
    nodes_after: int = 0


@dataclass
class _Projection:
    matmul: Any  # MatMulNBits, or MatMul with an initializer weight
    bias: Any | None  # Add of a constant vector right after it (Qwen2's q/k/v bias)
    output: str  # what the rest of the graph reads: the bias's output, else the matmul's


def pack_graph(model: onnx.ModelProto, *, qkv: bool = True, gate_up: bool = True) -> PackStats:
    """Rewrite ``model`` in place (weights loaded in memory); returns what was packed."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    graph = OnnxModel(model)
    stats = PackStats()
    if qkv:
        for attention in [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]:
            why = _pack_qkv(graph, attention)
            if why is None:
                stats.qkv += 1
            else:
                stats.unpacked.append(f"{attention.name}: Q/K/V kept as separate projections: {why}")
    if gate_up:
        stats.gate_up = _pack_gate_up(graph)
    graph.prune_graph(allow_remove_graph_inputs=False)  # position_ids stays in the interface, unread
    graph.remove_unused_constant()
    graph.topological_sort()
    counts = Counter(n.op_type for n in model.graph.node)
    stats.counts = {op: counts[op] for op in FUSED_OPS if counts[op]}
    stats.nodes_after = len(model.graph.node)
    return stats


def _pack_qkv(graph: Any, attention: Any) -> str | None:
    """Q, K, V of one GroupQueryAttention -> one projection; None when done, else why not."""
    if len(attention.input) < 7 or not all(attention.input[:3]):
        return "already packed or not in the (query, key, value) form"
    producers = graph.output_name_to_node()
    rotaries = [producers.get(name) for name in attention.input[:2]]
    rotaries = [r if r is not None and r.op_type == "RotaryEmbedding" and r.domain == MS_DOMAIN else None
                for r in rotaries]
    sources = [r.input[0] if r is not None else name for r, name in zip(rotaries, attention.input[:2])]
    sources.append(attention.input[2])
    if rotaries[0] is None and rotaries[1] is None:
        rotary_inputs, rotary_attrs = [], {}
    else:
        why = _rotary_problem(graph, rotaries)
        if why:
            return why
        rotary_inputs = list(rotaries[0].input[2:4])  # cos_cache, sin_cache
        rotary_attrs = {"do_rotary": 1, "rotary_interleaved": _attrs(rotaries[0]).get("interleaved", 0)}
    projections = [_projection(graph, name) for name in sources]
    if any(p is None for p in projections):
        return "a projection is not a matmul by a stored weight"
    readers = graph.input_name_to_nodes()
    expected_readers = [rotaries[0] or attention, rotaries[1] or attention, attention]
    for p, reader in zip(projections, expected_readers):
        if [n.name for n in readers.get(p.output, [])] != [reader.name]:
            return "a projection's output is read elsewhere too"
    why = _packing_problem(graph, projections)
    if why:
        return why
    layer = attention.name.removesuffix("_GroupQueryAttention")
    packed = _pack(graph, projections, f"{layer}_qkv")
    for node in [*(p.matmul for p in projections), *(p.bias for p in projections if p.bias),
                 *(r for r in rotaries if r is not None)]:
        graph.remove_node(node)
    inputs = [packed, "", "", *attention.input[3:7], *rotary_inputs]
    attrs = {**_attrs(attention), **rotary_attrs}
    graph.remove_node(attention)
    graph.add_node(helper.make_node("GroupQueryAttention", inputs, list(attention.output), name=attention.name,
                                    domain=MS_DOMAIN, **attrs))
    return None


def _rotary_problem(graph: Any, rotaries: list) -> str | None:
    """Why GroupQueryAttention's own rotary cannot replace these two RotaryEmbedding nodes, or None."""
    if rotaries[0] is None or rotaries[1] is None:
        return "only one of Q and K is rotated"
    q, k = rotaries
    if list(q.input[1:4]) != list(k.input[1:4]):
        return "Q and K are rotated with different positions or tables"
    if q.input[1] != "position_ids" and not _positions_follow_the_cache(graph, q.input[1]):
        return "rotary positions are neither the position_ids input nor past length + arange"
    a, b = _attrs(q), _attrs(k)
    if a.get("interleaved", 0) != b.get("interleaved", 0):
        return "Q and K rotate differently"
    for attrs in (a, b):
        if attrs.get("rotary_embedding_dim", 0) or attrs.get("scale", 1.0) != 1.0 or attrs.get("is_packed_batching", 0):
            return "partial or scaled rotary embedding"
    return None


def _positions_follow_the_cache(graph: Any, name: str) -> bool:
    """``name`` is Unsqueeze(Range(past length, ..., 1)): positions counted on from the cache, as Gemma's export
    computes them (no position_ids read) and as GroupQueryAttention does."""
    producers = graph.output_name_to_node()
    unsqueeze = producers.get(name)
    arange = producers.get(unsqueeze.input[0]) if unsqueeze is not None and unsqueeze.op_type == "Unsqueeze" else None
    if arange is None or arange.op_type != "Range":
        return False
    step = graph.get_constant_value(arange.input[2])
    start = producers.get(arange.input[0])
    shape = producers.get(start.input[0]) if start is not None and start.op_type == "Gather" else None
    if shape is None or shape.op_type != "Shape" or step is None:
        return False
    index = graph.get_constant_value(start.input[1])
    past_inputs = {i.name for i in graph.model.graph.input if i.name.startswith("past_key_values.")}
    return (shape.input[0] in past_inputs and np.asarray(step).reshape(-1).tolist() == [1]
            and index is not None and np.asarray(index).reshape(-1).tolist() == [2])


def _pack_gate_up(graph: Any) -> int:
    """Pairs of projections that read the same input and are multiplied together (act(gate)·up) -> one
    projection and a Split; returns how many."""
    packed = 0
    for mul in [n for n in graph.model.graph.node if n.op_type == "Mul" and n.domain in ("", "ai.onnx")]:
        pair = next(filter(None, (_gated_pair(graph, mul, order) for order in ((0, 1), (1, 0)))), None)
        if pair is None:
            continue
        gate, activation, up = pair
        readers = graph.input_name_to_nodes()
        if [n.name for n in readers.get(gate.output, [])] != [activation.name] or \
                [n.name for n in readers.get(up.output, [])] != [mul.name]:
            continue
        prefix = (gate.matmul.name or gate.output).rsplit("/", 2)[0]
        packed_output = _pack(graph, [gate, up], f"{prefix}/gate_up")
        sizes = [_out_features(graph, p) for p in (gate, up)]
        split = _add_initializer(graph, np.array(sizes, dtype=np.int64), f"{prefix}/gate_up_split")
        for node in [gate.matmul, up.matmul, *(p.bias for p in (gate, up) if p.bias)]:
            graph.remove_node(node)
        graph.add_node(helper.make_node("Split", [packed_output, split], [gate.output, up.output],
                                        name=f"{prefix}/gate_up_Split", axis=-1))
        packed += 1
    return packed


def _gated_pair(graph: Any, mul: Any, order: tuple[int, int]) -> tuple | None:
    """(gate, activation, up) when ``mul`` is act(gate(x)) · up(x) with a one-input activation, else None."""
    activation = graph.output_name_to_node().get(mul.input[order[0]])
    up = _projection(graph, mul.input[order[1]])
    if up is None or activation is None or len(activation.input) != 1:
        return None
    gate = _projection(graph, activation.input[0])
    if gate is None or _packing_problem(graph, [gate, up]):
        return None
    return gate, activation, up


def _projection(graph: Any, name: str) -> _Projection | None:
    """The matmul (and bias) that produces ``name``, when its weight is a stored tensor we can concatenate."""
    producers = graph.output_name_to_node()
    node, bias = producers.get(name), None
    if node is not None and node.op_type == "Add" and node.domain in ("", "ai.onnx"):
        constant = [i for i in node.input if graph.get_initializer(i) is not None]
        if len(constant) != 1 or len(graph.get_initializer(constant[0]).dims) != 1:
            return None
        bias, node = node, producers.get(next(i for i in node.input if i != constant[0]))
    if node is None:
        return None
    if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
        extra = [i for i in node.input[4:] if i]  # g_idx or its own bias: not packed
        stored = all(graph.get_initializer(i) is not None for i in node.input[1:] if i)
        return _Projection(node, bias, name) if stored and not extra else None
    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
        weight = graph.get_initializer(node.input[1])
        return _Projection(node, bias, name) if weight is not None and len(weight.dims) == 2 else None
    return None


def _packing_problem(graph: Any, projections: list[_Projection]) -> str | None:
    """Why these projections cannot become one matmul, or None."""
    first = projections[0]
    if any(p.matmul.op_type != first.matmul.op_type or p.matmul.input[0] != first.matmul.input[0]
           for p in projections):
        return "the projections read different inputs or are stored differently"
    if any((p.bias is None) != (first.bias is None) for p in projections):
        return "some projections have a bias and others not"
    if first.matmul.op_type == "MatMulNBits":
        layout = [(_attrs(p.matmul) | {"N": None}, len([i for i in p.matmul.input if i]),
                   [graph.get_initializer(i).data_type for i in p.matmul.input[1:] if i]) for p in projections]
        if any(entry != layout[0] for entry in layout):
            return "the projections are quantized differently (bits, block size, zero points)"
    elif len({graph.get_initializer(p.matmul.input[1]).data_type for p in projections}) != 1:
        return "the projections' weights have different dtypes"
    return None


def _pack(graph: Any, projections: list[_Projection], name: str) -> str:
    """One matmul computing all ``projections`` side by side (outputs concatenated on the last axis)."""
    first = projections[0].matmul
    output = f"{name}_MatMul_output"
    if first.op_type == "MatMulNBits":
        inputs = [first.input[0]]
        for slot in range(1, len(first.input)):  # B, scales, zero points: rows of N, concatenated
            arrays = [numpy_helper.to_array(graph.get_initializer(p.matmul.input[slot])) for p in projections]
            inputs.append(_add_initializer(graph, np.concatenate(arrays, axis=0), f"{name}_{('B', 'scales', 'zero_points')[slot - 1]}"))
        attrs = _attrs(first) | {"N": sum(_out_features(graph, p) for p in projections)}
        graph.add_node(helper.make_node("MatMulNBits", inputs, [output], name=f"{name}_MatMulNBits",
                                        domain=MS_DOMAIN, **attrs))
    else:
        weights = [numpy_helper.to_array(graph.get_initializer(p.matmul.input[1])) for p in projections]
        weight = _add_initializer(graph, np.concatenate(weights, axis=1), f"{name}_weight")
        graph.add_node(helper.make_node("MatMul", [first.input[0], weight], [output], name=f"{name}_MatMul"))
    if projections[0].bias is None:
        return output
    biases = [numpy_helper.to_array(graph.get_initializer(next(i for i in p.bias.input
                                                                if graph.get_initializer(i) is not None)))
              for p in projections]
    bias = _add_initializer(graph, np.concatenate(biases), f"{name}_bias")
    graph.add_node(helper.make_node("Add", [output, bias], [f"{name}_output"], name=f"{name}_Add"))
    return f"{name}_output"


def _out_features(graph: Any, projection: _Projection) -> int:
    if projection.matmul.op_type == "MatMulNBits":
        return int(_attrs(projection.matmul)["N"])
    return int(graph.get_initializer(projection.matmul.input[1]).dims[1])


def _add_initializer(graph: Any, array: np.ndarray, name: str) -> str:
    graph.add_initializer(numpy_helper.from_array(np.ascontiguousarray(array), name))
    return name


def _attrs(node: Any) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


__all__ = ["PackStats", "pack_graph"]
