"""The fused ONNX decoder graph written directly from the family's description (llmopt.architectures).

Why by hand: optimum's exporter traces the torch model into a ~7,400-node graph that then has to be matched back
to onnxruntime's fused operators, its quantized weights found again by content. onnxruntime-genai's model builder
writes the fused graph directly instead, per family; so does this module, from the one description every pass
reads, with onnx.helper (one node per fused op needs nothing more):

    Gather | GatherBlockQuantized (embedding, scaled where the family scales it)
    per layer: [Skip]SimplifiedLayerNormalization or [Skip]LayerNormalization (the norm and the residual add),
               q/k/v (one packed MatMul[NBits] where nothing sits between them and the attention), q/k norms,
               GroupQueryAttention (rotary inside, each layer's window, NoPE layers, soft-capping, KV cache), o,
               post-norms, gate/up (packed when quantized, or fused in the checkpoint), activation, down
    final norm -> lm_head -> logit scaling / soft-capping

Weights come in blocks (the embedding, one decoder layer, the final norm and lm_head): from a model in memory
(llmopt.streaming.model_blocks) or streamed from a checkpoint one layer at a time (core/streaming.py), through the same code,
each appended to one external-data file as it comes so only one layer is held. A quantize pass's codes go in as
they are (MatMulNBits, GatherBlockQuantized, DynamicQuantizeMatMul), never searched for by content.

The inputs and outputs are those optimum's ORTModelForCausalLM drives (input_ids, attention_mask, position_ids,
past_key_values.<i>.key/.value (batch, kv_heads, past, head_dim) -> logits, present.<i>.key/.value).
GroupQueryAttention takes the causal mask from attention_mask's row sums: right for batch 1 or right padding.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from llmopt.architectures import (Architecture, activation, attention_windows, describe, head_dim, kv_heads,
                                  norm_eps, qk_norm, rope_types, rotary_width, routing, scalings)
from llmopt.exporters.onnx_codes import MS_DOMAIN, gather_problem, layout_problem, pack_codes, packed_zero_points
from llmopt.exporters.onnx_graph import (NUMPY_DTYPE, TYPE_WIDTH, ExternalData, Graph, ResidualStream, as_numpy,
                                         packable, sequence_length_nodes, stacked, stacked_bias)
from llmopt.exporters.onnx_rotary import Rotary, rotary_caches, rotary_tables
from llmopt.quantized import QuantizedTensor

if TYPE_CHECKING:
    from llmopt.blocks import Block

DATA_FILE = "model.onnx.data"
# Protobuf cannot serialize one message over 2 GiB: above this the weights stay in the external-data file.
INLINE_LIMIT = 1_800_000_000
# Rotary scalings whose frequencies do not change with the sequence length: one cos/sin table holds them.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
# transformers activation name -> (op, domain, attributes) of onnxruntime's fused op for it.
ACTIVATIONS = {"silu": ("QuickGelu", MS_DOMAIN, {"alpha": 1.0}), "swish": ("QuickGelu", MS_DOMAIN, {"alpha": 1.0}),
               "gelu_pytorch_tanh": ("FastGelu", MS_DOMAIN, {}), "gelu_new": ("FastGelu", MS_DOMAIN, {}),
               "gelu": ("Gelu", MS_DOMAIN, {})}


def writer_problem(config: Any) -> str | None:
    """Why the writer cannot express this model (None when it can): the exporter refuses it at plan time."""
    arch = describe(config.model_type)
    if arch is None:
        return f"model_type '{config.model_type}' has no architecture description"
    if arch.moe and not routing(config)[1]:
        return ("its router's top-k weights are not renormalized (norm_topk_prob: false), which onnxruntime's MoE "
                "op cannot express")
    if arch.moe and activation(config) != "silu":
        return f"its experts' activation '{activation(config)}' is not the SwiGLU onnxruntime's MoE op runs"
    if activation(config) not in ACTIVATIONS:
        return f"activation '{activation(config)}' has no fused onnxruntime op here"
    for rope_type in sorted(rope_types(config)):
        if rope_type not in STATIC_ROPE:
            return f"rope type '{rope_type}' changes the rotary frequencies with the sequence length"
    rotary_half = rotary_width(config) // 2
    if rotary_half % 8:  # GroupQueryAttention's rotary kernels take its tables in steps of 8 columns
        return f"the rotary tables' width {rotary_half} is not a multiple of 8, as GroupQueryAttention requires"
    if qk_norm(config) == "per_head_weights":  # Cohere's optional per-head LayerNorm of q and k
        return "Cohere's use_qk_norm is not written by the direct writer"
    if getattr(config, "mlp_bias", False) and arch.fused_gate_up:
        return "a fused gate_up projection with a bias"
    return None


def experts_problem(quantized: dict[str, QuantizedTensor], model: Any = None) -> str | None:
    """Why the experts' codes cannot go into one QMoE (or MoE) per layer (None when they can): QMoE stores every
    expert of a layer with one bit width and block size, weight-only, and MoE every one in float."""
    if model is not None:
        with_codes = {m.group(1) for m in map(_EXPERT.match, quantized) if m}
        for name, _ in model.named_parameters():
            match = _EXPERT.match(name)
            if match and match.group(1) in with_codes and name.endswith("_proj.weight") and name not in quantized:
                return f"{name} stays float while other experts of {match.group(1)} are quantized"
    layouts: dict[str, set[tuple]] = {}
    for name, t in quantized.items():
        match = _EXPERT.match(name)
        if match:
            layouts.setdefault(match.group(1), set()).add((t.bits, t.group_size, t.activations))
    for layer, found in layouts.items():
        if len(found) > 1:
            return f"the experts of {layer} are quantized with different layouts ({sorted(found)})"
        bits, group, activations = next(iter(found))
        if activations != "float" or bits not in (4, 8) or group < 16 or group & (group - 1):
            return (f"the experts of {layer} are {bits}-bit, group {group}, {activations} activations; onnxruntime's "
                    "QMoE takes 4- or 8-bit weight-only groups of a power of two >= 16")
    return None


_EXPERT = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.\d+\.")


def write_decoder(model: Any, blocks: Iterable[Block], folder: Path, *, accuracy_level: int = 0,
                  pack: bool = True, inline: bool | None = None, keep_fp32: list[str] | None = None) -> dict[str, Any]:
    """Write `folder/model.onnx` (and model.onnx.data when the weights stay external) of `model` (its config and
    rotary module; the weights may be on the meta device) from `blocks`; returns the export facts for the report.
    `pack`: q/k/v (and quantized gate/up) as one matmul each. `inline`: None puts the weights inside model.onnx
    when under protobuf's limit. `keep_fp32`: an fp16 graph, with these modules (and those inside them) in fp32;
    the KV cache is fp16 unless an attention module is kept."""
    config = model.config
    problem = writer_problem(config)
    if problem:
        raise ValueError(f"the direct ONNX writer cannot write this model: {problem}")  # callers check first
    arch = describe(config.model_type)
    assert arch is not None
    heads, kv, dim = int(config.num_attention_heads), kv_heads(config), head_dim(config)
    eps = norm_eps(config)
    windows = attention_windows(config)
    data = ExternalData(folder / DATA_FILE)
    g = Graph(data, accuracy_level, keep_fp32)
    stream = ResidualStream(g, arch, eps)
    # One element type for every layer's cache: the runtimes that drive the graph allocate it once.
    cache_type = min((g.compute_type(f"model.layers.{i}.self_attn") for i in range(config.num_hidden_layers)),
                     key=TYPE_WIDTH.get)
    rotaries = rotary_tables(g, model, arch, cache_type)

    batch, seq, past, total = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, seq]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [batch, total]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, [batch, seq])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, seq, config.vocab_size])]
    for i in range(config.num_hidden_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", cache_type,
                                                        [batch, kv, past, dim]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", cache_type,
                                                         [batch, kv, total, dim]))
            g.types[f"past_key_values.{i}.{kind}"] = cache_type
    mask_nodes, mask_constants, seqlens_k, total_len = sequence_length_nodes("attn_mask")
    g.nodes += mask_nodes
    g.initializers += mask_constants

    packed: dict[str, int] = {"qkv": 0, "gate_up": 0}
    try:
        for block in blocks:
            t = block.tensors
            if block.kind == "embedding":
                stream.residual = _embedding(g, config, t["model.embed_tokens.weight"])
            elif block.kind == "layer":
                layer = _Layer(g, config, arch, stream, block.index, t, heads, kv, dim)
                layer.attention(windows[block.index], rotaries[block.index], seqlens_k, total_len, pack, packed,
                                cache_type)
                layer.mlp(pack, packed)
            else:
                x = stream.norm_stream(t["model.norm.weight"], "/model/norm")
                head = t.get("lm_head.weight")
                if head is None:  # tied and kept in float: the lm_head reads the embedding table's own initializer
                    head = g.float_table
                    if head is None:  # the quantize pass unties a head whose table alone was quantized
                        raise ValueError("a tied lm_head needs the float embedding table")
                shared = g.tied_head(x, head) if isinstance(head, QuantizedTensor) else None
                logits = _logits(g, config, shared or g.linear(x, "/lm_head", head, module="lm_head"))
                g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/logits"))
    finally:
        data.close()

    graph = helper.make_graph(g.nodes, f"llmopt_{config.model_type}", inputs, outputs, initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="llmopt", ir_version=10)
    path = folder / "model.onnx"
    if inline is None:
        inline = data.offset < INLINE_LIMIT
    if inline:  # small enough for one file: the weights read back into the protobuf
        onnx.load_external_data_for_model(model, str(folder))
        onnx.save_model(model, str(path))
        (folder / DATA_FILE).unlink()
    else:
        onnx.save_model(model, str(path))  # the initializers only point into model.onnx.data
    counts = Counter(node.op_type for node in g.nodes)
    fused = {op: n for op, n in counts.items() if op in _FUSED}
    info: dict[str, Any] = {"writer": "direct", "fused_ops": fused, "graph_nodes": {"written": len(g.nodes)},
                            "packed_projections": packed}
    # Weights stored by each quantized op, as the quantize pass counts them (a packed q/k/v is three).
    info.update(matmul_nbits=g.stored["MatMulNBits"], gather_block_quantized=counts.get("GatherBlockQuantized", 0),
                dynamic_quantize_matmul=g.stored["DynamicQuantizeMatMul"])
    if g.stored["QMoE"]:
        info["qmoe_experts"] = g.stored["QMoE"]  # expert projections stored as codes in QMoE
    if g.half:
        computing = [n for n in g.nodes if n.op_type not in _NOT_COMPUTE and g.type_of(n.output[0]) in TYPE_WIDTH]
        info.update(dtype="float16", kv_cache_dtype=NUMPY_DTYPE[cache_type].__name__,
                    fp32_nodes=sum(g.type_of(n.output[0]) == TensorProto.FLOAT for n in computing),
                    compute_nodes=len(computing))
    if not inline:
        info["external_data"] = DATA_FILE
    if g.gather_fallbacks:
        info["float_embedding_reason"] = g.gather_fallbacks[0]
    return info


# Nodes that move or cast values rather than compute: left out of the fp32/fp16 node counts.
_NOT_COMPUTE = ("Cast", "Reshape", "Shape", "Split", "Transpose", "Identity", "Gather")
_FUSED = ("GroupQueryAttention", "MoE", "QMoE", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
          "SkipLayerNormalization", "LayerNormalization", "QuickGelu", "FastGelu", "Gelu", "MatMulNBits",
          "GatherBlockQuantized", "DynamicQuantizeMatMul")


class _Layer:
    """One decoder layer of a described family, written into the graph."""

    def __init__(self, g: Graph, config: Any, arch: Architecture, stream: ResidualStream, index: int,
                 tensors: dict[str, Any], heads: int, kv: int, head_dim: int) -> None:
        self.g, self.config, self.arch, self.stream, self.i = g, config, arch, stream, index
        self.t, self.heads, self.kv, self.head_dim = tensors, heads, kv, head_dim
        self.p, self.name = f"model.layers.{index}.", f"/model/layers.{index}"
        self.shared_input = ""  # the attention's input, which a parallel MLP reads too

    def get(self, name: str) -> Any:
        return self.t.get(self.p + name)

    def _input(self, norm: str) -> str:
        """The input of a block: its pre-norm over the stream, or the stream itself where the family has none."""
        if norm in self.arch.post_norms or self.get(norm + ".weight") is None:
            return self.stream.stream(self.name)
        return self.stream.norm_stream(self.get(norm + ".weight"), f"{self.name}/{norm}")

    def attention(self, window: int | None, rotary: Rotary | None, seqlens_k: str, total_len: str, pack: bool,
                  packed: dict[str, int], cache_type: int) -> None:
        x = self._input("input_layernorm")
        self.shared_input = x
        a, name = "self_attn.", f"{self.name}/attn"
        bias = lambda proj: self.get(f"{a}{proj}.bias")  # noqa: E731
        q_dim, kv_dim = self.heads * self.head_dim, self.kv * self.head_dim
        if self.arch.fused_qkv:
            qkv = self.g.linear(x, f"{name}/qkv_proj", self.get(a + "qkv_proj.weight"), bias("qkv_proj"),
                                module=f"{self.p}{a}qkv_proj")
            if self.arch.qk_norm == "none":
                query, key, value = qkv, "", ""
            else:
                query, key, value = self.g.node("Split", [qkv, self.g.constant(f"{name}/qkv_sizes", np.array(
                    [q_dim, kv_dim, kv_dim], np.int64))], f"{name}/qkv_split", outputs=3, axis=-1)
        else:
            weights = [self.get(f"{a}{c}_proj.weight") for c in "qkv"]
            if pack and self.arch.qk_norm == "none" and packable(weights):
                qkv = self.g.linear(x, f"{name}/qkv_proj", stacked(weights, f"{self.p}{a}qkv_proj.weight"),
                                    stacked_bias([bias(f"{c}_proj") for c in "qkv"], [q_dim, kv_dim, kv_dim]),
                                    members=3, module=",".join(f"{self.p}{a}{c}_proj" for c in "qkv"))
                query, key, value = qkv, "", ""
                packed["qkv"] += 1
            else:
                query, key, value = (self.g.linear(x, f"{name}/{c}_proj", w, bias(f"{c}_proj"),
                                                   module=f"{self.p}{a}{c}_proj") for c, w in zip("qkv", weights))
        if self.arch.qk_norm == "whole":  # OLMo 2: one norm over all heads
            query = self.stream.norm(query, self.get(a + "q_norm.weight"), f"{name}/q_norm")
            key = self.stream.norm(key, self.get(a + "k_norm.weight"), f"{name}/k_norm")
        elif self.arch.qk_norm == "per_head":
            query = self._per_head_norm(query, self.heads, "q_norm")
            key = self._per_head_norm(key, self.kv, "k_norm")
        query, key, value = (self.g.cast(v, cache_type) if v else v for v in (query, key, value))
        scale = scalings(self.config)
        attrs: dict[str, Any] = {"num_heads": self.heads, "kv_num_heads": self.kv, "scale": scale.attention}
        rotary_inputs = ["", ""]
        if rotary is not None:
            attrs.update(do_rotary=1, rotary_interleaved=int(self.arch.rotary == "interleaved"))
            rotary_inputs = [rotary.cos, rotary.sin]
        if window is not None:
            attrs["local_window_size"] = int(window)
        if scale.attention_softcap:
            attrs["softcap"] = float(scale.attention_softcap)
        attn, _, _ = self.g.node(
            "GroupQueryAttention",
            [query, key, value, f"past_key_values.{self.i}.key", f"past_key_values.{self.i}.value", seqlens_k,
             total_len, *rotary_inputs, "position_ids" if rotary is not None else ""],
            f"{name}/GroupQueryAttention", outputs=[f"{name}/output", f"present.{self.i}.key",
                                                    f"present.{self.i}.value"], domain=MS_DOMAIN, **attrs)
        out = self.g.linear(attn, f"{name}/o_proj", self.get(a + "o_proj.weight"), bias("o_proj"),
                            module=f"{self.p}{a}o_proj")
        self._finish_block(out, "post_attention_layernorm")

    def mlp(self, pack: bool, packed: dict[str, int]) -> None:
        name = f"{self.name}/mlp"
        x = self.shared_input if self.arch.parallel else self._input(
            "pre_feedforward_layernorm" if self.get("pre_feedforward_layernorm.weight") is not None
            else "post_attention_layernorm")
        bias = lambda proj: self.get(f"mlp.{proj}.bias")  # noqa: E731
        if self.get("mlp.experts.0.gate_proj.weight") is not None:
            self._finish_block(self._experts(x, name), "post_feedforward_layernorm")
            return
        if self.arch.fused_gate_up:
            both = self.g.linear(x, f"{name}/gate_up_proj", self.get("mlp.gate_up_proj.weight"),
                                 module=f"{self.p}mlp.gate_up_proj")
            gate, up = self.g.node("Split", [both], f"{name}/gate_up_split", outputs=2, axis=-1, num_outputs=2)
        else:
            weights = [self.get("mlp.gate_proj.weight"), self.get("mlp.up_proj.weight")]
            # Packed only when quantized: in a float graph the Split costs more than the second matmul it saves
            # (measured with benchmarks/fusion.py, fp32 decode 0.993x; int4 1.04x).
            if pack and isinstance(weights[0], QuantizedTensor) and packable(weights) \
                    and bias("gate_proj") is None:
                both = self.g.linear(x, f"{name}/gate_up_proj", stacked(weights, f"{self.p}mlp.gate_up_proj.weight"),
                                     members=2, module=f"{self.p}mlp.gate_proj,{self.p}mlp.up_proj")
                gate, up = self.g.node("Split", [both], f"{name}/gate_up_split", outputs=2, axis=-1, num_outputs=2)
                packed["gate_up"] += 1
            else:
                gate = self.g.linear(x, f"{name}/gate_proj", weights[0], bias("gate_proj"),
                                     module=f"{self.p}mlp.gate_proj")
                up = self.g.linear(x, f"{name}/up_proj", weights[1], bias("up_proj"), module=f"{self.p}mlp.up_proj")
        op, domain, attrs = ACTIVATIONS[activation(self.config)]
        (act,) = self.g.node(op, [gate], f"{name}/act/{op}", domain=domain, **attrs)
        (product,) = self.g.node("Mul", [act, self.g.cast(up, self.g.type_of(act))], f"{name}/Mul")
        out = self.g.linear(product, f"{name}/down_proj", self.get("mlp.down_proj.weight"), bias("down_proj"),
                            module=f"{self.p}mlp.down_proj")
        self._finish_block(out, "post_feedforward_layernorm")

    def _experts(self, x: str, name: str) -> str:
        """A sparse MLP (router + routed SwiGLU experts) as onnxruntime's MoE, or QMoE over the pass's codes.

        The router's logits go in as they are: the op takes their softmax, the top k, and renormalizes them
        (norm_topk_prob). Gate and up rows are interleaved in fc1, as the CPU kernel requires (swiglu_fusion=1);
        alpha 1, beta 0 and no limit make its SwiGLU silu(gate) * up."""
        config, g = self.config, self.g
        count = 0
        while self.get(f"mlp.experts.{count}.gate_proj.weight") is not None:
            count += 1
        parts = {p: [self.get(f"mlp.experts.{e}.{p}_proj.weight") for e in range(count)]
                 for p in ("gate", "up", "down")}
        router = g.linear(x, f"{name}/gate", self.get("mlp.gate.weight"), module=f"{self.p}mlp.gate")
        dtype = min((g.compute_type(f"{self.p}mlp.experts.{e}.{p}_proj") for e in range(count)
                     for p in ("gate", "up", "down")), key=TYPE_WIDTH.get)
        x, router = g.cast(x, dtype), g.cast(router, dtype)  # (batch, seq, hidden), (batch, seq, experts)
        (rows,) = g.node("Reshape", [x, g.constant(f"{name}/rows", np.array([-1, config.hidden_size], np.int64))],
                         f"{name}/Reshape_rows")
        (logits,) = g.node("Reshape", [router, g.constant(f"{name}/router_rows", np.array([-1, count], np.int64))],
                           f"{name}/Reshape_router")
        top_k, normalize = routing(config)
        attrs = {"k": top_k, "activation_type": "swiglu", "swiglu_fusion": 1,
                 "normalize_routing_weights": int(normalize), "activation_alpha": 1.0,
                 "activation_beta": 0.0, "swiglu_limit": float("inf")}
        interleave = lambda gate, up: np.stack([gate, up], axis=1).reshape(-1, gate.shape[-1])  # noqa: E731
        if all(isinstance(w, QuantizedTensor) for ws in parts.values() for w in ws):
            first = parts["down"][0]
            fc1 = [QuantizedTensor(name="", kind="linear", bits=gw.bits, group_size=gw.group_size, symmetric=False,
                                   codes=interleave(gw.codes, uw.codes), scales=interleave(gw.scales, uw.scales),
                                   zero_points=interleave(gw.zero_points, uw.zero_points))
                   for gw, uw in zip(parts["gate"], parts["up"])]
            stacks = []
            for which, tensors in (("fc1", fc1), ("fc2", parts["down"])):
                codes = np.stack([pack_codes(t.codes, t.bits) for t in tensors])  # (experts, out, in * bits / 8)
                scales = np.stack([t.scales for t in tensors]).astype(NUMPY_DTYPE[dtype])  # (experts, out, blocks)
                zeros = np.stack([pack_codes(t.zero_points, t.bits) for t in tensors])
                symmetric = all(np.all(t.zero_points == 2 ** (t.bits - 1)) for t in tensors)
                stacks.append((g.weight(f"{name}/experts.{which}_Q{first.bits}", codes),
                               g.weight(f"{name}/experts.{which}_scales", scales),
                               "" if symmetric else g.weight(f"{name}/experts.{which}_zero_points", zeros)))
            (w1, s1, z1), (w2, s2, z2) = stacks
            inputs = [rows, logits, w1, s1, "", w2, s2, "", "", "", "", z1, z2]
            while inputs[-1] == "":
                inputs.pop()
            (out,) = g.node("QMoE", inputs, f"{name}/QMoE", domain=MS_DOMAIN, expert_weight_bits=first.bits,
                            block_size=first.group_size, **attrs)
            g.stored["QMoE"] += 3 * count
        elif any(isinstance(w, QuantizedTensor) for ws in parts.values() for w in ws):
            raise ValueError(f"{self.name}: some experts quantized and some not")  # the exporter refuses it first
        else:
            fc1 = np.stack([interleave(as_numpy(gw), as_numpy(uw)) for gw, uw in zip(parts["gate"], parts["up"])])
            fc2 = np.stack([as_numpy(w) for w in parts["down"]])  # (experts, hidden, intermediate)
            fc1, fc2 = fc1.astype(NUMPY_DTYPE[dtype], copy=False), fc2.astype(NUMPY_DTYPE[dtype], copy=False)
            (out,) = g.node("MoE", [rows, logits, g.weight(f"{name}/experts.fc1", fc1), "",
                                    g.weight(f"{name}/experts.fc2", fc2)], f"{name}/MoE", domain=MS_DOMAIN, **attrs)
        (shape,) = g.node("Shape", [x], f"{name}/Shape")
        (out,) = g.node("Reshape", [out, shape], f"{name}/Reshape_tokens")
        return out

    def _finish_block(self, out: str, post_norm: str) -> None:
        if post_norm in self.arch.post_norms:
            out = self.stream.norm(out, self.get(post_norm + ".weight"), f"{self.name}/{post_norm}")
        multiplier = scalings(self.config).residual  # Granite
        if multiplier != 1.0:
            out = self.g.scale(out, multiplier, f"{out}/residual_multiplier")
        self.stream.add(out, self.name)

    def _per_head_norm(self, x: str, heads: int, norm: str) -> str:
        """A norm over each head's head_dim values: (batch, seq, heads * d) -> (.., heads, d) -> back."""
        name = f"{self.name}/attn/{norm}"
        split = self.g.constant(f"{name}/heads_shape", np.array([0, 0, heads, self.head_dim], np.int64))
        merged = self.g.constant(f"{name}/merged_shape", np.array([0, 0, heads * self.head_dim], np.int64))
        (per_head,) = self.g.node("Reshape", [x, split], f"{name}/Reshape_heads")
        normed = self.stream.norm(per_head, self.get(f"self_attn.{norm}.weight"), name)
        (out,) = self.g.node("Reshape", [normed, merged], f"{name}/Reshape_merged")
        return out


