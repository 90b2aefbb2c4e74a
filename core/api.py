"""The Python API that the CLI wraps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmopt.pipeline import Plan, Progress, Result, plan, run
from llmopt.recipe import Recipe


def optimize(recipe: str | Path | Recipe, *, model: str | None = None, output: str | Path, force: bool = False,
             format: str | None = None, eval_data: str | None = None, allow_pickle: bool | None = None,
             trust_remote_code: bool | None = None, progress: Progress | None = None) -> Result:
    """Run a recipe (path, shipped name, or Recipe) on a model and write the artifact and report to `output`.

    Returns a Result; `result.passed` is False when a quality check of the recipe failed (the artifact
    is still written, as in CI one wants to read the report of a failed gate).
    """
    the_plan = plan(recipe, output=output, model=model, format=format, eval_data=eval_data,
                    allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return run(the_plan, force=force, progress=progress)


def validate(recipe: str | Path | Recipe, **overrides: Any) -> Plan:
    """Check a recipe, the model's config and the pass order without loading weights."""
    return plan(recipe, **overrides)
