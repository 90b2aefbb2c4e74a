"""Task accuracy through lm-eval-harness: used when installed, skipped with a note when not."""

from __future__ import annotations

import sys
import types

import pytest

import llmopt
from llmopt.evaluation.tasks import lm_eval_available, task_scores


@pytest.mark.slow
def test_tasks_are_skipped_with_a_note_without_lm_eval(tiny_model_dir, fast_recipe, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed, wherever this runs
    assert not lm_eval_available()
    recipe = fast_recipe("passes:\n  - type: quantize\n    bits: 8\n    group_size: 16\nexport: {format: safetensors}\n")
    recipe.write_text(recipe.read_text() + "  tasks: [arc_easy]\n")
    result = llmopt.optimize(recipe, model=str(tiny_model_dir), output=tmp_path / "out")
    assert result.report.tasks == {}
    assert any("arc_easy skipped: lm-eval-harness is not installed" in n for n in result.report.notes)


def test_task_scores_runs_both_models_on_the_same_settings(monkeypatch):
    calls = []

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            self.model = pretrained

    def simple_evaluate(model, tasks, limit, random_seed, numpy_random_seed, torch_random_seed):
        calls.append((model.model, tuple(tasks), limit, random_seed))
        acc = {"baseline-model": 0.61, "optimized-model": 0.58}[model.model]
        return {"results": {"arc_easy": {"acc,none": acc - 0.05, "acc_norm,none": acc}, "gsm8k": {"alias": "gsm8k"}}}

    lm_eval = types.ModuleType("lm_eval")
    lm_eval.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    huggingface = types.ModuleType("lm_eval.models.huggingface")
    huggingface.HFLM = HFLM
    monkeypatch.setitem(sys.modules, "lm_eval", lm_eval)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", huggingface)

    scores = task_scores({"baseline": "baseline-model", "optimized": "optimized-model"}, None, ["arc_easy", "gsm8k"],
                         limit=50, seed=3)
    assert calls == [("baseline-model", ("arc_easy", "gsm8k"), 50, 3), ("optimized-model", ("arc_easy", "gsm8k"), 50, 3)]
    assert scores["arc_easy"] == {"metric": "acc_norm,none", "baseline": 0.61, "optimized": 0.58}
    assert scores["gsm8k"] == {"metric": None, "baseline": None, "optimized": None}  # no metric it knows: no number


def test_task_names_must_be_a_list_of_strings():
    from llmopt.errors import RecipeError
    from llmopt.recipe import parse_recipe

    with pytest.raises(RecipeError, match="tasks"):
        parse_recipe("evaluation:\n  tasks: {arc_easy: 3}\n")
