"""The int4 ONNX decoder graph written directly, one layer at a time, for checkpoints bigger than memory.

Why by hand: optimum's exporter traces the whole torch model, so the model must fit in memory (several times
over, while tracing and saving). As onnxruntime-genai's model builder does, the graph is written here with
onnx.helper from onnxruntime's fused contrib ops, each weight appended to one external-data file as its layer
is quantized, so only one layer is ever held:

    Gather(embedding) -> per layer: SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (RMSNorm and
    the residual add), MatMulNBits q/k/v, GroupQueryAttention (do_rotary=1 with cos/sin caches, KV cache),
    MatMulNBits o, SkipSimplifiedLayerNormalization, MatMulNBits gate/up, SiLU(gate)·up, MatMulNBits down
    -> SkipSimplifiedLayerNormalization(final norm) -> MatMulNBits lm_head

The codes are the `quantize` pass's (packed as exporters/onnx_blockquant.py packs them). The inputs and outputs
are those of optimum's ORTModelForCausalLM (input_ids, attention_mask, position_ids, past_key_values.<i>.key /
.value (batch, kv_heads, past, head_dim) -> logits, present.<i>.key / .value), so the runners drive it as they
drive the exporter's graph. GroupQueryAttention takes the causal mask from the attention_mask's row sums: right
for batch 1 or right padding, as in exporters/onnx_fuse.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llmopt.errors import InputError
from llmopt.exporters.onnx_blockquant import MS_DOMAIN, matmul_nbits_parts
from llmopt.exporters.onnx_fuse import sequence_length_nodes
from llmopt.exporters.onnx_genai import RUNTIMES, write_genai_config
from llmopt.quantized import QuantizedTensor

if TYPE_CHECKING:
    from llmopt.streaming import CheckpointReader, StreamPlan

DATA_FILE = "model.onnx.data"
_ALIGN = 4096  # tensor offsets page-aligned, so onnxruntime can map them


class _ExternalData:
    """Initializers whose bytes are appended to one file as they come; the graph keeps only their locations."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        path.write_bytes(b"")

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        start = -(-self.offset // _ALIGN) * _ALIGN
        with open(self.path, "r+b") as fh:
            fh.seek(start)
            fh.write(memoryview(array).cast("B"))
        # By hand: onnx's set_external_data wants the bytes in the proto first, which is what we avoid.
        for key, value in (("location", self.path.name), ("offset", str(start)), ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        tensor.data_location = TensorProto.EXTERNAL
        self.offset = start + array.nbytes
        return tensor


class _Graph:
    def __init__(self, data: _ExternalData, accuracy_level: int) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.data, self.accuracy_level = data, accuracy_level

    def node(self, op: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "",
             **attrs: Any) -> list[str]:
        names = [f"{name}/output_{i}" for i in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op, inputs, names, name=name, domain=domain, **attrs))
        return names

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.data.add(name, array))
        return name

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def linear(self, x: str, name: str, weight: Any, bias: Any = None) -> str:
        """x @ W.T (+ b): MatMulNBits with the pass's codes, or a float MatMul for a weight kept in float."""
        if isinstance(weight, QuantizedTensor):
            arrays, attrs = matmul_nbits_parts(weight, self.accuracy_level)
            suffixes = (f".weight_Q{weight.bits}", ".weight_scales", ".weight_zero_points")
            inputs = [x, *(self.weight(name + suffix, array) for suffix, array in zip(suffixes, arrays))]
            (out,) = self.node("MatMulNBits", inputs, f"{name}/MatMulNBits", domain=MS_DOMAIN, **attrs)
        else:
            w = weight.numpy().T  # (K, N)
            (out,) = self.node("MatMul", [x, self.weight(f"{name}.weight_T", w)], f"{name}/MatMul")
        if bias is not None:
            (out,) = self.node("Add", [out, self.weight(f"{name}.bias", bias.numpy())], f"{name}/Add")
        return out


def rotary_caches(config: Any) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (max_positions, head_dim / 2) as transformers' rotary embedding computes them (rope_scaling
    types whose frequencies do not change with the sequence length)."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3", "yarn"):
        raise InputError(f"rope_scaling type '{rope_type}' changes the rotary frequencies with the sequence length, "
                         "which the streaming ONNX graph's fixed cos/sin caches cannot express.",
                         "Use export.format: safetensors for this model, or the non-streaming ONNX export.")
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")  # (head_dim / 2,)
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq.float())  # (max_positions, head_dim / 2)
    return ((angles.cos() * attention_factor).numpy().astype(np.float32),
            (angles.sin() * attention_factor).numpy().astype(np.float32))