def _embedding(g: Graph, config: Any, table: Any) -> str:
    name = "/model/embed_tokens"
    dtype = g.compute_type("model.embed_tokens")
    problem = None
    if isinstance(table, QuantizedTensor):
        zero_points = packed_zero_points(table)
        problem = layout_problem(table) or gather_problem(table.bits, table.group_size, zero_points is not None)
        if problem is None:
            inputs = [g.weight(f"model.embed_tokens.weight_GBQ{table.bits}", pack_codes(table.codes, table.bits)),
                      "input_ids", g.weight("model.embed_tokens.weight_scales", table.scales.astype(NUMPY_DTYPE[dtype]))]
            if zero_points is not None:
                inputs.append(g.weight("model.embed_tokens.weight_zero_points", zero_points))
            g.embedding_codes = (table, [inputs[0], *inputs[2:]])
            (out,) = g.node("GatherBlockQuantized", inputs, f"{name}/GatherBlockQuantized", domain=MS_DOMAIN,
                            out_type=dtype, gather_axis=0, quantize_axis=1, block_size=table.group_size, bits=table.bits)
        else:
            g.gather_fallbacks.append(problem)
            table = table.dequantized()
    if not isinstance(table, QuantizedTensor) or problem:
        g.float_table = g.float_weight("model.embed_tokens.weight", table, dtype)
        (out,) = g.node("Gather", [g.float_table, "input_ids"], f"{name}/Gather")
    out = g.cast(out, TensorProto.FLOAT)  # the residual stream is fp32
    factor = scalings(config).embedding  # Gemma: sqrt(hidden) in float32; Granite: embedding_multiplier
    if factor != 1.0:
        out = g.scale(out, factor, f"{name}/embed_scale")
    return out


def _logits(g: Graph, config: Any, logits: str) -> str:
    logits = g.cast(logits, TensorProto.FLOAT)
    scale = scalings(config)
    if scale.logits != 1.0:  # Cohere's logit_scale, Granite's 1 / logits_scaling
        logits = g.scale(logits, scale.logits, "/lm_head/logit_scale")
    if scale.final_softcap:  # Gemma 2: cap * tanh(logits / cap)
        cap = float(scale.final_softcap)
        (tanh,) = g.node("Tanh", [g.scale(logits, cap, "/lm_head/softcap_div", op="Div")], "/lm_head/Tanh")
        logits = g.scale(tanh, cap, "/lm_head/softcap_mul")
    return logits


__all__ = ["DATA_FILE", "experts_problem", "rotary_caches", "write_decoder", "writer_problem"]
