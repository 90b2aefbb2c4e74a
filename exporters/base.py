"""The exporter interface and what an export returns."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from llmopt.model import ArchInfo
from llmopt.recipe import ExportConfig
from llmopt.state import ModelState

WEIGHT_SUFFIXES = (".onnx", ".onnx.data", ".data", ".safetensors")


@dataclass
class ExportResult:
    folder: Path
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def weights_bytes(self) -> int:
        return weight_bytes(self.folder)


def weight_bytes(folder: Path) -> int:
    """Bytes of the weight/graph files in an artifact folder (tokenizer and configs excluded)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


class Exporter:
    format: ClassVar[str]
    runtime: ClassVar[str]

    def __init__(self, config: ExportConfig) -> None:
        self.config = config

    def check(self, arch: ArchInfo, config: Any = None, passes: Sequence[Any] = ()) -> None:
        """Raise RecipeError at plan time when this format cannot hold the planned model (`config`: the model's
        transformers config, `passes`: the recipe's planned passes, where known)."""

    def export(self, state: ModelState, folder: Path,
               progress: Callable[[int, int], None] | None = None) -> ExportResult:
        """Write the artifact of `state` into `folder`; `progress(done, total)`: blocks written, where the format
        writes block by block."""
        raise NotImplementedError
