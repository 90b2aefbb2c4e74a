"""The accuracy report: a versioned pydantic schema, written as report.json and report.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from llmopt.errors import InputError

SCHEMA_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelMetrics(_Model):
    """Figures for one model (baseline or optimized), measured the same way on the same runtime."""

    runtime: str = Field(description="'onnxruntime' or 'pytorch'.")
    parameters: int = Field(description="Parameter count of the torch model (unique tensors).")
    size_bytes: int = Field(description="Weight files on disk in the artifact's format.")
    perplexity: float | None = None
    prefill_ms: float | None = Field(None, description="Median time to first token.")
    prefill_ms_spread: float | None = None
    decode_tokens_per_s: float | None = Field(None, description="Median decode speed, batch 1, KV cache.")
    decode_tokens_per_s_spread: float | None = None
    peak_memory_mb: float | None = Field(None, description="Peak RSS added while loading and generating.")
    peak_load_mb: float | None = Field(None, description="Peak RSS added by loading the model.")
    peak_decode_mb: float | None = Field(None, description="Peak RSS added by generating, on top of the loaded model.")
    kv_cache_bytes_per_token: int


class QualityReport(_Model):
    data: str
    tokens: int
    windows: int
    window: int
    kl_divergence: float = Field(description="Mean KL(baseline || optimized) per token, nats.")
    top1_agreement: float = Field(description="Share of next-token argmaxes equal to the baseline's.")
    perplexity_increase_pct: float
    confidence_level: float | None = Field(None, description="Level of the intervals, e.g. 0.95.")
    intervals: dict[str, list[float]] = Field(
        default_factory=dict, description="metric -> [low, high]: paired percentile bootstrap over evaluation windows "
                                          "(perplexity, perplexity_increase_pct, kl_divergence, top1_agreement).")


class SpeedSetup(_Model):
    prompt_tokens: int
    new_tokens: int
    runs: int
    threads: int


class PassRecord(_Model):
    type: str
    seconds: float
    info: dict[str, Any] = Field(default_factory=dict)


class ValidationRecord(_Model):
    prompts: int
    max_abs_logit_diff: float
    top1_agreement: float
    passed: bool
    long_tokens: int | None = Field(None, description="Length of the long sequence compared besides the prompts "
                                                      "(longer than every attention window of the model).")
    decode_tokens: int | None = Field(None, description="Tokens the artifact generated with its KV cache after the "
                                                        "long sequence.")
    decode_top1_agreement: float | None = Field(None, description="Share of those tokens that the reference model "
                                                                  "also chose on the same context.")


class CheckResult(_Model):
    name: str
    threshold: float
    value: float | None
    passed: bool
    interval: list[float] | None = Field(None, description="The value's confidence interval, for quality checks; "
                                                           "such a check fails only when all of it is beyond the "
                                                           "threshold.")


class Report(_Model):
    schema_version: int = SCHEMA_VERSION
    llmopt_version: str
    created: str
    model: dict[str, Any] = Field(description="spec, kind and model_type of the input model.")
    recipe: dict[str, Any]
    export: dict[str, Any] = Field(description="format, runtime, files and notes about the artifact.")
    baseline: ModelMetrics
    optimized: ModelMetrics
    quality: QualityReport | None = None
    speed_setup: SpeedSetup | None = None
    passes: list[PassRecord]
    kv_cache_context_tokens: int | None = Field(None, description="Context length of the KV-cache size row.")
    layer_errors: list[float] | None = Field(
        None, description="Per decoder layer: ||h_opt - h_base||^2 / ||h_base||^2 of the layer's output on two evaluation "
                          "windows (PyTorch models). None when the layers no longer line up (depth pruning).")
    samples: list[dict[str, str]] = Field(default_factory=list, description="Greedy generations of fixed prompts: "
                                                                           "prompt, baseline, optimized.")
    tasks: dict[str, dict[str, Any]] = Field(default_factory=dict, description="lm-eval-harness: task -> metric, "
                                                                              "baseline, optimized.")
    validation: ValidationRecord | None = None
    checks: list[CheckResult] = Field(default_factory=list)
    environment: dict[str, str]
    notes: list[str] = Field(default_factory=list)
    total_seconds: float

    def write(self, folder: Path) -> None:
        (folder / "report.json").write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        (folder / "report.md").write_text(render_markdown(self), encoding="utf-8")
        from llmopt.evaluation.html import render_html  # imports this module: not at the top

        (folder / "report.html").write_text(render_html(self), encoding="utf-8")


def read_report(path: str | Path) -> Report:
    """A report from report.json or from an artifact folder that holds one."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"No report at '{path}'.", "Give a report.json or an artifact folder written by `llmopt optimize`.") from None
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested thousands deep
        raise InputError(f"'{path}' is not a readable JSON report ({type(exc).__name__}: {exc}).",
                         "Give a report.json written by `llmopt optimize`.") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise InputError(f"'{path}' has report schema version {version!r}; this llmopt reads version {SCHEMA_VERSION}.",
                         "Re-run `llmopt optimize` with this version, or compare with the llmopt that wrote it.")
    try:
        return Report.model_validate(data)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"'{path}' does not match the report schema: {exc}", "Was it edited by hand?") from None


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def _change(a: float | None, b: float | None) -> str:
    if a is None or b is None or a == 0:
        return "–"
    return f"{(b - a) / abs(a) * 100:+.1f}%"


