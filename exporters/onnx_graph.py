"""The machinery the ONNX writer builds its graph with (exporters/onnx_writer.py holds what each family's layers
are): values and their element types, with a Cast only where a consumer needs the other type; weights appended
to one external-data file as they come; float, MatMulNBits and DynamicQuantizeMatMul matmuls over the quantize
pass's codes; and the residual stream, whose adds go into the next norm as onnxruntime fuses them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llmopt.architectures import Architecture
from llmopt.exporters.onnx_codes import MS_DOMAIN, matmul_nbits_parts
from llmopt.quantized import QuantizedTensor

_ALIGN = 4096  # tensor offsets page-aligned, so onnxruntime can map them
NUMPY_DTYPE = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
TYPE_WIDTH = {TensorProto.FLOAT: 0, TensorProto.FLOAT16: 1}


def as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x.astype(np.float32, copy=False)
    return x.detach().float().cpu().numpy()


class ExternalData:
    """Initializers whose bytes are appended to one file as they come; the graph keeps only their locations."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.handle = open(path, "wb")  # noqa: SIM115 - closed by close()

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        start = -(-self.offset // _ALIGN) * _ALIGN
        self.handle.seek(start)
        self.handle.write(memoryview(array).cast("B") if array.size else b"")
        # By hand: onnx's set_external_data wants the bytes in the proto first, which is what we avoid.
        for key, value in (("location", self.path.name), ("offset", str(start)), ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        tensor.data_location = TensorProto.EXTERNAL
        self.offset = start + array.nbytes
        return tensor

    def close(self) -> None:
        self.handle.close()


class Graph:
    """Nodes and initializers of the graph being written; names follow the module path they stand for.

    `keep_fp32` (module names, from the half pass) makes an fp16 graph: each matmul, attention and activation
    runs in fp16 unless its module or one above it is kept, while the residual stream, every normalisation and
    the logits stay fp32 (what optimum's converter kept fp32 before). Each value's element type is tracked, and a
    Cast is written only where a consumer needs the other one."""

    def __init__(self, data: ExternalData, accuracy_level: int, keep_fp32: list[str] | None = None) -> None:
        self.half = keep_fp32 is not None
        self.keep_fp32 = tuple(keep_fp32 or ())
        self.types: dict[str, int] = {}  # value -> TensorProto element type, for float values
        self.casts: dict[tuple[str, int], str] = {}
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.data, self.accuracy_level = data, accuracy_level
        self.gather_fallbacks: list[str] = []
        self.used: set[str] = set()
        self.stored = Counter()  # op -> weights it stores (a packed matmul counts each projection in it)
        self.float_table: str | None = None  # the embedding table's initializer, when stored in float
        # The embedding's GatherBlockQuantized inputs (data, scales, zero points), which a tied lm_head with the
        # same codes reads too.
        self.embedding_codes: tuple[QuantizedTensor, list[str]] | None = None

    def node(self, op: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "",
             out_type: int | None = None, **attrs: Any) -> list[str]:
        """Add a node; its outputs take `out_type`, or by default the element type of its first input."""
        base, n = name, 1
        while name in self.used:  # e.g. the residual adds of a family without pre-norms, twice in a layer
            name, n = f"{base}_{n}", n + 1
        self.used.add(name)
        names = [f"{name}/output_{i}" for i in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op, inputs, names, name=name, domain=domain, **attrs))
        for out in names:
            self.types[out] = out_type if out_type is not None else self.type_of(inputs[0] if inputs else "")
        return names

    def type_of(self, x: str) -> int:
        return self.types.get(x, TensorProto.FLOAT)

    def compute_type(self, module: str) -> int:
        """fp16 for a module's matmuls in an fp16 graph, unless it (or a module above it) is kept in fp32."""
        kept = any(module == k or module.startswith(k + ".") for k in self.keep_fp32)
        return TensorProto.FLOAT16 if self.half and not kept else TensorProto.FLOAT

    def cast(self, x: str, to: int) -> str:
        """`x` as element type `to`: itself, or one Cast shared by every consumer that needs it."""
        if self.type_of(x) == to:
            return x
        if (x, to) not in self.casts:
            suffix = "fp16" if to == TensorProto.FLOAT16 else "fp32"
            (self.casts[x, to],) = self.node("Cast", [x], f"{x}/Cast_{suffix}", out_type=to, to=to)
        return self.casts[x, to]

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.data.add(name, array))
        self.types[name] = helper.np_dtype_to_tensor_dtype(array.dtype)
        return name

    def float_weight(self, name: str, array: Any, to: int) -> str:
        """A float weight stored in the element type its matmul runs in."""
        return self.weight(name, as_numpy(array).astype(NUMPY_DTYPE[to], copy=False))

    def constant(self, name: str, array: np.ndarray) -> str:
        array = np.asarray(array)
        self.initializers.append(numpy_helper.from_array(array, name))
        self.types[name] = helper.np_dtype_to_tensor_dtype(array.dtype)
        return name

    def scale(self, x: str, factor: float, name: str, op: str = "Mul") -> str:
        factor_value = np.array(factor, NUMPY_DTYPE[self.type_of(x)])
        (out,) = self.node(op, [x, self.constant(f"{name}/factor", factor_value)], name)
        return out

    def tied_head(self, x: str, head: QuantizedTensor) -> str | None:
        """lm_head as MatMulNBits over the embedding table's own stored codes, when they are the same: the table is
        stored once, and MatMulNBits reads it through a Reshape (onnxruntime folds it at load), as
        onnxruntime-genai's builder shares its table."""
        if self.embedding_codes is None or head.activations != "float":
            return None
        table, (data, *rest) = self.embedding_codes
        if self.type_of(rest[0]) != self.compute_type("lm_head"):  # the table's scales are in the other type
            return None
        x = self.cast(x, self.type_of(rest[0]))
        same = (head.bits, head.group_size, head.shape) == (table.bits, table.group_size, table.shape) and \
            all(np.array_equal(a, b) for a, b in ((head.codes, table.codes), (head.scales, table.scales),
                                                 (head.zero_points, table.zero_points)))
        if not same:
            return None
        rows, cols = head.shape
        shape = self.constant("/lm_head/shared_table_shape",
                              np.array([rows, cols // head.group_size, head.group_size * head.bits // 8], np.int64))
        (b,) = self.node("Reshape", [data, shape], "/lm_head/shared_table")
        attrs = {"K": cols, "N": rows, "bits": head.bits, "block_size": head.group_size}
        if self.accuracy_level:
            attrs["accuracy_level"] = self.accuracy_level
        (out,) = self.node("MatMulNBits", [x, b, *rest], "/lm_head/MatMulNBits", domain=MS_DOMAIN, **attrs)
        self.stored["MatMulNBits"] += 1
        return out

    def linear(self, x: str, name: str, weight: Any, bias: Any = None, members: int = 1, module: str = "") -> str:
        """x @ W.T (+ b) with the pass's codes (MatMulNBits, or DynamicQuantizeMatMul for W8A8), or a float MatMul;
        `members`: the projections packed into `weight`; `module`: the model's module (or modules, comma
        separated, when packed) it stands for, which decides its element type in an fp16 graph."""
        dtype = min((self.compute_type(m) for m in module.split(",")), key=TYPE_WIDTH.get)  # fp32 if one is kept
        if isinstance(weight, QuantizedTensor) and weight.activations == "int8":
            dtype = TensorProto.FLOAT  # DynamicQuantizeMatMul takes float32 activations only
        x = self.cast(x, dtype)
        if isinstance(weight, QuantizedTensor) and weight.activations == "int8":
            inputs = [x, self.weight(f"{name}.weight_W8A8", np.ascontiguousarray(weight.codes.T)),  # (K, N) uint8
                      self.weight(f"{name}.weight_scale", np.ascontiguousarray(weight.scales[:, 0])),
                      self.weight(f"{name}.weight_zero_point", np.ascontiguousarray(weight.zero_points[:, 0]))]
            (out,) = self.node("DynamicQuantizeMatMul", inputs, f"{name}/DynamicQuantizeMatMul", domain=MS_DOMAIN)
            self.stored["DynamicQuantizeMatMul"] += members
        elif isinstance(weight, QuantizedTensor):
            arrays, attrs = matmul_nbits_parts(weight, self.accuracy_level)
            arrays[1] = arrays[1].astype(NUMPY_DTYPE[dtype], copy=False)  # the scales are in the activations' type
            suffixes = (f".weight_Q{weight.bits}", ".weight_scales", ".weight_zero_points")
            inputs = [x, *(self.weight(name + suffix, array) for suffix, array in zip(suffixes, arrays))]
            (out,) = self.node("MatMulNBits", inputs, f"{name}/MatMulNBits", domain=MS_DOMAIN, **attrs)
            self.stored["MatMulNBits"] += members
        elif isinstance(weight, str):  # a tied lm_head: the embedding table (vocab, hidden), transposed at load
            (table_t,) = self.node("Transpose", [self.cast(weight, dtype)], f"{name}/Transpose", perm=[1, 0])
            (out,) = self.node("MatMul", [x, table_t], f"{name}/MatMul")
        else:
            (out,) = self.node("MatMul", [x, self.float_weight(f"{name}.weight_T", as_numpy(weight).T, dtype)],
                               f"{name}/MatMul")
        if bias is not None:
            (out,) = self.node("Add", [out, self.float_weight(f"{name}.bias", bias, self.type_of(out))],
                               f"{name}/Add")
        return out


class ResidualStream:
    """The residual stream between ops: `residual` so far plus a `pending` block output not yet added, so that
    the add goes into the next norm (Skip*Normalization) as onnxruntime fuses it."""

    def __init__(self, g: Graph, arch: Architecture, eps: float) -> None:
        self.g, self.arch, self.eps = g, arch, eps
        self.residual = ""
        self.pending: str | None = None

    def norm(self, x: str, weight: Any, name: str) -> str:
        """A norm of `x` alone (q/k norms, post-norms, the residual stream of layer 0), in fp32."""
        x = self.g.cast(x, TensorProto.FLOAT)
        w = self._weight(weight, name)
        if self.arch.norm == "layernorm":
            bias = self.g.weight(f"{name}.bias", np.zeros_like(as_numpy(weight)))
            (out,) = self.g.node("LayerNormalization", [x, w, bias], f"{name}/LayerNorm", axis=-1, epsilon=self.eps)
        else:
            (out,) = self.g.node("SimplifiedLayerNormalization", [x, w], f"{name}/SimplifiedLayerNorm", axis=-1,
                                 epsilon=self.eps, stash_type=1)
        return out

    def norm_stream(self, weight: Any, name: str) -> str:
        """The norm of residual + pending, which also becomes the new residual."""
        if self.pending is None:
            return self.norm(self.residual, weight, name)
        w = self._weight(weight, name)
        pending, residual = (self.g.cast(x, TensorProto.FLOAT) for x in (self.pending, self.residual))
        if self.arch.norm == "layernorm":
            bias = self.g.weight(f"{name}.bias", np.zeros_like(as_numpy(weight)))
            out, _, _, self.residual = self.g.node("SkipLayerNormalization", [pending, residual, w, bias],
                                                   f"{name}/SkipLayerNorm", outputs=4, domain=MS_DOMAIN,
                                                   epsilon=self.eps)
        else:
            out, _, _, self.residual = self.g.node("SkipSimplifiedLayerNormalization", [pending, residual, w],
                                                   f"{name}/SkipSimplifiedLayerNorm", outputs=4, domain=MS_DOMAIN,
                                                   epsilon=self.eps)
        self.pending = None
        return out

    def stream(self, name: str) -> str:
        """residual + pending as a tensor (for a family whose blocks read the stream without a norm)."""
        if self.pending is not None:
            residual, pending = (self.g.cast(x, TensorProto.FLOAT) for x in (self.residual, self.pending))
            (self.residual,) = self.g.node("Add", [residual, pending], f"{name}/residual_add")
            self.pending = None
        return self.residual

    def add(self, x: str, name: str) -> None:
        """Queue a block's output for the residual stream."""
        if self.pending is None:
            self.pending = x
        else:
            pending, x = (self.g.cast(v, TensorProto.FLOAT) for v in (self.pending, x))
            (self.pending,) = self.g.node("Add", [pending, x], f"{name}/parallel_add")

    def _weight(self, weight: Any, name: str) -> str:
        w = as_numpy(weight)
        if self.arch.norm == "rms_one_plus":  # Gemma's x * (1 + w), folded into the stored weight
            w = w + 1.0
        return self.g.weight(f"{name}.weight", w)


# ---- sibling projections (q/k/v, gate/up) stored as one matmul ----


def packable(weights: list[Any]) -> bool:
    """Sibling projections store as one matmul when all are float, or all codes of one layout."""
    if any(w is None for w in weights):
        return False
    if all(not isinstance(w, QuantizedTensor) for w in weights):
        return True
    if not all(isinstance(w, QuantizedTensor) for w in weights):
        return False
    first = weights[0]
    return all((w.bits, w.group_size, w.activations) == (first.bits, first.group_size, first.activations)
               and w.shape[1] == first.shape[1] for w in weights)


def stacked(weights: list[Any], name: str) -> Any:
    """The stacked rows of sibling projections: their stored integers side by side, never re-quantized."""
    if not isinstance(weights[0], QuantizedTensor):
        return np.concatenate([as_numpy(w) for w in weights])
    first = weights[0]
    return QuantizedTensor(name=name, kind="linear", bits=first.bits, group_size=first.group_size,
                           symmetric=all(w.symmetric for w in weights), activations=first.activations,
                           codes=np.concatenate([w.codes for w in weights]),
                           scales=np.concatenate([w.scales for w in weights]),
                           zero_points=np.concatenate([w.zero_points for w in weights]))


def stacked_bias(biases: list[Any], sizes: list[int]) -> np.ndarray | None:
    if all(b is None for b in biases):
        return None
    return np.concatenate([as_numpy(b) if b is not None else np.zeros(n, np.float32) for b, n in zip(biases, sizes)])


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
