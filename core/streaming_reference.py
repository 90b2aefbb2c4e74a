"""The model a stream writes, run on the artifact check's sequences and the evaluation's windows while it is
written, so that a streamed artifact is checked and evaluated as the in-memory pipeline checks and evaluates its
artifacts: against the model it holds, and against the checkpoint it came from.

Each block the writer receives (the embedding, one decoder layer, the final norm and lm_head) takes the sequences'
hidden states one step further, with the weights the artifact stores (codes dequantized) in the module tree of
`empty_model`, and is freed with the block. Memory: one Linear in float32 at a time and the sequences' hidden
states; the model is never whole. The same walk with the checkpoint's float weights gives the baseline's logits
on the evaluation windows. The logits come out when the last block has passed; StreamCheck then scores the
quality and loads the artifact and compares it with them, as the pipeline compares its artifacts with the
in-memory model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmopt.quantized import QuantizedTensor

if TYPE_CHECKING:
    import torch

    from llmopt.recipe import OnnxValidation
    from llmopt.checkpoint_reader import CheckpointReader
    from llmopt.blocks import Block


def _float(tensor: Any) -> torch.Tensor:
    import torch

    return torch.from_numpy(tensor.dequantized()) if isinstance(tensor, QuantizedTensor) else tensor


def _load_layer(layer: Any, prefix: str, tensors: dict[str, Any]) -> list[Any]:
    """Give a decoder layer the block's tensors: float ones as they are, each quantized Linear (or one left on
    disk) its float weight made just before it runs and dropped after, so the trace holds one Linear in float32
    at a time beside the block's codes, not the whole layer (0.8 GB for a 7B layer, next to the calibration's own
    peak). Returns the hooks to remove."""
    import torch

    local = {name.removeprefix(prefix): t for name, t in tensors.items()}
    expected = set(layer.state_dict())
    if set(local) != expected:  # a bug, not input: the writer gets the same names
        differ = sorted(set(local) ^ expected)[:4]
        raise RuntimeError(f"{prefix}: the block's tensors differ from the layer's: {differ}")
    lazy = {name: t for name, t in local.items() if isinstance(t, (QuantizedTensor, _OnDisk))}
    layer.load_state_dict({n: t for n, t in local.items() if n not in lazy}, strict=False, assign=True)
    handles = []
    for name, weight in lazy.items():
        module = layer.get_submodule(name.removesuffix(".weight"))

        def materialize(module: Any, args: Any, weight: Any = weight) -> None:
            module.weight = torch.nn.Parameter(torch.from_numpy(weight.dequantized()), requires_grad=False)

        def release(module: Any, args: Any, output: Any) -> None:
            module.weight = torch.nn.Parameter(module.weight.to("meta"), requires_grad=False)

        handles += [module.register_forward_pre_hook(materialize), module.register_forward_hook(release)]
    return handles


QUERY_CHUNK = 256  # queries per attention call in a trace


def _chunked(implementation: str) -> Any:
    """The model's own attention function (`implementation`: eager, with the family's soft-capping and scaling,
    or sdpa), QUERY_CHUNK queries at a time.

    Why: the artifact check's long sequence must outrun every attention window (4096 + 16 tokens for Mistral or
    Gemma 2), and attention under a mask holds the (heads, T, T) scores, several times over: at 7B shapes 10.4 GB
    for Gemma 2's eager attention and 6.6 GB for Mistral's masked sdpa, where the rest of a streamed layer takes
    3. Each chunk gets its rows of the mask, which keep the causal and window structure, so the outputs are the
    same rows of the whole call's. Without a mask (plain causal sdpa) the kernel holds no scores: one call."""
    import sys

    import torch

    def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
        if implementation == "eager":
            function = sys.modules[type(module).__module__].eager_attention_forward
        else:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            function = ALL_ATTENTION_FUNCTIONS[implementation]
        length = query.shape[2]  # (B, heads, T, head_dim)
        if length <= QUERY_CHUNK or attention_mask is None:
            return function(module, query, key, value, attention_mask, **kwargs)
        outputs = [function(module, query[:, :, start:start + QUERY_CHUNK], key, value,
                            attention_mask[:, :, start:start + QUERY_CHUNK], **kwargs)[0]  # (B, chunk, heads, dim)
                   for start in range(0, length, QUERY_CHUNK)]
        return torch.cat(outputs, dim=1), None

    return attention


