"""The small interface every pass implements: a typed config, a plan-time check, and run()."""

from __future__ import annotations

from typing import ClassVar, Sequence

from pydantic import BaseModel, ConfigDict

from llmopt.model import ArchInfo
from llmopt.state import ModelState, PassContext


class PassConfig(BaseModel):
    # allow_inf_nan=False: a NaN or infinite setting would pass validation and then fail (or silently do
    # nothing) in every run.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Pass:
    """A pass takes a ModelState and returns one; the pipeline owns order, timing, data and the report."""

    type: ClassVar[str]
    Config: ClassVar[type[PassConfig]]
    needs_calibration: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = False  # the pipeline then keeps a copy of the input model

    def __init__(self, config: PassConfig) -> None:
        self.config = config

    def check(self, arch: ArchInfo, where: str) -> ArchInfo:
        """Raise RecipeError if the pass cannot run on `arch`; return the architecture after the pass.

        Called at plan time, before any weight is read. `where` is the key path for messages.
        """
        return arch

    def check_order(self, earlier: Sequence[PassConfig], where: str) -> None:
        """Raise RecipeError at plan time if this pass cannot follow `earlier`, the recipe's passes before it."""

    def check_export(self, export_format: str, where: str) -> None:
        """Raise RecipeError at plan time if this pass's result cannot be stored in `export_format`."""

    def run(self, state: ModelState, ctx: PassContext) -> ModelState:
        raise NotImplementedError


def refuse_after_quantize(kind: str, earlier: Sequence[PassConfig], where: str) -> None:
    """For passes that rewrite weights: after quantize, the integer codes the exporters store would no longer
    match them."""
    from llmopt.errors import RecipeError

    quantized_at = next((j for j, c in enumerate(earlier) if c.type == "quantize"), None)
    if quantized_at is not None:
        raise RecipeError(
            f"{where}.type: '{kind}' cannot run after quantize (passes[{quantized_at}]): it would change weights "
            "whose integer codes are already chosen, and the artifact would store the stale codes.",
            f"Move quantize after {kind} (distill may follow quantize: it trains only the float weights).")
