"""llmopt: make causal language models cheaper and faster to run.

    import llmopt
    result = llmopt.optimize("int4-onnx", model="demo", output="out/")
    print(result.report.optimized.perplexity)

Attributes are imported lazily so that `llmopt --help` stays fast (no torch at start-up).
"""

from __future__ import annotations

from typing import Any

__all__ = ["optimize", "validate", "bench", "load_recipe", "Recipe", "Result", "LlmoptError"]

_LAZY = {
    "optimize": "llmopt.api",
    "validate": "llmopt.api",
    "bench": "llmopt.api",
    "load_recipe": "llmopt.recipe",
    "Recipe": "llmopt.recipe",
    "Result": "llmopt.pipeline",
    "LlmoptError": "llmopt.errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmopt' has no attribute {name!r}")