def _bounded_attention(model: Any) -> None:
    """The model's attention (eager or sdpa) in query chunks, with that implementation's own masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    implementation = model.config._attn_implementation
    masks = {"eager": eager_mask, "sdpa": sdpa_mask}
    if implementation not in masks:
        return
    name = f"llmopt_chunked_{implementation}"
    AttentionInterface.register(name, _chunked(implementation))
    AttentionMaskInterface.register(name, masks[implementation])
    model.config._attn_implementation = name


class LayerTrace:
    """`sequences` (token id arrays) taken through the blocks `see` is handed, in order: with the weights the
    artifact stores (`weights="stored"`, codes dequantized), or with the checkpoint's own float weights
    (`weights="checkpoint"`, the baseline a streamed run is evaluated against; each Linear read from disk just
    before it runs). After the final block, `logits(i)` gives sequence i's (T, V) float32 logits."""

    def __init__(self, reader: CheckpointReader, sequences: list[np.ndarray] | None = None, *,
                 weights: str = "stored") -> None:
        from llmopt.streaming_calibrated import empty_model

        self.reader, self.weights = reader, weights
        self.model = empty_model(reader.folder)  # the module tree on the meta device, rotary buffers real
        _bounded_attention(self.model)
        self.sequences = sequences or []
        self.inputs: Any = None  # llmopt.passes.layerwise.LayerInputs between blocks
        self.final: list[torch.Tensor] | None = None  # per sequence (1, T, H), normed, after the final block

    def see(self, block: Block) -> None:
        import torch

        from llmopt.passes.layerwise import capture_layer_inputs, run_layer

        model = self.model
        with torch.no_grad():
            if block.kind == "embedding":  # the stream writes the table as the checkpoint has it
                table = _float(block.tensors["model.embed_tokens.weight"])
                model.model.embed_tokens.weight = torch.nn.Parameter(table, requires_grad=False)
                self.inputs = capture_layer_inputs(model, [np.asarray(s) for s in self.sequences])
                model.model.embed_tokens.to("meta")
            elif block.kind == "layer":
                layer = model.model.layers[block.index]
                handles = _load_layer(layer, f"model.layers.{block.index}.", self._weights(block.tensors))
                try:
                    self.inputs = run_layer(layer, block.index, self.inputs)
                finally:
                    for handle in handles:
                        handle.remove()
                layer.to("meta")
            else:
                self._final(block.tensors)

    def _weights(self, tensors: dict[str, Any]) -> dict[str, Any]:
        if self.weights == "stored":
            return tensors
        # The baseline: every matrix (the layer's Linears, whatever the family names them) read again when its
        # module runs, one at a time as the stored ones are dequantized; norms and biases at once.
        return {name: _OnDisk(self.reader, name) if len(self.reader.entries[name].shape) == 2
                else self.reader.read(name) for name in tensors}

    def _final(self, tensors: dict[str, Any]) -> None:
        """The final norm applied; lm_head (the embedding table when tied and not written apart) kept for
        `logits`."""
        import torch

        model = self.model
        if self.weights == "stored":
            tensors = {name: _float(t) for name, t in tensors.items()}
        else:  # the checkpoint's own: its lm_head, or the embedding table it ties to (the stream may untie it)
            tensors = {name: self.reader.read(name) for name in tensors if name in self.reader.entries}
        head = tensors.pop("lm_head.weight", None)
        if head is None:
            head = self.reader.read("model.embed_tokens.weight")
        model.load_state_dict(tensors, strict=False, assign=True)
        model.lm_head.weight = torch.nn.Parameter(head, requires_grad=False)
        self.final = [model.model.norm(hidden) for hidden in self.inputs.hidden]
        self.inputs = None

    def logits(self, index: int) -> np.ndarray:
        """Sequence `index`'s logits (T, V), with the family's logit scale and soft-cap as the writer's graph
        applies them."""
        import torch

        from llmopt.architectures import scalings

        final = scalings(self.model.config).final_logits
        with torch.no_grad():
            return final(self.model.lm_head(self.final[index])[0].float()).numpy()  # (T, V)

    def release(self) -> None:
        self.model.to("meta")
        self.final = None


class _OnDisk:
    """A float weight left in the checkpoint until its Linear runs (LayerTrace's baseline)."""

    def __init__(self, reader: CheckpointReader, name: str) -> None:
        self.reader, self.name = reader, name

    def dequantized(self) -> np.ndarray:
        return self.reader.read(self.name).numpy()


PREFILL_SCORES_BYTES = 256 * 2**20  # one layer's attention scores in the check's prefill, at most


