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
    streamed: bool = False  # export.streaming: layer by layer (estimated_peak_bytes)

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

    if plan.recipe.export.streaming:
        return _streamed(plan, output)
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


def _streamed(plan: Any, output: Path) -> Estimate:
    """A streamed run's needs: about one block's memory whatever the depth, the artifact's size on disk."""
    import psutil

    stream_plan, reader = plan.stream
    existing = Path(output).resolve().parent
    while not existing.exists():
        existing = existing.parent
    return Estimate(parameters=parameter_count(plan.source),
                    memory_bytes=estimated_peak_bytes(stream_plan, reader, plan.recipe),
                    available_memory_bytes=int(psutil.virtual_memory().available),
                    output_disk_bytes=estimated_output_bytes(stream_plan, reader), temp_disk_bytes=0,
                    free_output_bytes=shutil.disk_usage(existing).free, free_temp_bytes=0, same_disk=True,
                    evaluates=plan.recipe.evaluation.enabled, streamed=True)


# ---- a streamed run (llmopt.streaming): its StreamPlan and CheckpointReader ----


def estimated_output_bytes(plan: Any, reader: Any) -> int:
    """The artifact's weight bytes: float32 for what stays float, codes + float32 scales for the rest."""
    import math

    q = plan.quantize
    total = 0
    for name, entry in reader.entries.items():
        count = math.prod(entry.shape)
        total += count * (q.bits / 8 + 4 / q.group_size) if name in plan.quantized else count * 4
    if plan.untie:  # lm_head's codes, from the embedding table
        rows, cols = reader.entries["model.embed_tokens.weight"].shape
        total += rows * cols * (q.bits / 8 + 4 / q.group_size)
    return int(total)


def estimated_peak_bytes(plan: Any, reader: Any, recipe: Any = None) -> int:
    """Rough peak resident memory of a stream (pre-flight): the largest block (a decoder layer, or the embedding
    table or lm_head) in float32 three times (read, the quantizer's temporaries, the trace's Linear), GPTQ's
    Hessians of one layer and the calibration activations, SignRound's tunables, the evaluation's hidden states
    and both lm_heads at the end, and the libraries' own ~0.4 GB. The artifact check loads the artifact only
    when it fits."""
    import math

    def size(names: list[str]) -> int:
        return sum(4 * math.prod(reader.entries[n].shape) for n in names)

    layer = max((size(reader.layer_names(i)) for i in range(plan.num_layers)), default=0)
    head = size(["lm_head.weight" if "lm_head.weight" in reader.entries else "model.embed_tokens.weight"])
    hidden = int(plan.config.get("hidden_size") or 0)
    inner = int(plan.config.get("intermediate_size") or plan.config.get("moe_intermediate_size") or hidden)
    peak = 3 * max(layer, head) + 400_000_000
    if plan.calibrated and recipe is not None:
        tokens = recipe.calibration.samples * recipe.calibration.seq_len
        signround = plan.quantize.method == "signround"
        sets = 2 if (plan.quantize.awq and plan.quantize.method == "gptq") or signround else 1
        peak += tokens * 4 * (sets * hidden + inner) + 4 * (3 * hidden * hidden + inner * inner)
        if signround:  # the tuned weights' offsets, their gradients, the best step's offsets, the fake-quantized
            peak += 4 * max(layer, head if "lm_head.weight" in plan.quantized else 0)
    if recipe is not None and recipe.evaluation.enabled:
        peak += 2 * recipe.evaluation.max_tokens * 4 * hidden + 2 * head
    return peak


def check_disk(plan: Any, reader: Any, out: Path) -> None:
    """llmopt.streaming.quantize_checkpoint's disk check (the pipeline's is `check`)."""
    needed, free = estimated_output_bytes(plan, reader), shutil.disk_usage(out.resolve().parent).free
    if needed > free and os.environ.get(SKIP_ENV) != "1":
        raise _streamed_disk_error(needed, free, out)


def _streamed_disk_error(needed: int, free: int, out: Path | str) -> ResourceError:
    return ResourceError(f"The artifact needs about {needed / 1e9:.1f} GB next to '{out}' and {free / 1e9:.1f} GB "
                         "is free; nothing was started.",
                         f"Free disk space or choose another output folder; set {SKIP_ENV}=1 to try anyway.")


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
    if not found.fits_memory and found.streamed:
        raise ResourceError(
            f"This streamed run needs about {_size(found.memory_bytes)} of memory (its largest decoder layer or "
            f"embedding table in float32, the calibration and evaluation activations) and "
            f"{_size(found.available_memory_bytes)} is available; nothing was started.",
            _sentence(["set `evaluation.enabled: false` or lower `evaluation.max_tokens`"] * found.evaluates
                      + ["lower `calibration.samples`", "free memory or use a bigger machine"])
            + f"; set {SKIP_ENV}=1 to try anyway.")
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
    if not found.fits_disk and found.streamed:
        raise _streamed_disk_error(found.disk_bytes, found.free_output_bytes, "the output")
    if not found.fits_disk:
        raise ResourceError(
            f"This run writes about {_size(found.disk_bytes)} (a float32 baseline export in the temp folder; "
            f"the artifact and a resume checkpoint after each pass next to --output); free: "
            f"{_size(found.free_output_bytes)} at the output, {_size(found.free_temp_bytes)} in the temp folder; "
            "nothing was started.",
            f"Free disk space, choose another --output, or point TMPDIR elsewhere; set {SKIP_ENV}=1 to try anyway.")
