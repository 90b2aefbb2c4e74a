"""`type: fuse` — how the ONNX exporter writes onnxruntime's fused operators (it always writes them)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from llmopt.errors import RecipeError
from llmopt.passes.base import Pass, PassConfig
from llmopt.state import ModelState, PassContext

# Switches of the graph rewrite this pass used to drive over optimum's traced graph. The writer has no unfused
# graph to fall back to, so a recipe that turns one off is refused with the reason rather than ignored.
RETIRED_SWITCHES = ("attention", "rotary", "norms", "activations")


class FuseConfig(PassConfig):
    type: Literal["fuse"] = "fuse"
    pack_projections: bool = Field(True, description="Q/K/V -> one matmul read by GroupQueryAttention (rotary inside "
                                                     "it), quantized gate/up -> one MatMulNBits and a Split (float "
                                                     "gate/up stay two matmuls: the Split costs more there); the "
                                                     "stored integers are concatenated, not re-quantized.")

    @model_validator(mode="before")
    @classmethod
    def _retired_switches(cls, data: Any) -> Any:
        if isinstance(data, dict):
            off = [k for k in RETIRED_SWITCHES if k in data and data[k] is not True]
            if off:
                raise ValueError(
                    f"{', '.join(off)}: false is no longer possible: the ONNX exporter writes every graph fused "
                    "(GroupQueryAttention with rotary inside, fused norms and activations) and has no unfused "
                    "graph to fall back to. Remove the switch; for a runtime without onnxruntime's contrib ops, "
                    "export safetensors.")
            data = {k: v for k, v in data.items() if k not in RETIRED_SWITCHES}
        return data


class FusePass(Pass):
    """Operator fusion for onnxruntime, done by the ONNX exporter.

    Nothing changes in the torch model: fusion is a property of the ONNX graph (a merged QKV projection or a fused
    attention is no Hugging Face checkpoint format). The exporter writes every ONNX graph fused, directly from the
    family's description (exporters/onnx_writer.py), with or without this pass; the pass states it in the recipe
    and chooses `pack_projections`. The fused-op counts are in the report's export section.
    """

    type = "fuse"
    Config = FuseConfig
    config: FuseConfig

    def check_export(self, export_format: str, where: str) -> None:
        if export_format != "onnx":
            raise RecipeError(
                f"{where}.type: fuse writes onnxruntime's fused operators into the exported ONNX graph and needs "
                f"export.format: onnx (got {export_format}).",
                "Use `export: {format: onnx}`, or remove the fuse pass: a safetensors checkpoint has no graph to fuse.")

    def run(self, state: ModelState, ctx: PassContext) -> ModelState:
        state.graph_fusions = {"pack_projections": self.config.pack_projections}
        state.pass_info["fuse"] = {"pack_projections": self.config.pack_projections, "applied_by": "ONNX exporter"}
        return state
