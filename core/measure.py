"""What a run measures on its artifact: the artifact check, then the baseline and the artifact side by side
(speed, memory, perplexity, KL, top-1, generation samples, lm-eval tasks), for the report. The in-memory
schedule calls `evaluate` and `task_scores`; the streamed one (llmopt.streaming) shares `quality_report` and
`evaluation_windows`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmopt.errors import InputError
from llmopt.model import load_model
from llmopt.recipe import Recipe


@dataclass
class Evaluation:
    """What `evaluate` measured, for the report: the baseline's size, each side's figures (ModelMetrics fields),
    quality, the speed setup, the artifact check, and where and how it ran."""

    baseline_bytes: int
    threads: int | None
    baseline: dict[str, Any] = field(default_factory=dict)
    optimized: dict[str, Any] = field(default_factory=dict)
    quality: Any = None  # llmopt.evaluation.report.QualityReport
    speed_setup: dict[str, Any] | None = None
    validation: Any = None  # llmopt.evaluation.report.ValidationRecord
    provider: str = "CPUExecutionProvider"
    samples: list[dict[str, str]] = field(default_factory=list)


def evaluate(plan: Any, state: Any, baseline_dir: Path | None, baseline_params: int, artifact_dir: Path,
             timer: Any, windows: list[Any], description: str) -> Evaluation:
    """Validate the artifact, then measure baseline and optimized on the artifact's runtime (without a baseline
    artifact, evaluation off, its size is the input model's float32 weights)."""
    import gc

    from llmopt.evaluation.quality import compare_quality, generation_samples
    from llmopt.evaluation.runners import TorchRunner, load_runner
    from llmopt.evaluation.speed import PeakRss, measure_speed
    from llmopt.architectures import attention_windows
    from llmopt.evaluation.validate import (long_sequence_length, runtime_failures, validate_artifact,
                                            validation_failure, validation_sequences)
    from llmopt.exporters.base import weight_bytes

    recipe, fmt = plan.recipe, plan.recipe.export.format
    ev = recipe.evaluation
    threads = ev.speed.threads
    tokenizer = state.tokenizer
    baseline_bytes = weight_bytes(baseline_dir) if baseline_dir else 4 * baseline_params  # loaded in float32
    result = Evaluation(baseline_bytes=baseline_bytes, threads=threads)

    with timer("validate artifact"):
        rss_opt = PeakRss()
        limits = recipe.export.validate_result
        long_tokens = long_sequence_length(attention_windows(state.model.config),
                                           getattr(state.model.config, "max_position_embeddings", None))
        with runtime_failures():
            with rss_opt:
                optimized = load_runner(artifact_dir, fmt, threads, plan.provider)
            validation = validate_artifact(TorchRunner(state.model), optimized,
                                           validation_sequences(tokenizer, limits, long_tokens), limits)
        if not validation.passed:
            raise validation_failure(validation, limits)
        result.validation = validation
    result.threads = getattr(optimized, "threads", threads)
    result.provider = optimized.provider
    if not ev.enabled:
        return result

    result.optimized["peak_load_mb"] = rss_opt.added_mb
    rss_base = PeakRss()
    with rss_base:
        baseline = load_runner(baseline_dir, fmt, threads, plan.provider)
    result.baseline["peak_load_mb"] = rss_base.added_mb
    if ev.speed.enabled:
        prompt = speed_prompt(tokenizer, ev.speed.prompt_tokens)
        result.speed_setup = {"prompt_tokens": len(prompt), "new_tokens": ev.speed.new_tokens,
                              "runs": ev.speed.runs, "threads": result.threads}
        for name, runner, rss in (("baseline", baseline, rss_base), ("optimized", optimized, rss_opt)):
            with timer(f"speed {name}"):
                decode_rss = PeakRss()  # what generating adds on top of the loaded model
                with rss, decode_rss:  # rss re-entered: the peak keeps counting from the first entry
                    scores = measure_speed(runner, prompt, ev.speed.new_tokens, ev.speed.runs)
            measured = getattr(result, name)
            measured["peak_decode_mb"] = decode_rss.added_mb
            measured.update(prefill_ms=scores.prefill_ms, prefill_ms_spread=scores.prefill_ms_spread,
                            decode_tokens_per_s=scores.decode_tokens_per_s,
                            decode_tokens_per_s_spread=scores.decode_tokens_per_s_spread)
    result.baseline["peak_memory_mb"] = rss_base.added_mb
    result.optimized["peak_memory_mb"] = rss_opt.added_mb

    with timer("quality (perplexity, KL, top-1)"):
        scores = compare_quality(baseline, optimized, windows, timer.progress.advance)
    with timer("generation samples"):
        result.samples = generation_samples(baseline, optimized, tokenizer)
    result.baseline["perplexity"] = scores.baseline_perplexity
    result.optimized["perplexity"] = scores.perplexity
    result.quality = quality_report(scores, description, ev.window)
    del baseline, optimized
    gc.collect()
    return result


