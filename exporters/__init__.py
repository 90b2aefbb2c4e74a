"""Exporters: write a ModelState as a loadable artifact folder. Keyed by `export.format`."""

from llmopt.exporters.base import ExportResult, Exporter
from llmopt.exporters.onnx import OnnxExporter
from llmopt.exporters.safetensors import SafetensorsExporter

EXPORTERS: dict[str, type[Exporter]] = {
    "onnx": OnnxExporter,
    "safetensors": SafetensorsExporter,
}

__all__ = ["EXPORTERS", "ExportResult", "Exporter"]
