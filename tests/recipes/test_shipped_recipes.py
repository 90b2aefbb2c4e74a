"""Every shipped recipe runs end to end on a tiny model, as shipped except for a smaller evaluation."""

from __future__ import annotations

import json

import pytest

import llmopt
from llmopt.recipe import ChecksConfig, EvaluationConfig, SpeedConfig, load_recipe, shipped_recipe_names
from tests.conftest import assert_report_matches_schema

SMALL_EVAL = EvaluationConfig(max_tokens=256, window=64, speed=SpeedConfig(prompt_tokens=8, new_tokens=4, runs=1))


@pytest.mark.parametrize("name", shipped_recipe_names())
@pytest.mark.slow
def test_shipped_recipe_runs_on_a_tiny_model(name, tiny_model_dir, tmp_path):
    recipe = load_recipe(name)
    # The checks' thresholds are set for real models; a random one need not meet them. Training passes (distill,
    # qad) run a few steps only: what they do is tested in their own tests.
    passes = [p.model_copy(update={"steps": 3, "eval_every": 3}) if "steps" in type(p).model_fields else p
              for p in recipe.passes]
    recipe = recipe.model_copy(update={"evaluation": SMALL_EVAL, "checks": ChecksConfig(), "passes": passes})
    result = llmopt.optimize(recipe, model=str(tiny_model_dir), output=tmp_path / name)
    report = result.report
    config = json.loads((result.output / "config.json").read_text())
    print(f"{name}: perplexity {report.baseline.perplexity:.1f} -> {report.optimized.perplexity:.1f}, "
          f"size {report.baseline.size_bytes} -> {report.optimized.size_bytes}")
    assert_report_matches_schema(result.output)
    assert report.validation.passed  # an in-memory run always checks its artifact
    assert [p.type for p in report.passes] == [p.type for p in recipe.passes]
    info = {p.type: p.info for p in report.passes}
    assert report.optimized.perplexity > 1 and report.quality.kl_divergence >= 0
    for p in recipe.passes:  # each pass left its mark on the artifact
        if p.type == "gqa":
            assert config["num_key_value_heads"] == p.num_key_value_heads
        if p.type == "prune" and p.method == "depth":
            assert config["num_hidden_layers"] == 2 - len(info["prune"]["removed_layers"])
        if p.type == "prune" and p.method == "width":
            assert config["intermediate_size"] < 128
        if p.type == "distill":
            assert info["distill"]["steps_done"] >= 1


def test_the_readme_lists_every_shipped_recipe_with_its_own_description():
    from pathlib import Path

    from llmopt.recipe import recipes_markdown

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    block = readme[readme.index("<!-- recipes -->\n") + len("<!-- recipes -->\n"):readme.index("<!-- /recipes -->")]
    assert block == recipes_markdown(), "README's recipe table is stale: run `python docs/regenerate.py`"
    assert all(f"| `{name}` |" in block for name in shipped_recipe_names())
