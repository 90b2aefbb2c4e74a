"""Pass registry: YAML `type` -> pass class. One file per pass; the key equals the file name."""

from llmopt.passes.base import Pass, PassConfig
from llmopt.passes.quantize import QuantizePass

PASSES: dict[str, type[Pass]] = {
    "quantize": QuantizePass,
}

__all__ = ["PASSES", "Pass", "PassConfig"]
