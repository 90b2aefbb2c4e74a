"""Plan (validate everything, no weights read) and run (load, passes, export, validate, evaluate, report)."""

from __future__ import annotations

import copy
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from llmopt import devices
from llmopt.artifact import (OutputLock, check_destination, new_scratch, new_staging, promote, remove_tree,
                             write_manifest)
from llmopt.checkpoint import nonfinite_parameters
from llmopt.errors import RecipeError, ResourceError, ResultValidationError, translate
from llmopt.model import ArchInfo, ModelSource, check_causal_lm, load_config, load_model, resolve_model
from llmopt.recipe import Recipe, load_recipe
from llmopt.run_log import LOG_FILE, library_log
from llmopt.write_safety import Input, recipe_inputs


class Progress(Protocol):
    """How the pipeline tells a front end what it is doing (the CLI draws it with rich)."""

    def step(self, name: str, total: int | None = None) -> None: ...
    def advance(self, done: int, total: int) -> None: ...
    def done(self, name: str, seconds: float) -> None: ...


class SilentProgress:
    def step(self, name: str, total: int | None = None) -> None: ...
    def advance(self, done: int, total: int) -> None: ...
    def done(self, name: str, seconds: float) -> None: ...


@dataclass
class Plan:
    recipe: Recipe
    source: ModelSource
    arch: ArchInfo  # input model
    planned_arch: ArchInfo  # after every pass
    passes: list[Any]  # Pass instances, in order
    exporter: Any
    output: Path | None
    provider: str = "CPUExecutionProvider"  # where the artifact is evaluated (onnxruntime execution provider)
    # export.streaming: the checkpoint's StreamPlan and CheckpointReader (llmopt.streaming), read once at plan time
    stream: tuple[Any, Any] | None = None


@dataclass
class Result:
    output: Path
    report: Any  # llmopt.evaluation.report.Report
    failed_checks: list[Any] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failed_checks


def apply_overrides(recipe: Recipe, *, model: str | None = None, format: str | None = None,
                    eval_data: str | None = None, allow_pickle: bool | None = None,
                    trust_remote_code: bool | None = None) -> Recipe:
    """The recipe with the command line's common overrides applied (validated again)."""
    data = recipe.model_dump(by_alias=True)
    data["passes"] = recipe.passes  # already-validated pass configs stay as they are
    data["source"] = recipe.source
    if model is not None:
        data["model"] = model
    if format is not None:
        data["export"]["format"] = format
    if eval_data is not None:
        data["evaluation"]["data"] = eval_data
    if allow_pickle:
        data["allow_pickle"] = True
    if trust_remote_code:
        data["trust_remote_code"] = True
    try:
        return Recipe.model_validate(data)
    except ValueError as exc:
        raise RecipeError(f"Invalid command-line override: {exc}", "See `llmopt optimize --help`.") from None


def plan(recipe: str | Path | Recipe, *, output: str | Path | None = None, **overrides: Any) -> Plan:
    """Validate the recipe against the model's config and the exporter. Reads no weights."""
    from llmopt.exporters import EXPORTERS
    from llmopt.passes import PASSES

    recipe = apply_overrides(load_recipe(recipe), **overrides)
    if not recipe.model:
        raise RecipeError("No model given: the recipe has no `model:` and --model was not passed.",
                          "Pass --model PATH|HUB_ID|demo, or add `model:` to the recipe.")
    from llmopt.evaluation.text import check_data_spec

    if recipe.evaluation.enabled:
        check_data_spec(recipe.evaluation.data, "evaluation.data")
    source = resolve_model(recipe.model, allow_pickle=recipe.allow_pickle, trust_remote_code=recipe.trust_remote_code)
    config = load_config(source)
    check_causal_lm(config, source.spec)
    arch = planned = ArchInfo.from_config(config)
    passes = []
    for i, pass_config in enumerate(recipe.passes):
        p = PASSES[pass_config.type](pass_config)
        p.check_order(recipe.passes[:i], where=f"passes[{i}]")
        planned = p.check(planned, where=f"passes[{i}]")
        passes.append(p)
    if any(p.needs_calibration for p in passes):
        check_data_spec(recipe.calibration.data, "calibration.data")
    for i, p in enumerate(passes):
        p.check_export(recipe.export.format, where=f"passes[{i}]")
    exporter = EXPORTERS[recipe.export.format](recipe.export)
    exporter.check(planned, config, passes)
    provider = devices.resolve_provider(recipe.export.execution_provider)
    the_plan = Plan(recipe, source, arch, planned, passes, exporter, Path(output) if output else None, provider)
    if recipe.export.streaming:  # layer by layer from the checkpoint (llmopt.streaming): what it can run
        from llmopt.streaming import check_streamable

        the_plan.stream = check_streamable(the_plan)
    return the_plan


