"""Store a quantization pass's own integers in an exported ONNX graph (MatMulNBits / GatherBlockQuantized).

Why hand-written: onnxruntime's ``MatMulNBitsQuantizer`` takes float weights and quantizes them
itself. Run on our export (whose weights are already the pass's *dequantized* values) it would pick
its own scales and codes, so the artifact would no longer be the model that was evaluated. Here the
codes, scales and zero points come from the pass unchanged; only their byte layout is ONNX Runtime's.

Weights are found by content, not by name: the exporter names MatMul weights ``onnx::MatMul_NNN``.
A linear weight W (out, in) appears as a MatMul B initializer equal to W.T (in, out); the token
embedding appears as the data input of a Gather. Both are float32 copies of ``dequantized()``, so a
byte hash finds them exactly.

Layouts (onnxruntime contrib ops, com.microsoft, as its own quantizer writes them):

* MatMulNBits: B uint8 (N, k_blocks, block_size * bits / 8), codes of one output column packed along
  K, low nibble first for 4 bits; scales (N, k_blocks); zero_points uint8 packed the same way per row,
  (N, ceil(k_blocks * bits / 8)); without zero_points ORT uses 2**(bits - 1) (8 or 128).
* GatherBlockQuantized with uint8 data: data (rows, cols * bits / 8) packed along the last axis,
  gather_axis 0, quantize_axis last; scales (rows, blocks); zero_points uint8 (rows,
  ceil(blocks * bits / 8)); default zero point 2**(bits - 1) as for MatMulNBits.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llmopt.quantized import QuantizedTensor

MS_DOMAIN = "com.microsoft"
# Protobuf cannot serialize a single message over 2 GiB; stay clear of it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@dataclass
class BlockQuantStats:
    matmul_nbits: int = 0  # MatMul nodes replaced by MatMulNBits
    dynamic_quantize_matmul: int = 0  # MatMul nodes replaced by DynamicQuantizeMatMul (W8A8)
    gather_block_quantized: int = 0  # Gather nodes replaced
    unmatched: list[str] = field(default_factory=list)  # tensors whose values are in no MatMul/Gather weight
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (tensor name, why it stays float)
    shared_bytes: int = 0  # bytes of quantized tensors stored once for two readers (tied embedding / lm_head)
    bytes_before: int = 0  # initializer bytes before the rewrite
    bytes_after: int = 0


def apply_block_quantization(
    model_path: Path,
    tensors: Iterable[QuantizedTensor],
    *,
    accuracy_level: int = 0,
    output_path: Path | None = None,
    external_data: bool | None = None,
) -> BlockQuantStats:
    """Replace the float MatMul/Gather weights equal to ``t.dequantized()`` by the pass's integers.

    ``output_path`` defaults to ``model_path`` (rewritten in place). ``external_data``: True stores
    all weights in ``<file name>.data``, False in the .onnx file, None picks by size.
    """
    model_path = Path(model_path)
    output_path = Path(output_path) if output_path is not None else model_path
    model = onnx.load(str(model_path), load_external_data=False)
    old_locations = {
        entry.value
        for init in _all_initializers(model.graph)
        if init.data_location == TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    }
    if old_locations:
        onnx.load_external_data_for_model(model, str(model_path.parent))

    graph = model.graph
    stats = BlockQuantStats(bytes_before=_initializer_bytes(graph))
    rewriter = _Rewriter(graph, accuracy_level)
    tensors = list(tensors)
    stored: set[str] = set()
    reasons: dict[str, str] = {}  # why a found tensor stays float
    # The tensor's own op first; then the other one (e.g. tied lm_head/embedding given only once).
    for cross in (False, True):
        for t in tensors:
            op = "MatMul" if (t.kind == "linear") != cross else "Gather"
            outcome = rewriter.replace(t, op)
            if outcome == "ok":
                stored.add(t.name)
            elif outcome is not None:
                reasons.setdefault(t.name, outcome.removeprefix("skip:"))
    stats.skipped = [(t.name, reasons[t.name]) for t in tensors if t.name in reasons and t.name not in stored]
    stats.unmatched = [t.name for t in tensors if t.name not in stored and t.name not in reasons]
    stats.matmul_nbits = rewriter.counts["MatMul"]
    stats.dynamic_quantize_matmul = rewriter.counts["W8A8"]
    stats.gather_block_quantized = rewriter.counts["Gather"]
    rewriter.finish()
    stats.shared_bytes = rewriter.share_identical()
    if not any(op.domain == MS_DOMAIN for op in model.opset_import) and rewriter.changed:
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))

    stats.bytes_after = _initializer_bytes(graph)
    use_external = stats.bytes_after > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    in_place = output_path.resolve() == model_path.resolve()
    stale = {model_path.parent / loc for loc in old_locations} if in_place else set()
    _save(model, output_path, use_external, stale)
    return stats


class _Rewriter:
    """Indexes MatMul/Gather float weights by content and swaps in the quantized ops."""

    def __init__(self, graph: onnx.GraphProto, accuracy_level: int) -> None:
        self.graph = graph
        self.accuracy_level = accuracy_level
        self.inits = {init.name: init for init in graph.initializer}
        self.names = set(self.inits) | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
        # Where a weight is read: "MatMul" (B is the initializer), "MatMulT" (B = Transpose(initializer):
        # optimum dedups a tied lm_head that way) and "Gather" (data is the initializer): weight -> node idx.
        self.consumers: dict[str, dict[str, list[int]]] = {"MatMul": {}, "MatMulT": {}, "Gather": {}}
        transposed = {n.output[0]: n.input[0] for n in graph.node
                      if n.op_type == "Transpose" and n.domain in ("", "ai.onnx") and n.input[0] in self.inits
                      and [list(a.ints) for a in n.attribute if a.name == "perm"] in ([], [[1, 0]])}
        for idx, node in enumerate(graph.node):
            if node.domain not in ("", "ai.onnx") or len(node.input) != 2:
                continue
            if node.op_type == "MatMul" and node.input[1] in self.inits:
                self.consumers["MatMul"].setdefault(node.input[1], []).append(idx)
            elif node.op_type == "MatMul" and node.input[1] in transposed:
                self.consumers["MatMulT"].setdefault(transposed[node.input[1]], []).append(idx)
            elif node.op_type == "Gather" and node.input[0] in self.inits and _gather_axis(node) == 0:
                self.consumers["Gather"].setdefault(node.input[0], []).append(idx)
        # One hash per float32 2-D weight, computed once: op -> (shape, sha256) -> initializer name.
        self.index: dict[str, dict[tuple, str]] = {}
        for op, by_weight in self.consumers.items():
            self.index[op] = {}
            for name in by_weight:
                init = self.inits[name]
                if init.data_type == TensorProto.FLOAT and len(init.dims) == 2:
                    self.index[op][_content_key(numpy_helper.to_array(init))] = name
        self.replaced: dict[tuple[str, str], str] = {}  # (op, float initializer) -> tensor that replaced it
        self.counts = {"MatMul": 0, "Gather": 0, "W8A8": 0}
        self.added: list[str] = []  # initializers this rewrite created
        self.changed = False

    def replace(self, t: QuantizedTensor, op: str) -> str | None:
        """None when ``t``'s values feed no ``op``; "skip:<reason>" when they stay float; else "ok"."""
        deq = t.dequantized()  # (rows, cols) float32
        wanted = [("MatMul", deq.T), ("MatMulT", deq)] if op == "MatMul" else [("Gather", deq)]
        found = [(kind, name) for kind, values in wanted if (name := self.index[kind].get(_content_key(values)))]
        if not found:
            return None
        fresh = [key for key in found if key not in self.replaced]
        if not fresh:
            return f"skip:same values as {self.replaced[found[0]]}, which is already stored in its place"
        if t.activations == "int8":
            return self._replace_w8a8(t, fresh) if op == "MatMul" else "skip:W8A8 applies to MatMul weights only"
        zero_points = _packed_zero_points(t)  # None -> ORT's default 2**(bits-1)
        problem = _layout_problem(t)
        if problem is None and op == "Gather":
            problem = _gather_problem(t.bits, t.group_size, zero_points is not None)
        if problem:
            return f"skip:{problem}"
        if op == "MatMul":
            (data, *_), matmul_attrs = matmul_nbits_parts(t, self.accuracy_level)
        else:
            data = _pack(t.codes, t.bits)  # (vocab, hidden * bits / 8)
        base = t.name + (f"_Q{t.bits}" if op == "MatMul" else f"_GBQ{t.bits}")
        inputs = [self._add(base, data), self._add(base + "_scales", t.scales)]  # scales (rows, blocks)
        if zero_points is not None:
            inputs.append(self._add(base + "_zero_points", zero_points))
        for key in fresh:
            for idx in self.consumers[key[0]][key[1]]:
                node = self.graph.node[idx]
                if op == "MatMul":
                    new = helper.make_node("MatMulNBits", [node.input[0], *inputs], list(node.output),
                                           name=node.name and node.name + "_MatMulNBits", domain=MS_DOMAIN,
                                           **matmul_attrs)
                else:
                    attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": t.group_size, "bits": t.bits}
                    new = helper.make_node("GatherBlockQuantized", [inputs[0], node.input[1], *inputs[1:]],
                                           list(node.output), name=node.name and node.name + "_GatherBlockQuantized",
                                           domain=MS_DOMAIN, **attrs)
                node.CopyFrom(new)
                self.counts[op] += 1
            self.replaced[key] = t.name
        self.changed = True
        return "ok"

    def _replace_w8a8(self, t: QuantizedTensor, fresh: list[tuple[str, str]]) -> str:
        """MatMul -> DynamicQuantizeMatMul: the input quantized to uint8 per call, the pass's 8-bit codes per column.

        The codes go in as uint8 with their zero point (128 when symmetric) rather than as int8: on x86 CPUs
        without VNNI, MLAS's u8s8 kernel sums pairs of products in int16 and saturates for full-range int8
        weights (what onnxruntime's `reduce_range` works around by dropping a bit), while u8u8 is exact.
        """
        cols = t.shape[1]  # K
        if t.bits != 8 or t.group_size != cols:
            return f"skip:W8A8 needs 8-bit codes with one group per row (got {t.bits} bits, group_size {t.group_size})"
        base = t.name + "_W8A8"
        inputs = [self._add(base, np.ascontiguousarray(t.codes.T)),  # (K, N) uint8
                  self._add(base + "_scale", np.ascontiguousarray(t.scales[:, 0])),  # (N,)
                  self._add(base + "_zero_point", np.ascontiguousarray(t.zero_points[:, 0]))]  # (N,) uint8
        for key in fresh:
            for idx in self.consumers[key[0]][key[1]]:
                node = self.graph.node[idx]
                node.CopyFrom(helper.make_node("DynamicQuantizeMatMul", [node.input[0], *inputs], list(node.output),
                                               name=node.name and node.name + "_DynamicQuantizeMatMul",
                                               domain=MS_DOMAIN))
                self.counts["W8A8"] += 1
            self.replaced[key] = t.name
        self.changed = True
        return "ok"

    def _add(self, name: str, array: np.ndarray) -> str:
        unique, i = name, 1
        while unique in self.names:
            unique, i = f"{name}_{i}", i + 1
        self.names.add(unique)
        self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), unique))
        self.added.append(unique)
        return unique

    def share_identical(self) -> int:
        """Store each of our quantized tensors once: a later copy with the same bytes is read from the first.

        A tied embedding and lm_head quantized alike give the same codes, scales and zero points twice, as
        GatherBlockQuantized data (vocab, hidden * bits / 8) and as MatMulNBits B (vocab, blocks, blob): the
        same bytes in another shape. The copy becomes a Reshape of the first (onnxruntime folds it at load),
        as onnxruntime-genai's builder shares its embedding table. Returns the bytes saved.
        """
        inits = {init.name: init for init in self.graph.initializer}
        first: dict[tuple, str] = {}
        alias: dict[str, str] = {}  # duplicate name -> name of the tensor kept
        for name in self.added:
            init = inits[name]
            key = (init.data_type, hashlib.sha256(init.raw_data).hexdigest()) if init.raw_data else None
            if key is None or key not in first:
                if key is not None:
                    first[key] = name
                continue
            alias[name] = first[key]
        saved = 0
        reshapes = []
        for name, kept in alias.items():
            duplicate = inits[name]
            saved += len(duplicate.raw_data)
            if list(duplicate.dims) == list(inits[kept].dims):
                for node in self.graph.node:
                    node.input[:] = [kept if i == name else i for i in node.input]
            else:
                shape = self._add(name + "_shape", np.asarray(duplicate.dims, dtype=np.int64))
                reshapes.append(helper.make_node("Reshape", [kept, shape], [name], name=name + "_Reshape"))
        if alias:
            kept_inits = [i for i in self.graph.initializer if i.name not in alias]
            del self.graph.initializer[:]
            self.graph.initializer.extend(kept_inits)
            # Before their readers: ONNX graphs list nodes in topological order.
            nodes = reshapes + list(self.graph.node)
            del self.graph.node[:]
            self.graph.node.extend(nodes)
        return saved

    def finish(self) -> None:
        """Drop replaced float weights (and their Transposes) that nothing reads anymore."""
        weights = {name for _, name in self.replaced}
        outputs = {o.name for o in self.graph.output}
        read = {name for node in self.graph.node for name in node.input}
        unused_transposes = {n.output[0] for n in self.graph.node if n.op_type == "Transpose"
                             and n.input[0] in weights and n.output[0] not in read | outputs}
        if unused_transposes:
            nodes = [n for n in self.graph.node if not (n.op_type == "Transpose" and n.output[0] in unused_transposes)]
            del self.graph.node[:]
            self.graph.node.extend(nodes)
        dead = weights - outputs - _node_inputs(self.graph)  # subgraphs included
        for field_name, drop in (("initializer", dead), ("input", dead), ("value_info", dead | unused_transposes)):
            values = getattr(self.graph, field_name)  # old IR versions list initializers as inputs too
            kept = [v for v in values if v.name not in drop]
            if len(kept) != len(values):
                del values[:]
                values.extend(kept)


