"""safetensors: a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads."""

from __future__ import annotations

from pathlib import Path

from llmopt.exporters.base import Exporter, ExportResult
from llmopt.state import ModelState


class SafetensorsExporter(Exporter):
    format = "safetensors"
    runtime = "pytorch"

    def export(self, state: ModelState, folder: Path) -> ExportResult:
        # save_pretrained handles tied weights and sharding, and writes config + generation config.
        state.model.save_pretrained(folder, safe_serialization=True)
        state.tokenizer.save_pretrained(folder)
        notes = []
        if state.quantized:
            notes.append(
                f"{len(state.quantized)} quantized weights are stored dequantized in float32 (a packed int format "
                "that runtimes load comes with the quantization work): the safetensors file is not smaller, the "
                "quality figures are those of the quantized model."
            )
        return ExportResult(folder, notes, {"dtype": "float32", "quantized_storage": "dequantized"})
