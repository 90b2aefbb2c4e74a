"""Before any weight is read: will this run fit in this machine's memory and disk? Refuse early if not."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmopt.errors import ResourceError

SKIP_ENV = "LLMOPT_SKIP_PREFLIGHT"


@dataclass(frozen=True)
class Estimate:
    parameters: int
    memory_bytes: int  # peak resident memory of the run
    available_memory_bytes: int
    output_disk_bytes: int  # next to the output: the artifact being written and the resume checkpoints
    temp_disk_bytes: int  # the baseline export in the temp folder
    free_output_bytes: int
    free_temp_bytes: int
    same_disk: bool  # output and temp folder on one file system: the two disk needs add up
    evaluates: bool = True  # evaluation on: turning it off is advice worth giving
    has_teacher: bool = False

    @property
    def disk_bytes(self) -> int:
        return self.output_disk_bytes + self.temp_disk_bytes

    @property
    def fits_memory(self) -> bool:
        return self.memory_bytes <= self.available_memory_bytes

    @property
    def fits_disk(self) -> bool:
        if self.same_disk:
            return self.disk_bytes <= self.free_output_bytes
        return self.output_disk_bytes <= self.free_output_bytes and self.temp_disk_bytes <= self.free_temp_bytes


def parameter_count(source: Any) -> int:
    from llmopt.inspect import tensor_headers

    total = 0
    for _, shape, _, _ in tensor_headers(source):
        count = 1
        for d in shape:
            count *= d
        total += count
    return total


def estimate(plan: Any, output: Path) -> Estimate:
    """Float32 copies in memory at once (working model, teacher, baseline and artifact side by side when
    evaluating), and float32-sized files on disk: the baseline export (kept for comparison) in the temp
    folder; beside the output the artifact (at most that size) and the resume checkpoint of the last pass
    (core/resume.py; two for a moment while the next one replaces it)."""
    import psutil

    from llmopt.inspect import estimate_memory_bytes

    parameters = parameter_count(plan.source)
    has_teacher = any(p.needs_teacher for p in plan.passes)
    memory = estimate_memory_bytes(parameters, needs_teacher=has_teacher, evaluate=plan.recipe.evaluation.enabled)
    existing = Path(output).resolve().parent
    while not existing.exists():
        existing = existing.parent
    temp = Path(tempfile.gettempdir())
    return Estimate(parameters=parameters, memory_bytes=memory,
                    available_memory_bytes=int(psutil.virtual_memory().available),
                    output_disk_bytes=4 * parameters * (1 + min(2, len(plan.passes))),
                    temp_disk_bytes=4 * parameters, free_output_bytes=shutil.disk_usage(existing).free,
                    free_temp_bytes=shutil.disk_usage(temp).free, same_disk=os.stat(existing).st_dev == os.stat(temp).st_dev,
                    evaluates=plan.recipe.evaluation.enabled, has_teacher=has_teacher)


def _size(n: float) -> str:
    """Bytes in the unit that keeps a small model's figures readable ("0.0 GB" says nothing)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def _sentence(options: list[str]) -> str:
    text = ", ".join(options)
    return text[:1].upper() + text[1:]


def check(found: Estimate) -> None:
    """ResourceError (exit 5) naming what does not fit and what to change."""
    if os.environ.get(SKIP_ENV) == "1":
        return
    if not found.fits_memory:
        raise ResourceError(
            f"This run needs about {_size(found.memory_bytes)} of memory ({found.parameters / 1e9:.2f}B "
            f"parameters as float32, several copies at once) and {_size(found.available_memory_bytes)} is "
            "available; nothing was started.",
            _sentence(["set `evaluation.enabled: false` (saves two copies)"] * found.evaluates
                      + ["drop distillation's teacher"] * found.has_teacher
                      + ["free memory or use a bigger machine"])
            + "; a recipe of one weight-only `quantize` pass (RTN, GPTQ, AWQ) can run layer by layer "
            f"with `export.streaming: true` (memory about one layer, whatever the depth); set {SKIP_ENV}=1 to try anyway.")
    if not found.fits_disk:
        raise ResourceError(
            f"This run writes about {_size(found.disk_bytes)} (a float32 baseline export in the temp folder; "
            f"the artifact and a resume checkpoint after each pass next to --output); free: "
            f"{_size(found.free_output_bytes)} at the output, {_size(found.free_temp_bytes)} in the temp folder; "
            "nothing was started.",
            f"Free disk space, choose another --output, or point TMPDIR elsewhere; set {SKIP_ENV}=1 to try anyway.")