def headline_rows(report: Report) -> list[tuple[str, Any, Any]]:
    """(metric, baseline, optimized) rows shared by the Markdown report and the console summary."""
    b, o = report.baseline, report.optimized
    return [
        ("parameters", b.parameters, o.parameters),
        ("size on disk (MB)", b.size_bytes / 1e6, o.size_bytes / 1e6),
        ("perplexity", b.perplexity, o.perplexity),
        ("time to first token (prefill, ms)", b.prefill_ms, o.prefill_ms),
        ("decode (tokens/s)", b.decode_tokens_per_s, o.decode_tokens_per_s),
        ("peak memory added (MB)", b.peak_memory_mb, o.peak_memory_mb),
        ("  of which loading (MB)", b.peak_load_mb, o.peak_load_mb),
        ("  generating, above the loaded model (MB)", b.peak_decode_mb, o.peak_decode_mb),
        ("KV cache (bytes/token)", b.kv_cache_bytes_per_token, o.kv_cache_bytes_per_token),
    ] + ([(f"KV cache at {n:,} tokens (MB, fp32)", b.kv_cache_bytes_per_token * n / 1e6,
           o.kv_cache_bytes_per_token * n / 1e6)] if (n := report.kv_cache_context_tokens) else [])


def timing_spreads(report: Report) -> dict[str, tuple[float | None, float | None]]:
    """The timed rows of headline_rows with their spread over runs (max - min; None when not measured)."""
    b, o = report.baseline, report.optimized
    return {"time to first token (prefill, ms)": (b.prefill_ms_spread, o.prefill_ms_spread),
            "decode (tokens/s)": (b.decode_tokens_per_s_spread, o.decode_tokens_per_s_spread)}


MEMORY_FLOOR_MB = 1.0  # memory changes below this are the allocator's noise, not the model's
MEASURED_MEMORY_ROWS = ("peak memory added (MB)", "  of which loading (MB)", "  generating, above the loaded model (MB)")


def _timed(value: Any, spread: float | None) -> str:
    return _fmt(value) + (f" ±{spread:.3g}" if value is not None and spread is not None else "")


def _judged_change(name: str, a: Any, b: Any, spreads: tuple[float | None, float | None] | None) -> str:
    """The change, saying when it is within the runs' spread or under the memory floor (then it is not a change
    the report can tell from noise)."""
    change = _change(a, b)
    if change == "–":
        return change
    if spreads is not None and None not in spreads and abs(b - a) <= spreads[0] + spreads[1]:
        return f"{change} (within the runs' spread)"
    if name in MEASURED_MEMORY_ROWS and abs(b - a) < MEMORY_FLOOR_MB:
        return f"{change} (under {MEMORY_FLOOR_MB:g} MB)"
    return change


def _ci(quality: QualityReport, metric: str, spec: str, suffix: str = "") -> str:
    low_high = quality.intervals.get(metric)
    if not low_high:
        return ""
    return f" ({quality.confidence_level:.0%} CI {low_high[0]:{spec}}{suffix} to {low_high[1]:{spec}}{suffix})"


