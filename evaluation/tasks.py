"""Task accuracy through lm-eval-harness, when it is installed (an optional extra: it pulls datasets and more)."""

from __future__ import annotations

from typing import Any

# The metric reported per task, in order of preference: normalized accuracy when the task has it.
_METRICS = ("acc_norm,none", "acc,none", "exact_match,strict-match", "exact_match,none")


def lm_eval_available() -> bool:
    import importlib.util

    try:  # find_spec, not import: lm-eval takes seconds to import
        return importlib.util.find_spec("lm_eval") is not None
    except (ValueError, ImportError):  # a module entry without a spec (e.g. blocked in sys.modules)
        return False


def task_scores(models: dict[str, Any], tokenizer: Any, tasks: list[str], limit: int | None,
                seed: int) -> dict[str, dict[str, Any]]:
    """{task: {"metric": name, "baseline": value, "optimized": value}} for PyTorch models keyed by role.

    The same examples for both models (lm-eval's own seeded sampling and `limit`); PyTorch models, not the
    artifact: the artifact was checked to reproduce the optimized model's logits before this runs.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    results: dict[str, dict[str, Any]] = {task: {} for task in tasks}
    for role, model in models.items():
        out = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1), tasks=tasks,
                              limit=limit, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed)
        for task in tasks:
            scores = out["results"].get(task, {})
            metric = next((m for m in _METRICS if m in scores), None)
            results[task]["metric"] = metric
            results[task][role] = None if metric is None else float(scores[metric])
    return results
