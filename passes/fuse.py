"""`type: fuse` — the exported ONNX graph rewritten to onnxruntime's fused operators."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmopt.errors import RecipeError
from llmopt.passes.base import Pass, PassConfig
from llmopt.state import ModelState, PassContext


class FuseConfig(PassConfig):
    type: Literal["fuse"] = "fuse"
    attention: bool = Field(True, description="Attention with its KV cache -> GroupQueryAttention (the cache keeps "
                                              "optimum's layout, so ORTModelForCausalLM drives the fused model; "
                                              "with every layer fused, a genai_config.json lets onnxruntime-genai "
                                              "drive it too, updating the cache in place).")
    rotary: bool = Field(True, description="Rotary position embedding inside GroupQueryAttention (RotaryEmbedding "
                                           "in a rewritten graph).")
    norms: bool = Field(True, description="RMSNorm -> SimplifiedLayerNormalization, RMSNorm + residual -> "
                                          "SkipSimplifiedLayerNormalization (LayerNorm likewise).")
    activations: bool = Field(True, description="SiLU -> QuickGelu(alpha=1), tanh/erf GELU -> FastGelu/Gelu.")
    pack_projections: bool = Field(True, description="Q/K/V -> one matmul read by GroupQueryAttention (rotary inside "
                                                     "it), quantized gate/up -> one MatMulNBits and a Split (float "
                                                     "gate/up stay two matmuls: the Split costs more there); done "
                                                     "after the weights are stored (MatMulNBits weights are "
                                                     "concatenated, not re-quantized).")


class FusePass(Pass):
    """Operator fusion for onnxruntime, done by the ONNX exporter.

    Nothing changes in the torch model: fusion is a property of the ONNX graph (a merged QKV projection
    or a fused attention is no Hugging Face checkpoint format), so this pass records the request. The exporter
    writes every ONNX graph it can fused, directly from the family's description (exporters/onnx_writer.py),
    with or without this pass; the pass states it in the recipe, chooses `pack_projections`, and can turn a
    fusion off, which (like fp16) makes the exporter rewrite optimum's export instead. The fused-op counts are in
    the report's export section (its `writer` says which way), and what stayed unfused (with why) in its notes.
    """

    type = "fuse"
    Config = FuseConfig
    config: FuseConfig

    def check_export(self, export_format: str, where: str) -> None:
        if export_format != "onnx":
            raise RecipeError(
                f"{where}.type: fuse rewrites the exported ONNX graph to onnxruntime's fused operators and needs "
                f"export.format: onnx (got {export_format}).",
                "Use `export: {format: onnx}`, or remove the fuse pass: a safetensors checkpoint has no graph to fuse.")

    def run(self, state: ModelState, ctx: PassContext) -> ModelState:
        switches = self.config.model_dump(exclude={"type"})
        state.graph_fusions = switches
        state.pass_info["fuse"] = {"requested": [name for name, on in switches.items() if on],
                                   "applied_by": "ONNX exporter"}
        return state
