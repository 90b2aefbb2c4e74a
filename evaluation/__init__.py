"""Evaluation: text, runners (torch / onnxruntime), quality and speed metrics, the report, compare."""
