"""What flows between passes: the model, its tokenizer, and what passes recorded about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from llmopt.quantized import QuantizedTensor


@dataclass
class ModelState:
    model: Any  # transformers PreTrainedModel (torch)
    tokenizer: Any
    # Parameter name -> the integers a quantization pass chose; exporters store these, not a re-quantization.
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)
    # Facts for the report (e.g. {"quantize": {"layers": 211, "bits": 4}}), keyed by pass type.
    pass_info: dict[str, Any] = field(default_factory=dict)
    # Storage precision the exporter converts to, set by `half`: {"dtype": "float16", "keep_fp32": [module names]}.
    precision: dict[str, Any] | None = None
    # ONNX graph options the fuse pass set ({"pack_projections": True}); the ONNX exporter applies them.
    graph_fusions: dict[str, bool] | None = None

    def __post_init__(self) -> None:
        # transformers 5 keeps MoE experts as 3-D parameters; every pass and exporter sees one Linear per expert
        # projection, as on transformers 4 and in the hub's checkpoints (llmopt.experts).
        from llmopt.experts import unfuse_experts

        unfuse_experts(self.model)


@dataclass
class PassContext:
    """What the pipeline provides to a pass: seed, progress reporting, and data when the pass needs it."""

    seed: int = 0
    progress: Callable[[int, int], None] = lambda done, total: None
    # Returns a list of (seq_len,) int64 numpy arrays of token ids; supplied when the pass sets
    # needs_calibration (the algorithm never owns the data source).
    calibration: Callable[[], list[Any]] | None = None
    # Returns the model as it was before the pipeline's first pass (torch, eval mode, not to be
    # modified); supplied when the pass sets needs_teacher.
    teacher: Callable[[], Any] | None = None

    def calibration_windows(self, who: str) -> list[Any]:
        """The calibration windows, or a clear error naming the pass when none were supplied."""
        if self.calibration is None:
            from llmopt.errors import InputError

            raise InputError(f"{who} needs calibration data and none was given.",
                             "Run it through llmopt.optimize, or pass PassContext(calibration=...).")
        return self.calibration()
