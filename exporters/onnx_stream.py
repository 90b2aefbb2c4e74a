"""The int4 ONNX decoder of a streamed checkpoint: the direct writer (exporters/onnx_writer.py) fed one block at a
time by core/streaming.py, so only one layer is ever held; the same code writes the in-memory models' graphs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmopt.exporters.onnx_genai import RUNTIMES, write_genai_config

if TYPE_CHECKING:
    from llmopt.checkpoint_reader import CheckpointReader
    from llmopt.streaming import StreamPlan


def write_onnx(plan: StreamPlan, reader: CheckpointReader, folder: Path, *, accuracy_level: int = 0) -> dict[str, Any]:
    """Write model.onnx + model.onnx.data, config.json and genai_config.json into `folder`; returns the export
    facts."""
    from llmopt.exporters.onnx_writer import write_decoder
    from llmopt.streaming_calibrated import empty_model

    model = empty_model(reader.folder)  # the module tree on the meta device: the config and the rotary buffers
    # One layer at a time: the weights go to model.onnx.data as they come, never gathered in one protobuf.
    info = write_decoder(model, plan.blocks(reader), folder, accuracy_level=accuracy_level, inline=False)
    data = dict(plan.config)
    data["use_cache"] = True
    if plan.untie:
        data["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_genai_config(folder, data)
    info["runtimes"] = list(RUNTIMES)
    return {"streaming": True, **info}
