"""ONNX: the fused decoder written directly from the family's description (exporters/onnx_writer.py), in fp32
or fp16, with the quantize pass's codes as they are. What the writer cannot express is refused at plan time: there
is no second, traced path (optimum's exporter pinned transformers below 5 and took minutes to trace and rewrite
what the writer writes in seconds)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llmopt.errors import RecipeError
from llmopt.exporters.base import Exporter, ExportResult
from llmopt.model import ArchInfo
from llmopt.state import ModelState

TASK = "text-generation-with-past"


class OnnxExporter(Exporter):
    format = "onnx"
    runtime = "onnxruntime"

    def check(self, arch: ArchInfo, config: Any = None, passes: Sequence[Any] = ()) -> None:
        from llmopt.architectures import require
        from llmopt.devices import require_onnxruntime
        from llmopt.exporters.onnx_writer import writer_problem

        # The graph is written from the family's description (GQA Falcon or Phi-2 crashed inside optimum's
        # export): undescribed families are refused here, at plan time.
        description = require(arch.model_type, "the ONNX exporter", "export.format")
        require_onnxruntime("export.format: onnx (validating and measuring the artifact)")
        problem = writer_problem(config) if config is not None else None
        if problem is not None:
            raise RecipeError(f"export.format: onnx cannot write this model: {problem}.",
                              "Use `export: {format: safetensors}` for this model.")
        if description.moe:
            for p in passes:
                problem = experts_plan_problem(getattr(p, "config", None))
                if problem is not None:
                    raise RecipeError(f"export.format: onnx stores each layer's experts as one onnxruntime QMoE, "
                                      f"and {problem}.",
                                      "Quantize the experts weight-only with one `bits` for all (no "
                                      "target_bits_per_weight, no int8 activations), or export safetensors.")

    def export(self, state: ModelState, folder: Path,
               progress: Callable[[int, int], None] | None = None) -> ExportResult:
        from llmopt.exporters.onnx_writer import experts_problem

        problem = experts_problem(state.quantized, state.model)
        if problem is not None:  # an exclude pattern that kept some experts float: only known after the pass
            raise RecipeError(f"export.format: onnx stores each layer's experts as one onnxruntime QMoE, and {problem}.",
                              "Exclude all of a layer's experts or none, or export safetensors.")
        return self._write(state, folder, progress)

    def _write(self, state: ModelState, folder: Path, progress: Callable[[int, int], None] | None) -> ExportResult:
        from llmopt.devices import resolve_provider
        from llmopt.exporters.onnx_writer import write_decoder
        from llmopt.blocks import counted, model_blocks

        config = state.model.config
        inline = {"auto": None, "always": False, "never": True}[self.config.external_data]
        pack = bool((state.graph_fusions or {}).get("pack_projections", True))
        info: dict = {"task": TASK, "execution_provider": resolve_provider(self.config.execution_provider)}
        keep_fp32 = state.precision["keep_fp32"] if state.precision else None
        blocks = model_blocks(state.model, state.quantized)
        if progress is not None:  # a 7B model's layers take seconds each: the terminal shows them go by
            blocks = counted(blocks, config.num_hidden_layers + 2, progress)
        info.update(write_decoder(state.model, blocks, folder,
                                  accuracy_level=self.config.accuracy_level, pack=pack, inline=inline,
                                  keep_fp32=keep_fp32))
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
        if keep_fp32 is not None:
            notes.append(f"fp16 graph: {info['fp32_nodes']} of {info['compute_nodes']} computing nodes kept in fp32 "
                         f"(normalisations, the residual stream, {len(keep_fp32)} kept module(s)); the KV cache is "
                         f"{info['kv_cache_dtype']}; input_ids in, float32 logits out.")
        if not pack:
            notes.append("pack_projections: false — q/k/v and gate/up written as separate matmuls.")
        elif not state.quantized:
            notes.append("gate/up kept as two matmuls: in a float graph the Split costs more than the second call.")
        notes.append(self._genai_config(state, folder, info))
        return ExportResult(folder, notes, info)

    def _genai_config(self, state: ModelState, folder: Path, info: dict) -> str:
        """Every layer's cache goes through GroupQueryAttention: onnxruntime-genai can drive the graph too, sliding
        windows included (the written graph decodes them right in a shared buffer: tests/core/test_architectures.py)."""
        from llmopt.exporters.onnx_genai import GENAI_CONFIG, RUNTIMES, write_genai_config

        write_genai_config(folder, state.model.config.to_dict(), provider=info["execution_provider"])
        info["runtimes"] = list(RUNTIMES)
        return (f"{GENAI_CONFIG} written: onnxruntime-genai runs this graph with one KV buffer per layer updated in "
                "place; ORTModelForCausalLM runs it with its growing cache.")


def experts_plan_problem(settings: Any) -> str | None:
    """What in a quantize pass's settings the experts' QMoE cannot hold (None when nothing), known at plan time."""
    if getattr(settings, "type", None) != "quantize":
        return None
    if settings.activations != "float":
        return "QMoE takes weight-only codes (activations: int8 asked)"
    if settings.target_bits_per_weight is not None:
        return "QMoE takes one bit width per layer (target_bits_per_weight mixes 4 and 8 bits)"
    return None
