"""fp16 ONNX graphs with the parts that overflow (or lose precision) kept in fp32.

The conversion itself is onnxruntime's (`onnxruntime.transformers.float16.convert_float_to_float16`);
what is ours is the choice of nodes it must leave in fp32:

* every normalisation (RMSNorm/LayerNorm: a sum of squares that leaves fp16's range long before its result
  does) and every Softmax, by op type and by the scope names the torch exporter gives nodes
  (``/model/layers.3/input_layernorm/Pow``);
* every module whose output exceeded half of fp16's range (65504) on calibration text in the fp32 model,
  measured with forward hooks — e.g. the residual stream of models with massive activations — so the
  whole module's nodes stay fp32.

Inputs and outputs (logits, KV cache) stay float32 (`keep_io_types`) so that the artifact keeps optimum's
interface; casts sit at the graph's edges.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FP16_MAX = 65504.0
OVERFLOW_MARGIN = 0.5  # an activation above half the range on calibration text may exceed it on other text
FP32_OPS = ["Softmax"]


def overflowing_modules(model: Any, windows: list[Any]) -> dict[str, float]:
    """Module name -> max |output| over `windows` for the modules whose outputs leave fp16's safe range."""
    import torch

    peaks: dict[str, float] = {}

    def hook(name: str):
        def record(module, args, output) -> None:
            tensors = [output] if torch.is_tensor(output) else [o for o in (output if isinstance(output, tuple)
                                                                                else ()) if torch.is_tensor(o)]
            for t in tensors:
                if t.is_floating_point() and t.numel():
                    peaks[name] = max(peaks.get(name, 0.0), float(t.detach().abs().max()))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules() if name]
    try:
        with torch.no_grad():
            for ids in windows:
                model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {name: peak for name, peak in peaks.items() if peak > FP16_MAX * OVERFLOW_MARGIN}


def normalization_modules(model: Any) -> list[str]:
    return [name for name, m in model.named_modules() if name and "norm" in type(m).__name__.lower()]


def scope_prefix(module_name: str) -> str:
    """The node-name prefix torch's exporter gives a module's ops: model.layers.3.mlp -> /model/layers.3/mlp/."""
    parts: list[str] = []
    for part in module_name.split("."):
        if part.isdigit() and parts:
            parts[-1] += f".{part}"
        else:
            parts.append(part)
    return "/" + "/".join(parts) + "/"


def convert_to_fp16(model_path: Path, keep_fp32_modules: list[str], external_data: bool | None) -> dict[str, Any]:
    """Rewrite model_path in place as fp16, leaving the named modules' nodes and FP32_OPS in fp32."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from llmopt.exporters.onnx_blockquant import EXTERNAL_DATA_THRESHOLD, _save

    model = onnx.load(str(model_path), load_external_data=False)  # names only
    old_files = {model_path.parent / e.value for init in model.graph.initializer
                 if init.data_location == onnx.TensorProto.EXTERNAL for e in init.external_data if e.key == "location"}
    prefixes = tuple(scope_prefix(name) for name in keep_fp32_modules)
    kept = [n.name for n in model.graph.node if n.name.startswith(prefixes)]
    del model
    # Given a path, the converter runs shape inference file-to-file (models over 2 GB too): it needs every
    # intermediate's type to place the casts between fp16 and fp32 nodes.
    converted = convert_float_to_float16(str(model_path), keep_io_types=True,
                                         op_block_list=DEFAULT_OP_BLOCK_LIST + FP32_OPS, node_block_list=kept)
    _drop_repeated_nodes(converted.graph)
    _skip_fp16_round_trips(converted.graph)
    size = converted.ByteSize()
    use_external = size > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    _save(converted, model_path, use_external, old_files)
    fp32_nodes = len(kept) + sum(1 for n in converted.graph.node if n.op_type in FP32_OPS)
    return {"fp32_nodes": fp32_nodes, "nodes": len(converted.graph.node)}


def _drop_repeated_nodes(graph: Any) -> None:
    """Remove exact copies of a node. The converter inserts one fp32 Cast per blocked consumer of a tensor,
    all with the same name and output, which onnxruntime rejects; identical nodes compute the same value."""
    seen: set[bytes] = set()
    unique = []
    for node in graph.node:
        key = node.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            unique.append(node)
    if len(unique) != len(graph.node):
        del graph.node[:]
        graph.node.extend(unique)


def _skip_fp16_round_trips(graph: Any) -> None:
    """Feed fp32 consumers of an fp32 value the value itself, not its fp32 -> fp16 -> fp32 round trip.

    Between two nodes it keeps in fp32 the converter still routes the value through fp16 (a Cast to fp16
    then back), which turns an overflowing activation into inf exactly where it was meant to be kept fp32.
    """
    import onnx

    def cast_to(node) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    producer = {out: node for node in graph.node for out in node.output}
    replace: dict[str, str] = {}
    for node in graph.node:
        if cast_to(node) == onnx.TensorProto.FLOAT:
            source = producer.get(node.input[0])
            if source is not None and cast_to(source) == onnx.TensorProto.FLOAT16:
                replace[node.output[0]] = source.input[0]
    if not replace:
        return
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in replace:
                node.input[i] = replace[name]
    graph_outputs = {o.name for o in graph.output}
    read = {name for node in graph.node for name in node.input} | graph_outputs
    kept = [n for n in graph.node if not (n.output and n.output[0] in replace and n.output[0] not in read)]
    # Casts to fp16 whose only readers were the round trips are dead now too.
    read = {name for node in kept for name in node.input} | graph_outputs
    kept = [n for n in kept if cast_to(n) != onnx.TensorProto.FLOAT16 or n.output[0] in read]
    del graph.node[:]
    graph.node.extend(kept)
