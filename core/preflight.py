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
    memory = estimate_memory_bytes(parameters, needs_teacher=any(p.needs_teacher for p in plan.passes),
                                   evaluate=plan.recipe.evaluation.enabled)
    existing = Path(output).resolve().parent
    while not existing.exists():
        existing = existing.parent
    temp = Path(tempfile.gettempdir())
    return Estimate(parameters=parameters, memory_bytes=memory,
                    available_memory_bytes=int(psutil.virtual_memory().available),
                    output_disk_bytes=4 * parameters * (1 + min(2, len(plan.passes))),
                    temp_disk_bytes=4 * parameters, free_output_bytes=shutil.disk_usage(existing).free,
                    free_temp_bytes=shutil.disk_usage(temp).free, same_disk=os.stat(existing).st_dev == os.stat(temp).st_dev)


def check(found: Estimate) -> None:
    """ResourceError (exit 5) naming what does not fit and what to change."""
    if os.environ.get(SKIP_ENV) == "1":
        return
    gb = 1e9
    if not found.fits_memory:
        raise ResourceError(
            f"This run needs about {found.memory_bytes / gb:.1f} GB of memory ({found.parameters / 1e9:.2f}B "
            f"parameters as float32, several copies at once) and {found.available_memory_bytes / gb:.1f} GB is "
            "available; nothing was started.",
            "Set `evaluation.enabled: false` (saves two copies), drop distillation's teacher, free memory or use a "
            "bigger machine; a recipe of one weight-only `quantize` pass (RTN, GPTQ, AWQ) can run layer by layer "
            f"with `export.streaming: true` (memory about one layer, whatever the depth); set {SKIP_ENV}=1 to try anyway.")
    if not found.fits_disk:
        raise ResourceError(
            f"This run writes about {found.disk_bytes / gb:.1f} GB (a float32 baseline export in the temp folder; "
            f"the artifact and a resume checkpoint after each pass next to --output); free: {found.free_output_bytes / gb:.1f} GB at the output, "
            f"{found.free_temp_bytes / gb:.1f} GB in the temp folder; nothing was started.",
            f"Free disk space, choose another --output, or point TMPDIR elsewhere; set {SKIP_ENV}=1 to try anyway.")