def render_markdown(report: Report) -> str:
    lines = [
        f"# llmopt report — {report.model.get('spec')}",
        "",
        f"Format **{report.export['format']}** on {report.optimized.runtime}; baseline = the input model in "
        f"float32 on the same runtime. Created {report.created} by llmopt {report.llmopt_version}.",
        "",
        "| metric | baseline | optimized | change |",
        "|---|---:|---:|---:|",
    ]
    spreads = timing_spreads(report)
    for name, a, b in headline_rows(report):
        sa, sb = spreads.get(name, (None, None))
        lines.append(f"| {name} | {_timed(a, sa)} | {_timed(b, sb)} | {_judged_change(name, a, b, spreads.get(name))} |")
    if report.quality:
        q = report.quality
        lines += [
            "",
            "## Quality against the baseline",
            "",
            f"- KL divergence (baseline ‖ optimized): {q.kl_divergence:.4f} nats/token{_ci(q, 'kl_divergence', '.4f')}",
            f"- top-1 next-token agreement: {q.top1_agreement * 100:.2f}%{_ci(q, 'top1_agreement', '.2%')}",
            f"- perplexity change: {q.perplexity_increase_pct:+.2f}%{_ci(q, 'perplexity_increase_pct', '+.2f', '%')}",
            f"- data: {q.data}; {q.tokens} tokens in {q.windows} windows of {q.window}",
        ]
        if q.intervals:
            lines.append(f"- intervals: {q.confidence_level:.0%}, paired percentile bootstrap over the {q.windows} "
                         "windows (few windows give wide intervals: raise `evaluation.max_tokens` to narrow them)")
    if report.layer_errors:
        errors = report.layer_errors
        worst = max(range(len(errors)), key=errors.__getitem__)
        lines += ["", "## Per-layer error", "",
                  f"Relative squared error of each decoder layer's output against the baseline's (PyTorch, two "
                  f"evaluation windows): mean {sum(errors) / len(errors):.3g}, worst layer {worst} ({errors[worst]:.3g}), "
                  f"last layer {errors[-1]:.3g}.", "",
                  "| layer | " + " | ".join(str(i) for i in range(len(errors))) + " |",
                  "|---|" + "---:|" * len(errors),
                  "| error | " + " | ".join(f"{e:.2g}" for e in errors) + " |"]
    if report.tasks:
        lines += ["", "## Tasks (lm-eval-harness)", "", "| task | metric | baseline | optimized |", "|---|---|---:|---:|"]
        for task, t in report.tasks.items():
            lines.append(f"| {task} | {t.get('metric')} | {_fmt(t.get('baseline'))} | {_fmt(t.get('optimized'))} |")
    if report.samples:
        lines += ["", "## Generation samples (greedy)", "", "| prompt | baseline | optimized |", "|---|---|---|"]
        for sample in report.samples:
            cells = [sample[k].replace("|", "\\|").replace("\n", " ") for k in ("prompt", "baseline", "optimized")]
            lines.append("| " + " | ".join(cells) + " |")
    if report.speed_setup:
        s = report.speed_setup
        lines += ["", f"Speed: batch 1, KV cache, prompt {s.prompt_tokens} tokens, {s.new_tokens} new tokens, "
                  f"median of {s.runs} runs, {s.threads} threads."]
    if report.validation:
        v = report.validation
        lines += ["", "## Artifact validation", "",
                  f"{v.prompts} prompts and one sequence of {v.long_tokens} tokens, artifact vs in-memory optimized "
                  f"model: max |Δlogit| {v.max_abs_logit_diff:.4g}, top-1 agreement {v.top1_agreement * 100:.1f}%"
                  + (f", {v.decode_top1_agreement * 100:.1f}% over {v.decode_tokens} tokens decoded with the KV cache"
                     if v.decode_top1_agreement is not None else "")
                  + f" — {'passed' if v.passed else 'FAILED'}."]
    lines += ["", "## Passes", "", "| pass | seconds | details |", "|---|---:|---|"]
    for p in report.passes:
        details = ", ".join(f"{k}={v}" for k, v in p.info.items())
        lines.append(f"| {p.type} | {p.seconds:.1f} | {details} |")
    if report.checks:
        lines += ["", "## Checks", "", "A quality check (perplexity, KL, top-1) fails only when its whole confidence "
                  "interval is beyond the threshold, so noise alone does not fail a CI job; size and speed checks "
                  "compare the measured value.", "", "| check | threshold | value | interval | result |",
                  "|---|---:|---:|---|---|"]
        for c in report.checks:
            interval = "–" if c.interval is None else f"[{_fmt(c.interval[0])}, {_fmt(c.interval[1])}]"
            lines.append(f"| {c.name} | {_fmt(c.threshold)} | {_fmt(c.value)} | {interval} | "
                         f"{'pass' if c.passed else '**FAIL**'} |")
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report.notes]
    env = ", ".join(f"{k} {v}" for k, v in report.environment.items())
    lines += ["", f"Environment: {env}. Total time {report.total_seconds:.0f} s.", ""]
    return "\n".join(lines)
