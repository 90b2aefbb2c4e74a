"""The Python API that the CLI wraps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmopt.pipeline import Plan, Progress, Result, plan, run
from llmopt.recipe import Recipe


def optimize(recipe: str | Path | Recipe, *, model: str | None = None, output: str | Path, force: bool = False,
             format: str | None = None, eval_data: str | None = None, allow_pickle: bool | None = None,
             trust_remote_code: bool | None = None, progress: Progress | None = None, resume: bool = False) -> Result:
    """Run a recipe (path, shipped name, or Recipe) on a model and write the artifact and report to `output`.

    Returns a Result; `result.passed` is False when a quality check of the recipe failed (the artifact
    is still written, as in CI one wants to read the report of a failed gate).

    `resume=True` continues a run of the same recipe and model on the same `output` that was killed (SIGKILL,
    out of memory, power cut) after completing some passes: those passes are not run again, and the artifact is
    the same as an uninterrupted run's. With no checkpoint to continue from the run starts afresh; a checkpoint
    of another recipe, model or version is refused with a RecipeError (exit 2).
    """
    from llmopt.artifact import check_destination

    if not force:  # an existing output is refused before anything loads (--force: checked with the inputs)
        check_destination(Path(output), force, dry_run=True)
    the_plan = plan(recipe, output=output, model=model, format=format, eval_data=eval_data,
                    allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return run(the_plan, force=force, progress=progress, resume=resume)


def validate(recipe: str | Path | Recipe, **overrides: Any) -> Plan:
    """Check a recipe, the model's config and the pass order without loading weights."""
    return plan(recipe, **overrides)


def bench(model: str, *, assistant: str, new_tokens: int = 64, draft_tokens: int = 5, threads: int | None = None,
          allow_pickle: bool = False, trust_remote_code: bool = False) -> Any:
    """Speculative decoding of `model` with the draft `assistant` (both PyTorch checkpoints, same tokenizer).

    Returns evaluation.speculative.SpeculativeScores: acceptance rate, tokens/s with and without the
    draft, and whether greedy outputs are identical.
    """
    from llmopt.errors import InputError
    from llmopt.evaluation.speculative import measure_speculative
    from llmopt.model import load_model, resolve_model

    sources = {}
    for role, spec in (("model", model), ("assistant", assistant)):
        folder = Path(spec)
        if folder.is_dir() and any(folder.glob("*.onnx")):
            raise InputError(f"--{role} '{spec}' is an ONNX artifact; assisted generation runs on PyTorch models.",
                             "Give a safetensors folder (e.g. `llmopt optimize RECIPE --format safetensors`), a "
                             ".gguf file, a hub id or 'demo'.")
        sources[role] = resolve_model(spec, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    target, tokenizer = load_model(sources["model"])
    draft, _ = load_model(sources["assistant"])
    if target.config.vocab_size != draft.config.vocab_size:
        raise InputError(f"The assistant '{assistant}' has a vocabulary of {draft.config.vocab_size} tokens, the "
                         f"model '{model}' {target.config.vocab_size}: a draft must share the model's tokenizer.",
                         "Make the draft from the model itself, e.g. `llmopt optimize draft-model --model MODEL "
                         "--format safetensors`.")
    return measure_speculative(target, draft, tokenizer, new_tokens=new_tokens, draft_tokens=draft_tokens,
                               threads=threads)