def plan_inputs(plan: Plan) -> list[Input]:
    """What the plan's run reads, which its output may not overlap (llmopt.write_safety)."""
    return recipe_inputs(plan.recipe, plan.source.read_root)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("llmopt", "torch", "transformers", "compressed-tensors", "onnx", "onnxruntime-gpu", "onnxruntime"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def run(plan: Plan, *, output: str | Path | None = None, force: bool = False, progress: Progress | None = None,
        resume: bool = False, echo_library_messages: bool = True) -> Result:
    """Execute a plan. The artifact appears at `output` only when complete (report and manifest included).

    `resume`: continue a killed run of the same recipe and model from its last completed pass (llmopt.resume).
    The libraries' warnings and notices are kept in the artifact's llmopt.log (llmopt.run_log);
    `echo_library_messages`: also where they would go without llmopt (the terminal).
    """
    progress = progress or SilentProgress()
    out = Path(output) if output else plan.output
    if out is None:
        raise RecipeError("No output folder given.", "Pass --output DIR.")
    out = check_destination(out, force, plan_inputs(plan))  # resolved: a symlinked --output is its target
    started = time.perf_counter()
    with OutputLock(out):  # first: an output that cannot be written is the problem to name, not its free space
        from llmopt import preflight

        preflight.check(preflight.estimate(plan, out))
        return _run_locked(plan, out, progress, started, resume, echo_library_messages)


@dataclass
class Outcome:
    """What a schedule (in memory, or streamed layer by layer) hands the report: ModelMetrics for both sides,
    the passes' records, the export's description, what `Evaluation` measured, and notes."""

    export: dict[str, Any]
    baseline: Any  # llmopt.evaluation.report.ModelMetrics
    optimized: Any
    passes: list[Any]  # llmopt.evaluation.report.PassRecord
    evaluation: Any  # llmopt.measure.Evaluation
    notes: list[str]
    kv_cache_context_tokens: int | None = None
    layer_errors: list[float] | None = None
    tasks: dict[str, Any] = field(default_factory=dict)


def _run_locked(plan: Plan, out: Path, progress: Progress, started: float, resume: bool = False,
                echo_library_messages: bool = True) -> Result:
    """Stage, run the plan's schedule, write the report and manifest, promote; nothing is left behind otherwise."""
    import contextlib

    import numpy as np
    import torch

    recipe = plan.recipe
    torch.manual_seed(recipe.seed)
    np.random.seed(recipe.seed)
    try:
        with contextlib.ExitStack() as cleanup:  # done, failed or interrupted: what a step created goes
            staging = new_staging(out)
            cleanup.callback(remove_tree, staging)
            versions = library_versions()
            steps = _Steps(progress)
            with library_log(staging / LOG_FILE, echo=echo_library_messages):  # closed before the manifest
                if recipe.export.streaming:  # layer by layer from the checkpoint, never the whole model
                    from llmopt.streaming import run_streamed

                    outcome = run_streamed(plan, staging, steps, resume)
                else:
                    outcome = _run_in_memory(plan, out, staging, steps, versions, resume, cleanup)
                report = write_report(plan, staging, started, versions, outcome)
            write_manifest(staging, recipe=recipe_dict(recipe), versions=versions, seed=recipe.seed)
            promote(staging, out)
    except MemoryError:
        lower = ("set `evaluation.enabled: false` to skip loading the baseline and the artifact side by side"
                 if recipe.evaluation.enabled else "lower `calibration.samples` or `calibration.seq_len`")
        raise ResourceError("Ran out of memory while optimizing; nothing was written.",
                            f"Free memory, use a machine with more RAM, or {lower}.") from None
    except Exception as exc:  # a full disk, a damaged file: llmopt's typed error (llmopt.errors.translate)
        typed = translate(exc)
        if typed is None or typed is exc:
            raise
        raise typed from None
    return Result(out, report, [c for c in report.checks if not c.passed])


def _run_in_memory(plan: Plan, out: Path, staging: Path, steps: _Steps, versions: dict[str, str], resume: bool,
                   cleanup: Any) -> Outcome:
    """The in-memory schedule: load, export the baseline, run the passes (checkpointed for --resume), export
    into `staging`, validate, evaluate. `cleanup` (an ExitStack) removes the scratch folder and checkpoints."""
    from llmopt.evaluation.quality import hidden_states, relative_layer_errors
    from llmopt.evaluation.report import ModelMetrics
    from llmopt.measure import evaluate, evaluation_windows, task_scores
    from llmopt.resume import ResumeStore, fingerprint
    from llmopt.state import ModelState

    recipe = plan.recipe
    # Checkpoints after each pass, kept only by a run that could not unwind (llmopt.resume).
    store = ResumeStore(out, fingerprint(recipe_dict(recipe), plan.source, versions))
    resuming = store.start(resume)  # a mismatch raises before the removal is registered: the folder stays
    cleanup.callback(store.remove)
    scratch = new_scratch()  # its name carries our pid: a later run removes it if we are killed
    cleanup.callback(remove_tree, scratch)
    with steps("load model"):
        model, tokenizer = load_model(plan.source)
    baseline_params = _count_parameters(model)
    baseline_dir: Path | None = None
    if recipe.evaluation.enabled:  # measured side by side with the artifact; without evaluation, not needed
        baseline_dir = scratch / "baseline"
        with steps(f"export baseline ({recipe.export.format}, for comparison)"):
            baseline_dir.mkdir()
            plan.exporter.export(ModelState(model, tokenizer), baseline_dir)

    windows, text_description = evaluation_windows(recipe, tokenizer)
    probe = windows[:2]  # for the per-layer error
    before = hidden_states(model, probe) if probe else None
    calibration = CalibrationSource(recipe, tokenizer)
    state, records, resume_notes = _run_passes(plan, ModelState(model, tokenizer), store, resuming, calibration, steps)

    with steps(f"export {recipe.export.format}"):
        exported = plan.exporter.export(state, staging, steps.progress.advance)
        exported.notes.extend(_keep_generation_config(plan.source, staging))

    layer_errors = relative_layer_errors(before, hidden_states(state.model, probe)) if before else None
    del before
    evaluation = evaluate(plan, state, baseline_dir, baseline_params, staging, steps, windows, text_description)
    if baseline_dir is None:
        exported.notes.append("Baseline size: the input model's float32 weights (no baseline artifact is exported "
                              "when evaluation is off).")
    tasks, task_notes = task_scores(plan, state, steps)
    arch_after = ArchInfo.from_config(state.model.config)
    runtime = plan.exporter.runtime
    return Outcome(
        export={"format": recipe.export.format, "runtime": runtime,
                "files": sorted(p.name for p in staging.iterdir()), **exported.info},
        baseline=ModelMetrics(runtime=runtime, parameters=baseline_params, size_bytes=evaluation.baseline_bytes,
                              kv_cache_bytes_per_token=plan.arch.kv_cache_bytes_per_token(), **evaluation.baseline),
        optimized=ModelMetrics(runtime=runtime, parameters=_count_parameters(state.model),
                               size_bytes=exported.weights_bytes,
                               kv_cache_bytes_per_token=arch_after.kv_cache_bytes_per_token(), **evaluation.optimized),
        passes=records,
        evaluation=evaluation,
        notes=exported.notes + task_notes + _fallback_note(plan.provider, evaluation.provider)
        + ([f"calibration data: {calibration.description}"] if calibration.description else []) + resume_notes,
        kv_cache_context_tokens=recipe.evaluation.context_length or plan.arch.extra.get("max_position_embeddings"),
        layer_errors=layer_errors,
        tasks=tasks,
    )


def _run_passes(plan: Plan, state: Any, store: Any, resuming: bool, calibration: CalibrationSource,
                steps: _Steps) -> tuple[Any, list[Any], list[str]]:
    """The plan's passes in order, from where a killed run stopped when resuming; each checked for non-finite
    weights and checkpointed. Returns the state, the passes' records and notes."""
    from llmopt.evaluation.report import PassRecord
    from llmopt.state import PassContext

    recipe = plan.recipe
    # A frozen copy of the input model for passes that learn from it (distillation).
    original = copy.deepcopy(state.model).eval() if any(p.needs_teacher for p in plan.passes) else None
    passes_done, records, notes = 0, [], []
    if resuming and store.latest() is not None:  # the state after the passes a killed run completed
        restored = store.restore(state)
        state, passes_done = restored.state, restored.passes_done
        records = [PassRecord(**r) for r in restored.records]
        notes = [(f"resumed after {passes_done} completed pass(es) of a killed run "
                  f"({', '.join(r.type for r in records)}): their records are that run's.")]
    for index, p in enumerate(plan.passes):
        if index < passes_done:
            continue
        p = store.checkpointing(p, index)
        steps.progress.step(f"pass {p.type}")
        t0 = time.perf_counter()
        ctx = PassContext(seed=recipe.seed, progress=steps.progress.advance,
                          calibration=calibration if p.needs_calibration else None,
                          teacher=(lambda: original) if p.needs_teacher else None)
        state = p.run(state, ctx)
        nonfinite = nonfinite_parameters(state.model)
        if nonfinite:
            raise ResultValidationError(
                f"Pass '{p.type}' produced NaN or infinite values in {len(nonfinite)} weight tensor(s): "
                f"{', '.join(nonfinite[:3])}; nothing was written.",
                "Check the pass's settings (a learning rate or a damping too small), or report it with the recipe.")
        seconds = time.perf_counter() - t0
        steps.progress.done(f"pass {p.type}", seconds)
        records.append(PassRecord(type=p.type, seconds=seconds, info=state.pass_info.get(p.type, {})))
        store.save(index + 1, state, [r.model_dump(mode="json") for r in records])
    return state, records, notes


def write_report(plan: Plan, folder: Path, started: float, versions: dict[str, str], outcome: Outcome) -> Any:
    """The run's report, as every schedule writes it: what identifies the run (version, time, model, recipe,
    environment), the schedule's outcome, the recipe's checks judged on it; written into `folder` as
    report.json, report.html and the model card (README.md)."""
    from llmopt.evaluation.checks import evaluate_checks
    from llmopt.evaluation.model_card import render_model_card
    from llmopt.evaluation.report import Report, SpeedSetup

    evaluation = outcome.evaluation
    environment = {**versions, "cpu": devices.cpu_name(), "device": devices.device_name(evaluation.provider)}
    if evaluation.threads is not None:
        environment["threads"] = str(evaluation.threads)
    report = Report(
        llmopt_version=versions.get("llmopt", "dev"),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model={"spec": plan.source.spec, "kind": plan.source.kind, "model_type": plan.arch.model_type,
               "name": plan.source.name, "input_bytes": plan.source.input_bytes},
        recipe=recipe_dict(plan.recipe),
        environment=environment,
        total_seconds=time.perf_counter() - started,
        export=outcome.export,
        baseline=outcome.baseline,
        optimized=outcome.optimized,
        quality=evaluation.quality,
        speed_setup=SpeedSetup(**evaluation.speed_setup) if evaluation.speed_setup else None,
        passes=outcome.passes,
        kv_cache_context_tokens=outcome.kv_cache_context_tokens,
        layer_errors=outcome.layer_errors,
        samples=evaluation.samples,
        tasks=outcome.tasks,
        validation=evaluation.validation,
        notes=outcome.notes,
    )
    report.checks = evaluate_checks(plan.recipe.checks, report)
    report.write(folder)
    (folder / "README.md").write_text(render_model_card(report), encoding="utf-8")
    return report


def _keep_generation_config(source: ModelSource, folder: Path) -> list[str]:
    """The checkpoint's generation_config.json in the artifact, byte for byte, when the exporter left it out:
    transformers refuses to save one whose sampling settings come without `do_sample: true` (common in
    released checkpoints), and the user's stop tokens and sampling defaults would be lost without a word."""
    import shutil

    given = Path(source.path) / "generation_config.json"
    if source.gguf_file or not given.is_file() or (folder / given.name).exists():
        return []
    shutil.copyfile(given, folder / given.name)
    return [f"{given.name} copied as the checkpoint has it (transformers would not save it: it holds sampling "
            "settings without do_sample)."]


class CalibrationSource:
    """Calibration windows, tokenized once on first use and shared by every pass that asks."""

    def __init__(self, recipe: Recipe, tokenizer: Any) -> None:
        self.recipe, self.tokenizer = recipe, tokenizer
        self.batches: list[Any] | None = None
        self.description = ""

    def __call__(self) -> list[Any]:
        if self.batches is None:
            from llmopt.evaluation.calibration import calibration_batches

            cal, ev = self.recipe.calibration, self.recipe.evaluation
            same_text = ev.enabled and cal.data == ev.data
            self.batches, self.description = calibration_batches(
                self.tokenizer, data=cal.data, text_field=cal.text_field, samples=cal.samples,
                seq_len=cal.seq_len, seed=self.recipe.seed, skip_tokens=ev.max_tokens if same_text else 0)
        return self.batches


class _Steps:
    """Context manager factory: `with steps("name"):` reports start, end and elapsed time."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def __call__(self, name: str):
        import contextlib

        @contextlib.contextmanager
        def step():
            self.progress.step(name)
            t0 = time.perf_counter()
            yield
            self.progress.done(name, time.perf_counter() - t0)

        return step()


def _fallback_note(planned: str, used: str) -> list[str]:
    if planned == used:
        return []
    return [f"{planned} was chosen but the artifact ran on {used}: onnxruntime could not start the GPU provider "
            "(missing CUDA/cuDNN libraries?), so the speed figures are the CPU's."]


def _count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied tensors once


def recipe_dict(recipe: Recipe) -> dict[str, Any]:
    data = recipe.model_dump(mode="json", by_alias=True, exclude={"source"})
    data["passes"] = [p.model_dump(mode="json") for p in recipe.passes]
    return data