def _layout_problem(t: QuantizedTensor) -> str | None:
    g = t.group_size
    if t.bits not in (4, 8):
        return f"{t.bits}-bit codes are not supported (4 or 8)"
    if g < 16 or g & (g - 1):
        return f"group_size {g} is not a power of two >= 16, as MatMulNBits/GatherBlockQuantized require"
    if t.shape[1] % g:
        return f"group_size {g} does not divide the last dimension {t.shape[1]}"
    return None


@functools.lru_cache(maxsize=None)
def _gather_problem(bits: int, block_size: int, with_zero_points: bool) -> str | None:
    """Run a small GatherBlockQuantized (uint8 data) on the CPU EP and compare it to numpy; None if right."""
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        return "onnxruntime is not installed, GatherBlockQuantized could not be checked"
    rng = np.random.default_rng(0)
    rows, cols = 4, 2 * block_size
    zeros = rng.integers(0, 2**bits, (rows, 2), dtype=np.uint8) if with_zero_points else None
    probe = QuantizedTensor(
        name="probe", kind="embedding", bits=bits, group_size=block_size, symmetric=zeros is None,
        codes=rng.integers(0, 2**bits, (rows, cols), dtype=np.uint8),
        scales=rng.uniform(0.5, 1.5, (rows, 2)).astype(np.float32),
        zero_points=zeros if zeros is not None else np.full((rows, 2), 2 ** (bits - 1), np.uint8),
    )
    inits = [numpy_helper.from_array(_pack(probe.codes, bits), "data"), numpy_helper.from_array(probe.scales, "scales")]
    if zeros is not None:
        inits.append(numpy_helper.from_array(_pack(zeros, bits), "zero_points"))
    node = helper.make_node("GatherBlockQuantized", ["data", "indices", *(i.name for i in inits[1:])], ["out"],
                            domain=MS_DOMAIN, gather_axis=0, quantize_axis=1, block_size=block_size, bits=bits)
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("indices", TensorProto.INT64, [1, 3])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = 8
    indices = np.array([[2, 0, 3]], dtype=np.int64)  # (1, 3)
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {"indices": indices})
    except Exception as exc:  # noqa: BLE001 - any failure means "keep the float Gather"
        return f"GatherBlockQuantized (bits={bits}, block_size={block_size}) does not run here: {exc}"[:300]
    if out.shape != (1, 3, cols) or not np.allclose(out[0], probe.dequantized()[[2, 0, 3]], rtol=1e-6, atol=1e-6):
        return f"GatherBlockQuantized (bits={bits}, block_size={block_size}) gives wrong values on this onnxruntime"
    return None


