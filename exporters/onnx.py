"""ONNX: the fused decoder written directly from the family's description (exporters/onnx_writer.py) wherever it
applies; otherwise (fp16, or a fuse pass with a fusion turned off) optimum's exporter (KV cache), then the pass's
own quantized weights as MatMulNBits, then the requested graph rewrites."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from llmopt.errors import RecipeError
from llmopt.exporters.base import Exporter, ExportResult
from llmopt.model import ArchInfo
from llmopt.state import ModelState

TASK = "text-generation-with-past"
# The fuse pass's switches the direct writer needs on: it writes every one of these fused, none unfused.
FUSIONS = ("attention", "rotary", "norms", "activations")


class OnnxExporter(Exporter):
    format = "onnx"
    runtime = "onnxruntime"

    def check(self, arch: ArchInfo, config: Any = None, passes: Sequence[Any] = ()) -> None:
        from llmopt.architectures import require
        from llmopt.devices import require_onnxruntime

        # The graph is written from the family's description (GQA Falcon or Phi-2 crashed inside optimum's
        # export): undescribed families are refused here, at plan time.
        require(arch.model_type, "the ONNX exporter", "export.format")
        require_onnxruntime("export.format: onnx (validating and measuring the artifact)")
        if not self.needs_optimum(config, passes):
            return
        import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the configs with TasksManager)
        from optimum.exporters.tasks import TasksManager

        supported = TasksManager.get_supported_model_type_for_task(TASK, exporter="onnx")
        if arch.model_type.replace("_", "-") not in supported and arch.model_type not in supported:
            raise RecipeError(
                f"export.format: this export goes through optimum's ONNX exporter (fp16, a fusion turned off, or "
                f"a config the direct writer cannot express), which does not support model_type "
                f"'{arch.model_type}' for text generation with KV cache.",
                "Use `export: {format: safetensors}` for this model, or drop the half pass / the fuse switch.",
            )

    @staticmethod
    def needs_optimum(config: Any, passes: Sequence[Any]) -> bool:
        """Whether the export will take optimum's path (see `_direct`), judged at plan time: a half pass, a fuse
        pass with a fusion turned off, or a config the direct writer cannot express (unknown: assume so)."""
        from llmopt.exporters.onnx_writer import writer_problem

        if config is None or writer_problem(config) is not None:
            return True
        for p in passes:
            settings = getattr(p, "config", None)
            if getattr(settings, "type", None) == "half":
                return True
            if getattr(settings, "type", None) == "fuse" and not all(getattr(settings, k) for k in FUSIONS):
                return True
        return False

    def export(self, state: ModelState, folder: Path) -> ExportResult:
        if self._direct(state):
            return self._write_direct(state, folder)
        from optimum.exporters.onnx import onnx_export_from_model

        # Validation against PyTorch is ours (after the MatMulNBits rewrite), so optimum's is skipped.
        from llmopt.quantized import float_activations

        with float_activations(), _quiet_tracing():  # W8A8: the float graph is traced, then its MatMuls rewritten
            onnx_export_from_model(state.model, output=folder, task=TASK, do_validation=False)
        state.tokenizer.save_pretrained(folder)
        from llmopt.devices import resolve_provider

        info: dict = {"task": TASK, "execution_provider": resolve_provider(self.config.execution_provider)}
        notes: list[str] = []
        if state.graph_fusions is not None:
            # Before MatMulNBits/GatherBlockQuantized: onnxruntime's fusions need its shape inference, which
            # does not know GatherBlockQuantized. The fusions keep every MatMul weight, so those are still found.
            notes += self._fuse(state, folder, info)
        if state.quantized:
            from llmopt.exporters.onnx_blockquant import apply_block_quantization

            external = {"auto": None, "always": True, "never": False}[self.config.external_data]
            stats = apply_block_quantization(
                folder / "model.onnx", state.quantized.values(),
                accuracy_level=self.config.accuracy_level, external_data=external,
            )
            info.update(matmul_nbits=stats.matmul_nbits, gather_block_quantized=stats.gather_block_quantized,
                        dynamic_quantize_matmul=stats.dynamic_quantize_matmul)
            if stats.unmatched:
                notes.append(f"{len(stats.unmatched)} quantized tensors were not found in the graph and stay float: "
                             + ", ".join(stats.unmatched[:5]))
            for name, reason in stats.skipped:
                notes.append(f"{name} kept in float in the ONNX graph: {reason}")
        if state.graph_fusions and state.graph_fusions.get("pack_projections"):
            notes += self._pack(folder, info)
        if state.precision is not None:  # last: the rewrites above find weights by their float32 values
            from llmopt.exporters.onnx_fp16 import convert_to_fp16

            external = {"auto": None, "always": True, "never": False}[self.config.external_data]
            stats = convert_to_fp16(folder / "model.onnx", state.precision["keep_fp32"], external)
            info.update(dtype="float16", fp32_nodes=stats["fp32_nodes"])
            notes.append(f"fp16 graph: {stats['fp32_nodes']} of {stats['nodes']} nodes kept in fp32 (normalisations, "
                         "softmax, overflowing modules); inputs and outputs stay float32.")
        if info.get("fused_ops", {}).get("GroupQueryAttention") == state.model.config.num_hidden_layers:
            notes.append(self._genai_or_why_not(state, folder, info))
        return ExportResult(folder, notes, info)

    @staticmethod
    def _direct(state: ModelState) -> bool:
        """Whether the direct writer writes this export (every ONNX export it can express): no fusion turned off
        by a fuse pass (it writes nothing unfused), a float32 graph, a family it knows."""
        from llmopt.exporters.onnx_writer import experts_problem, writer_problem

        fusions = state.graph_fusions or {}
        switched_off = [k for k in FUSIONS if not fusions.get(k, True)]
        return (not switched_off and state.precision is None and writer_problem(state.model.config) is None
                and experts_problem(state.quantized) is None)

    def _write_direct(self, state: ModelState, folder: Path) -> ExportResult:
        from llmopt.devices import resolve_provider
        from llmopt.exporters.onnx_writer import model_blocks, write_decoder

        config = state.model.config
        inline = {"auto": None, "always": False, "never": True}[self.config.external_data]
        pack = bool((state.graph_fusions or {}).get("pack_projections", True))
        info: dict = {"task": TASK, "execution_provider": resolve_provider(self.config.execution_provider)}
        info.update(write_decoder(state.model, model_blocks(state.model, state.quantized), folder,
                                  accuracy_level=self.config.accuracy_level, pack=pack, inline=inline))
        config.use_cache = True
        config.save_pretrained(folder)
        generation = getattr(state.model, "generation_config", None)
        try:
            if generation is not None:
                generation.validate(strict=True)
                generation.save_pretrained(folder)
        except ValueError:  # sampling settings without do_sample: the pipeline copies the checkpoint's own file
            pass
        state.tokenizer.save_pretrained(folder)
        notes = ["GroupQueryAttention derives the causal mask from attention_mask's row sums: batches must be "
                 "right-padded (or batch 1), not left-padded."]
        reason = info.pop("float_embedding_reason", None)
        if reason is not None:
            notes.append(f"model.embed_tokens.weight kept in float in the ONNX graph: {reason}")
        if not pack:
            notes.append("pack_projections: false — q/k/v and gate/up written as separate matmuls.")
        elif not state.quantized:
            notes.append("gate/up kept as two matmuls: in a float graph the Split costs more than the second call.")
        notes.append(self._genai_or_why_not(state, folder, info))
        return ExportResult(folder, notes, info)

    def _genai_or_why_not(self, state: ModelState, folder: Path, info: dict) -> str:
        from llmopt.architectures import attention_windows

        if any(attention_windows(state.model.config)):
            # Measured (tests/test_architectures.py): onnxruntime's GroupQueryAttention with local_window_size
            # decodes wrongly when past and present share one buffer (greedy agreement with PyTorch 50-94%
            # after the window), and onnxruntime-genai runs genai_config graphs that way.
            return ("no genai_config.json: this model has sliding-window layers, which onnxruntime's "
                    "GroupQueryAttention decodes correctly only with a growing KV cache (ORTModelForCausalLM), "
                    "not with onnxruntime-genai's shared buffer.")
        return self._genai_config(state, folder, info)

    def _genai_config(self, state: ModelState, folder: Path, info: dict) -> str:
        """Every layer's cache goes through GroupQueryAttention: onnxruntime-genai can drive the graph too."""
        from llmopt.exporters.onnx_genai import GENAI_CONFIG, RUNTIMES, write_genai_config

        write_genai_config(folder, state.model.config.to_dict(), provider=info["execution_provider"])
        info["runtimes"] = list(RUNTIMES)
        return (f"{GENAI_CONFIG} written: onnxruntime-genai runs this graph with one KV buffer per layer updated in "
                "place; ORTModelForCausalLM runs it with its growing cache.")

    def _fuse(self, state: ModelState, folder: Path, info: dict) -> list[str]:
        from llmopt.exporters.onnx_fuse import attention_shape, fuse_file

        external = {"auto": None, "always": True, "never": False}[self.config.external_data]
        switches = {k: v for k, v in state.graph_fusions.items() if k != "pack_projections"}
        stats = fuse_file(folder / "model.onnx", attention_shape(state.model.config), external_data=external,
                          **switches)
        info["fused_ops"] = stats.counts
        info["graph_nodes"] = {"before_fusion": stats.nodes_before, "after_fusion": stats.nodes_after}
        notes = list(stats.unfused)
        if stats.counts.get("GroupQueryAttention"):
            notes.append("GroupQueryAttention derives the causal mask from attention_mask's row sums: batches must "
                         "be right-padded (or batch 1), not left-padded.")
        return notes

    def _pack(self, folder: Path, info: dict) -> list[str]:
        """After MatMulNBits: packing concatenates the stored integers of sibling projections.

        Gate/up are packed only where they are MatMulNBits. A packed gate/up needs a Split after it. On the CPU,
        in a float graph the Split costs more than the second matmul call it saves (fp32 decode 0.993x against
        gate and up apart), and with MatMulNBits the saved call is worth more (int4 decode 1.04x). Measured
        with benchmarks/fusion.py; the builder's graphs keep gate and up apart in both. Q/K/V are always packed: that
        moves the rotary embedding inside GroupQueryAttention."""
        from functools import partial

        from llmopt.exporters.onnx_fuse import rewrite_file
        from llmopt.exporters.onnx_pack import pack_graph

        external = {"auto": None, "always": True, "never": False}[self.config.external_data]
        quantized_mlp = bool(info.get("matmul_nbits"))
        stats = rewrite_file(folder / "model.onnx", partial(pack_graph, gate_up=quantized_mlp), external)
        info["packed_projections"] = {"qkv": stats.qkv, "gate_up": stats.gate_up}
        info["fused_ops"] = stats.counts  # rotary now inside GroupQueryAttention where Q/K/V were packed
        info["graph_nodes"]["after_packing"] = stats.nodes_after
        notes = list(stats.unpacked)
        if not quantized_mlp:
            notes.append("gate/up kept as two matmuls: in a float graph the Split after a packed one costs more "
                         "than the second call.")
        return notes


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """The tracer's generic warnings (Python booleans taken from tensors, aten::index with negative indices)
    silenced while exporting: they ask the user to check the traced graph, and every artifact's logits are
    checked against the model afterwards (`export.validate`). Other warnings still show."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        yield
