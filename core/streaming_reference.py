"""The model a stream writes, run on the artifact check's sequences while it is written, so that a streamed
artifact is checked as the in-memory pipeline checks its artifacts: against the model it holds.

Each block the writer receives (the embedding, one decoder layer, the final norm and lm_head) takes the sequences'
hidden states one step further, with the weights the artifact stores (codes dequantized) in the module tree of
`empty_model`, and is freed with the block. Memory: one Linear in float32 at a time and the sequences' hidden
states; the model is never whole. The logits come out when the last block has passed; StreamCheck then loads
the artifact and compares it with them, as the pipeline compares its artifacts with the in-memory model.
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
    from llmopt.streaming import Block, CheckpointReader


def _float(tensor: Any) -> torch.Tensor:
    import torch

    return torch.from_numpy(tensor.dequantized()) if isinstance(tensor, QuantizedTensor) else tensor


def _load_layer(layer: Any, prefix: str, tensors: dict[str, Any]) -> list[Any]:
    """Give a decoder layer the block's tensors: float ones as they are, each quantized Linear its weight
    dequantized just before it runs and dropped after, so the reference holds one Linear in float32 at a time
    beside the block's codes, not the whole layer (0.8 GB for a 7B layer, next to the calibration's own peak).
    Returns the hooks to remove."""
    import torch

    local = {name.removeprefix(prefix): t for name, t in tensors.items()}
    expected = set(layer.state_dict())
    if set(local) != expected:  # a bug, not input: the writer gets the same names
        differ = sorted(set(local) ^ expected)[:4]
        raise RuntimeError(f"{prefix}: the block's tensors differ from the layer's: {differ}")
    layer.load_state_dict({n: t for n, t in local.items() if not isinstance(t, QuantizedTensor)}, strict=False,
                          assign=True)
    handles = []
    for name, codes in local.items():
        if not isinstance(codes, QuantizedTensor):
            continue
        module = layer.get_submodule(name.removesuffix(".weight"))

        def materialize(module: Any, args: Any, codes: QuantizedTensor = codes) -> None:
            module.weight = torch.nn.Parameter(torch.from_numpy(codes.dequantized()), requires_grad=False)

        def release(module: Any, args: Any, output: Any) -> None:
            module.weight = torch.nn.Parameter(module.weight.to("meta"), requires_grad=False)

        handles += [module.register_forward_pre_hook(materialize), module.register_forward_hook(release)]
    return handles


class ReferenceTrace:
    """Logits of `sequences` (token id arrays) through the blocks `see` is handed, in order."""

    def __init__(self, reader: CheckpointReader, sequences: list[np.ndarray] | None = None) -> None:
        from llmopt.streaming_calibrated import empty_model

        self.reader = reader
        self.model = empty_model(reader.folder)  # the module tree on the meta device, rotary buffers real
        self.sequences = sequences or []
        self.inputs: Any = None  # llmopt.passes.layerwise.LayerInputs between blocks
        self.logits: list[np.ndarray] | None = None  # per sequence (T, V) float32, after the final block

    def see(self, block: Block) -> None:
        import torch

        from llmopt.passes.layerwise import capture_layer_inputs, run_layer

        model = self.model
        with torch.no_grad():
            if block.kind == "embedding":
                table = _float(block.tensors["model.embed_tokens.weight"])
                model.model.embed_tokens.weight = torch.nn.Parameter(table, requires_grad=False)
                self.inputs = capture_layer_inputs(model, [np.asarray(s) for s in self.sequences])
                model.model.embed_tokens.to("meta")
            elif block.kind == "layer":
                layer = model.model.layers[block.index]
                handles = _load_layer(layer, f"model.layers.{block.index}.", block.tensors)
                try:
                    self.inputs = run_layer(layer, block.index, self.inputs)
                finally:
                    for handle in handles:
                        handle.remove()
                layer.to("meta")
            else:
                self.logits = self._logits({name: _float(t) for name, t in block.tensors.items()})

    def _logits(self, tensors: dict[str, torch.Tensor]) -> list[np.ndarray]:
        """The final norm, lm_head (the embedding table when tied and not written apart) and the family's logit
        scale and soft-cap, as the writer's graph applies them."""
        import torch

        from llmopt.architectures import scalings

        model = self.model
        head = tensors.pop("lm_head.weight", None)
        if head is None:
            head = self.reader.read("model.embed_tokens.weight")
        model.load_state_dict(tensors, strict=False, assign=True)
        model.lm_head.weight = torch.nn.Parameter(head, requires_grad=False)
        scale = scalings(model.config)
        out = []
        for hidden in self.inputs.hidden:
            logits = model.lm_head(model.model.norm(hidden))[0].float()  # (T, V)
            logits = logits * scale.logits
            if scale.final_softcap:
                logits = torch.tanh(logits / scale.final_softcap) * scale.final_softcap
            out.append(logits.numpy())
        model.to("meta")
        return out


class StreamCheck:
    """The pipeline's artifact check for a streamed artifact: the check's sequences, their reference logits
    computed as the blocks are written (ReferenceTrace), then the artifact loaded by its runtime and compared."""

    def __init__(self, reader: CheckpointReader, export_format: str, limits: OnnxValidation) -> None:
        from llmopt.architectures import attention_windows
        from llmopt.evaluation.validate import long_sequence_length, validation_sequences
        from llmopt.streaming import checkpoint_tokenizer

        self.export_format, self.limits, self.notes = export_format, limits, []
        tokenizer = checkpoint_tokenizer(reader.folder, required=False)
        if tokenizer is None:
            self.notes.append("validation: the checkpoint has no tokenizer, so the check ran on random token ids.")
        self.reference = ReferenceTrace(reader)
        config = self.reference.model.config
        long_tokens = long_sequence_length(attention_windows(config), getattr(config, "max_position_embeddings", None))
        self.sequences = self.reference.sequences = validation_sequences(tokenizer, limits, long_tokens,
                                                                         vocab_size=config.vocab_size)
        # Loading a safetensors artifact back dequantizes it whole (transformers): only when that fits.
        self.float_bytes = 4 * sum(math.prod(e.shape) for e in reader.entries.values())

    def run(self, folder: Path) -> tuple[Any, list[str]]:
        """The validation record (ResultValidationError when it fails) and notes for the report."""
        import gc

        import psutil

        from llmopt.evaluation.runners import load_runner
        from llmopt.evaluation.validate import runtime_failures, validate_artifact, validation_failure
        from llmopt.exporters.base import weight_bytes

        logits, self.reference = self.reference.logits, None  # the trace's module tree is no longer needed
        gc.collect()
        _return_freed_memory()
        # The runtime holds the artifact whole: onnxruntime the int4 weights, transformers the float32 model it
        # dequantizes a safetensors artifact to. Only when that fits; the report says when it did not.
        needed = weight_bytes(folder) if self.export_format == "onnx" else self.float_bytes
        if needed > 0.7 * psutil.virtual_memory().available:
            return None, self.notes + [
                f"validation: not run; {'onnxruntime' if self.export_format == 'onnx' else 'transformers'} would "
                f"hold {needed / 1e9:.1f} GB to load the artifact, more than this machine has free."]
        with runtime_failures():
            record = validate_artifact(logits, load_runner(folder, self.export_format), self.sequences, self.limits)
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