def matmul_nbits_parts(t: QuantizedTensor, accuracy_level: int = 0) -> tuple[list[np.ndarray], dict[str, int]]:
    """MatMulNBits' stored inputs for ``t`` — B (N, k_blocks, blob), scales (N, k_blocks) and, unless ORT's
    default 2**(bits-1) applies, packed zero points — and its attributes."""
    rows, cols = t.shape  # (N, K): output, input features
    blob = t.group_size * t.bits // 8
    arrays = [_pack(t.codes, t.bits).reshape(rows, cols // t.group_size, blob), t.scales]
    zero_points = _packed_zero_points(t)
    if zero_points is not None:
        arrays.append(zero_points)
    attrs = {"K": cols, "N": rows, "bits": t.bits, "block_size": t.group_size}
    if accuracy_level:  # as ORT's own quantizer: only when set, some EPs reject the attribute
        attrs["accuracy_level"] = accuracy_level
    return arrays, attrs


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """(rows, cols) codes < 2**bits -> uint8 (rows, ceil(cols * bits / 8)); 4 bits: low nibble first."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes
    if codes.shape[1] % 2:  # odd count (zero points of an odd number of blocks): pad the last high nibble
        codes = np.pad(codes, ((0, 0), (0, 1)))
    return (codes[:, 0::2] & 0x0F) | ((codes[:, 1::2] & 0x0F) << 4)  # (rows, cols / 2)


def _packed_zero_points(t: QuantizedTensor) -> np.ndarray | None:
    """Packed zero points, or None when all equal ORT's default 2**(bits-1) (input then omitted)."""
    if np.all(t.zero_points == 2 ** (t.bits - 1)):
        return None
    return _pack(t.zero_points, t.bits)  # (rows, ceil(blocks * bits / 8))


def _content_key(array: np.ndarray) -> tuple:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return array.shape, hashlib.sha256(memoryview(array).cast("B")).hexdigest()


def _gather_axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def _subgraphs(graph: onnx.GraphProto) -> Iterable[onnx.GraphProto]:
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield attr.g
            elif attr.type == onnx.AttributeProto.GRAPHS:
                yield from attr.graphs


def _node_inputs(graph: onnx.GraphProto) -> set[str]:
    names = {name for node in graph.node for name in node.input}
    for sub in _subgraphs(graph):
        names |= _node_inputs(sub)
    return names


def _all_initializers(graph: onnx.GraphProto) -> Iterable[TensorProto]:
    yield from graph.initializer
    for sub in _subgraphs(graph):
        yield from _all_initializers(sub)


def _initializer_bytes(graph: onnx.GraphProto) -> int:
    total = 0
    for init in _all_initializers(graph):
        if init.data_type == TensorProto.STRING:
            total += sum(len(s) for s in init.string_data)
            continue
        count = int(np.prod(init.dims, dtype=np.int64))
        if init.data_type in (TensorProto.INT4, TensorProto.UINT4):
            total += (count + 1) // 2
        else:
            total += count * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return total


def _save(model: onnx.ModelProto, output_path: Path, external: bool, stale: set[Path]) -> None:
    """Write into a private temp folder beside the target, then move into place (no half-written files)."""
    output_path.parent.mkdir(parents=True, exist_ok=True)
    data_name = output_path.name + ".data"
    tmp = Path(tempfile.mkdtemp(prefix=".blockquant-", dir=output_path.parent))
    try:
        tmp_model = tmp / output_path.name
        if external:
            onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=0)
            os.replace(tmp / data_name, output_path.parent / data_name)
        else:
            onnx.save_model(model, str(tmp_model))
        os.replace(tmp_model, output_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # External data files the old model used and the new one does not (e.g. optimum's model.onnx_data).
    if not external:
        stale = stale | {output_path.parent / data_name}
    written = (output_path.parent / data_name).resolve() if external else None
    for path in stale:
        if path.resolve() != written:
            path.unlink(missing_ok=True)