def quality_report(scores: Any, description: str, window: int) -> Any:
    """The report's quality section from llmopt.evaluation.quality.QualityScores."""
    from llmopt.evaluation.quality import CONFIDENCE
    from llmopt.evaluation.report import QualityReport

    return QualityReport(
        data=description, tokens=scores.tokens, windows=scores.windows, window=window,
        kl_divergence=scores.kl_divergence, top1_agreement=scores.top1_agreement,
        perplexity_increase_pct=(scores.perplexity / scores.baseline_perplexity - 1) * 100,
        confidence_level=CONFIDENCE, intervals={k: list(v) for k, v in (scores.intervals or {}).items()})


def task_scores(plan: Any, state: Any, timer: Any) -> tuple[dict[str, Any], list[str]]:
    """lm-eval-harness scores of the input and the optimized model, or a note saying why there are none."""
    from llmopt.evaluation.tasks import lm_eval_available
    from llmopt.evaluation.tasks import task_scores as score_tasks

    ev = plan.recipe.evaluation
    if not ev.tasks or not ev.enabled:
        return {}, []
    if not lm_eval_available():
        return {}, [f"tasks {', '.join(ev.tasks)} skipped: lm-eval-harness is not installed (`pip install lm-eval`)."]
    with timer(f"tasks ({', '.join(ev.tasks)})"):
        baseline, _ = load_model(plan.source)  # the input model again: the pipeline keeps no copy of it
        try:
            scores = score_tasks({"baseline": baseline, "optimized": state.model}, state.tokenizer, ev.tasks,
                                 ev.task_limit, plan.recipe.seed)
        except Exception as exc:  # unknown task names, datasets that cannot be fetched offline, ...
            raise InputError(f"lm-eval-harness could not score tasks {ev.tasks}: {type(exc).__name__}: {exc}",
                             "Check the task names (`lm-eval ls tasks`) and that their datasets are reachable or "
                             "cached; or remove `evaluation.tasks`.") from None
    return scores, []


def evaluation_windows(recipe: Recipe, tokenizer: Any) -> tuple[list[Any], str]:
    """The evaluation windows and a description of their text, read and tokenized once per run, before the
    passes (so a text too short for one window fails at once). None when evaluation is off."""
    from llmopt.evaluation.quality import token_windows
    from llmopt.evaluation.text import load_text

    ev = recipe.evaluation
    if not ev.enabled:
        return [], ""
    text, description = load_text(ev.data, ev.text_field)
    try:
        return token_windows(tokenizer, text, ev.max_tokens, ev.window), description
    except ValueError as exc:
        raise InputError(f"Evaluation data: {exc}.", "Use more text or a smaller `evaluation.window`.") from None


def speed_prompt(tokenizer: Any, length: int):
    """A prompt of exactly `length` tokens from the built-in text (the same for both models)."""
    import numpy as np

    from llmopt.evaluation.text import builtin_text

    ids = tokenizer(builtin_text()[:20000], add_special_tokens=False)["input_ids"][:length]
    return np.asarray(ids, dtype=np.int64)