class StreamCheck:
    """What the pipeline measures on an artifact, for one that is streamed: the artifact check's sequences and
    the evaluation's windows taken through the stored weights as the blocks are written, the windows also
    through the checkpoint's float weights (the baseline); then the quality figures from the two, and the
    artifact loaded by its runtime and compared with the stored weights' logits."""

    def __init__(self, reader: CheckpointReader, export_format: str, limits: OnnxValidation,
                 windows: list[np.ndarray] | None = None, tokenizer: Any = None) -> None:
        from llmopt.architectures import attention_windows
        from llmopt.evaluation.validate import DECODE_TOKENS, long_sequence_length, validation_sequences

        self.export_format, self.limits, self.notes = export_format, limits, []
        if tokenizer is None:
            self.notes.append("validation: the checkpoint has no tokenizer, so the check ran on random token ids.")
        self.windows = windows or []
        self.stored = LayerTrace(reader)
        config = self.stored.model.config
        long_tokens = long_sequence_length(attention_windows(config), getattr(config, "max_position_embeddings", None))
        self.sequences = validation_sequences(tokenizer, limits, long_tokens, vocab_size=config.vocab_size)
        self.stored.sequences = self.sequences + self.windows
        self.baseline = LayerTrace(reader, self.windows, weights="checkpoint") if self.windows else None
        # Loading a safetensors artifact back dequantizes it whole (transformers): only when that fits.
        self.float_bytes = 4 * sum(math.prod(e.shape) for e in reader.entries.values())
        # The long sequence's prefill holds one layer's attention scores, heads x queries x keys in float32, and
        # onnxruntime's scratch grew with the layers (+3.4 GB for one 32-head layer at 4080 tokens, +5.9 GB for
        # three): past PREFILL_SCORES_BYTES it goes in as chunks through the KV cache (PlainOnnxLoop.prefill_chunk).
        length = len(self.sequences[-1])
        per_query = 4 * config.num_attention_heads * length
        self.prefill_chunk = None
        if export_format == "onnx" and per_query * length > PREFILL_SCORES_BYTES:
            self.prefill_chunk = max(64, PREFILL_SCORES_BYTES // per_query // 64 * 64)
            self.notes.append(
                f"validation: the {length - DECODE_TOKENS:,}-token sequence was prefilled {self.prefill_chunk} "
                f"tokens at a time through the KV cache (at once, its attention scores would take "
                f"{per_query * length / 1e9:.1f} GB per layer); onnxruntime computes the same logits either way.")
        scores = per_query * (self.prefill_chunk or length)  # one layer's
        self.scratch_bytes = scores * (1 + config.num_hidden_layers)  # above both measurements

    @property
    def traces(self) -> tuple[LayerTrace, ...]:
        """What sees every block as it is written (StreamPlan.observers)."""
        return (self.stored,) if self.baseline is None else (self.stored, self.baseline)

    def quality(self, progress: Any = None) -> Any:
        """The evaluation windows' perplexity, KL and top-1 (llmopt.evaluation.quality.QualityScores): the
        checkpoint's float weights against the weights the artifact stores, both in PyTorch."""
        from llmopt.evaluation.quality import quality_scores

        first = len(self.sequences)
        pairs = ((self.baseline.logits(i), self.stored.logits(first + i), ids) for i, ids in enumerate(self.windows))
        scores = quality_scores(pairs, len(self.windows), progress)
        self.baseline.release()
        self.baseline = None
        return scores

    def run(self, folder: Path) -> tuple[Any, list[str]]:
        """The validation record (ResultValidationError when it fails) and notes for the report."""
        import gc

        import psutil

        from llmopt.evaluation.runners import load_runner
        from llmopt.evaluation.validate import runtime_failures, validate_artifact, validation_failure
        from llmopt.exporters.base import weight_bytes

        logits = [self.stored.logits(i) for i in range(len(self.sequences))]
        self.stored.release()  # the trace's head and hidden states are no longer needed
        gc.collect()
        _return_freed_memory()
        # The runtime holds the artifact whole: onnxruntime the int4 weights, transformers the float32 model it
        # dequantizes a safetensors artifact to; and the long sequence's prefill, whose scratch grows with the
        # layers (+3.4 GB for one layer, +5.9 GB for three, at 4080 tokens and 32 heads: counted as one layer's
        # scores per layer). Only when that fits; the report says when it did not.
        needed = (weight_bytes(folder) if self.export_format == "onnx" else self.float_bytes) + self.scratch_bytes
        if needed > 0.7 * psutil.virtual_memory().available:
            return None, self.notes + [
                f"validation: not run; {'onnxruntime' if self.export_format == 'onnx' else 'transformers'} would "
                f"hold {needed / 1e9:.1f} GB to load the artifact, more than this machine has free."]
        with runtime_failures():
            runner = load_runner(folder, self.export_format, memory_arena=False, prefill_chunk=self.prefill_chunk)
            record = validate_artifact(logits, runner, self.sequences, self.limits)
        gc.collect()  # the runtime's session
        if not record.passed:
            raise validation_failure(record, self.limits)
        return record, self.notes


def _return_freed_memory() -> None:
    """Hand the layers' freed memory back to the system before the runtime loads the artifact: glibc keeps freed
    blocks in its arenas, so the process would otherwise peak at what streaming held plus what the runtime
    holds."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc only
        libc.malloc_trim(0)
