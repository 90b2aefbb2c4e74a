"""Pass registry: YAML `type` -> pass class. One file per pass; the key equals the file name."""

from llmopt.passes.base import Pass, PassConfig
from llmopt.passes.distill import DistillPass
from llmopt.passes.fuse import FusePass
from llmopt.passes.gqa import GqaPass
from llmopt.passes.half import HalfPass
from llmopt.passes.prune import PrunePass
from llmopt.passes.qad import QadPass
from llmopt.passes.quantize import QuantizePass

PASSES: dict[str, type[Pass]] = {
    "quantize": QuantizePass,
    "distill": DistillPass,
    "qad": QadPass,
    "gqa": GqaPass,
    "prune": PrunePass,
    "fuse": FusePass,
    "half": HalfPass,
}

__all__ = ["PASSES", "Pass", "PassConfig"]