def write_onnx(plan: StreamPlan, reader: CheckpointReader, folder: Path, *, accuracy_level: int = 0) -> dict[str, Any]:
    """Write model.onnx (+ model.onnx.data), config.json and genai_config.json into `folder`; returns export
    info."""
    import json

    from transformers import AutoConfig

    from llmopt.architectures import attention_windows

    config = AutoConfig.from_pretrained(reader.folder)
    window = min((w for w in attention_windows(config) if w is not None), default=None)
    if window is not None and window < config.max_position_embeddings:
        raise InputError(f"'{reader.folder}' uses sliding-window attention ({window} tokens), which the streaming "
                         "ONNX graph does not express.", "Use export.format: safetensors for this model.")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    eps = float(config.rms_norm_eps)
    g = _Graph(_ExternalData(folder / DATA_FILE), accuracy_level)
    cos, sin = rotary_caches(config)
    g.constant("cos_cache", cos)
    g.constant("sin_cache", sin)

    batch, seq, past, total = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, seq]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [batch, total]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, [batch, seq])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, seq, config.vocab_size])]
    for i in range(plan.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT,
                                                        [batch, kv_heads, past, head_dim]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT,
                                                         [batch, kv_heads, total, head_dim]))

    # GroupQueryAttention's view of the mask: per row, the index of its last token (int32), and the total length.
    mask_nodes, mask_constants, seqlens_k, total_len = sequence_length_nodes("attn_mask")
    g.nodes += mask_nodes
    g.initializers += mask_constants

    hidden = residual = ""
    for block in plan.blocks(reader):
        t = block.tensors
        if block.kind == "embedding":
            (hidden,) = g.node("Gather", [g.weight("model.embed_tokens.weight", t["model.embed_tokens.weight"].numpy()),
                                          "input_ids"], "/model/embed_tokens/Gather")  # (batch, seq, hidden)
            residual = hidden
            continue
        if block.kind == "layer":
            i = block.index
            p, name = f"model.layers.{i}.", f"/model/layers.{i}"
            norm1 = g.weight(p + "input_layernorm.weight", t[p + "input_layernorm.weight"].numpy())
            if i == 0:
                (x,) = g.node("SimplifiedLayerNormalization", [hidden, norm1], f"{name}/input_layernorm",
                              axis=-1, epsilon=eps, stash_type=1)
            else:  # RMSNorm of (previous layer's output + residual), and that sum as the new residual
                x, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [hidden, residual, norm1],
                                           f"{name}/input_layernorm", outputs=4, domain=MS_DOMAIN, epsilon=eps)
            q, k, v = (g.linear(x, f"{name}/attn/{c}_proj", t[f"{p}self_attn.{c}_proj.weight"],
                                t.get(f"{p}self_attn.{c}_proj.bias")) for c in "qkv")
            attn, _, _ = g.node(
                "GroupQueryAttention",
                [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total_len,
                 "cos_cache", "sin_cache", "position_ids"],
                f"{name}/attn/GroupQueryAttention", outputs=[f"{name}/attn/output", f"present.{i}.key",
                                                             f"present.{i}.value"],
                domain=MS_DOMAIN, num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0,
                scale=float(head_dim) ** -0.5)  # (batch, seq, heads * head_dim)
            o = g.linear(attn, f"{name}/attn/o_proj", t[f"{p}self_attn.o_proj.weight"], t.get(f"{p}self_attn.o_proj.bias"))
            norm2 = g.weight(p + "post_attention_layernorm.weight", t[p + "post_attention_layernorm.weight"].numpy())
            x, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [o, residual, norm2],
                                       f"{name}/post_attention_layernorm", outputs=4, domain=MS_DOMAIN, epsilon=eps)
            gate = g.linear(x, f"{name}/mlp/gate_proj", t[f"{p}mlp.gate_proj.weight"], t.get(f"{p}mlp.gate_proj.bias"))
            up = g.linear(x, f"{name}/mlp/up_proj", t[f"{p}mlp.up_proj.weight"], t.get(f"{p}mlp.up_proj.bias"))
            (sigmoid,) = g.node("Sigmoid", [gate], f"{name}/mlp/act/Sigmoid")
            (silu,) = g.node("Mul", [gate, sigmoid], f"{name}/mlp/act/Mul")
            (product,) = g.node("Mul", [silu, up], f"{name}/mlp/Mul")
            hidden = g.linear(product, f"{name}/mlp/down_proj", t[f"{p}mlp.down_proj.weight"],
                              t.get(f"{p}mlp.down_proj.bias"))
            continue
        norm = g.weight("model.norm.weight", t["model.norm.weight"].numpy())
        x, _, _, _ = g.node("SkipSimplifiedLayerNormalization", [hidden, residual, norm], "/model/norm",
                            outputs=4, domain=MS_DOMAIN, epsilon=eps)
        head = t.get("lm_head.weight")
        if head is None:  # tied and kept in float: the embedding table, read again
            head = reader.read("model.embed_tokens.weight")
        g.linear(x, "/lm_head", head)
        g.nodes[-1].output[0] = "logits"

    graph = helper.make_graph(g.nodes, "llmopt_streaming_int4", inputs, outputs, initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="llmopt", ir_version=10)
    onnx.save_model(model, str(folder / "model.onnx"))  # the initializers only point into model.onnx.data
    data = dict(plan.config)
    data["use_cache"] = True
    (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_genai_config(folder, data)  # every layer is GroupQueryAttention
    counts: dict[str, int] = {}
    for node in g.nodes:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {"streaming": True, "matmul_nbits": counts.get("MatMulNBits", 0),
            "group_query_attention": counts.get("GroupQueryAttention", 0), "external_data": DATA_FILE,
            "runtimes": list(RUNTIMES)}
