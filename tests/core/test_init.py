"""`llmopt init`: a starting recipe for a model, from flags (CI) or by asking."""

from __future__ import annotations

import pytest
import typer.testing

from llmopt.recipe import load_recipe
from tests.conftest import TINY_VOCAB, build_tiny_tokenizer
from tests.cli.test_cli import assert_clean_error, llmopt


@pytest.mark.slow
def test_init_from_flags_writes_a_recipe_that_validates(tiny_model_dir, tmp_path):
    out = tmp_path / "r.yaml"
    proc = llmopt("init", "--model", str(tiny_model_dir), "--goal", "int4-onnx", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    recipe = load_recipe(out)
    assert recipe.model == str(tiny_model_dir) and recipe.passes[0].type == "quantize"
    assert out.read_text().startswith("# int4")  # the shipped recipe's comments are kept
    assert llmopt("validate", str(out)).returncode == 0
    assert_clean_error(llmopt("init", "--model", str(tiny_model_dir), "--goal", "int4-onnx", "-o", str(out)), 2,
                       "already exists")


def test_group_size_is_lowered_to_fit_the_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "m48"
    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=3, num_key_value_heads=3)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    build_tiny_tokenizer().save_pretrained(folder)
    from llmopt.init import init_recipe

    text = init_recipe(str(folder), "int4-onnx")
    assert "group_size: 16" in text  # 32 does not divide 48
    import llmopt
    from llmopt.errors import RecipeError
    from llmopt.recipe import parse_recipe

    # The shipped recipe as it is (group 32) is refused for this model; the written one plans.
    with pytest.raises(RecipeError, match="group_size"):
        llmopt.validate("int4-onnx", model=str(folder))
    assert llmopt.validate(parse_recipe(text, "r.yaml")).arch.hidden_size == 48


def test_without_a_terminal_missing_flags_are_an_error_not_a_prompt(tiny_model_dir):
    assert_clean_error(llmopt("init", "--model", str(tiny_model_dir)), 2, "needs --model and --goal")
    assert_clean_error(llmopt("init", "--model", str(tiny_model_dir), "--goal", "int9"), 2, "No shipped recipe 'int9'")


def test_on_a_terminal_it_asks(tiny_model_dir, tmp_path, monkeypatch):
    import sys

    from llmopt.cli import app

    monkeypatch.setattr(sys.modules["llmopt.cli.app"], "_can_ask", lambda: True)  # a terminal that can answer
    out = tmp_path / "asked.yaml"
    result = typer.testing.CliRunner().invoke(app, ["init", "-o", str(out)], input=f"{tiny_model_dir}\nprune-width\n")
    assert result.exit_code == 0, result.output
    assert "Goal (one of the recipes above)" in result.output and "int4-onnx" in result.output
    assert load_recipe(out).passes[0].method == "width"


@pytest.mark.parametrize("goal", ["gqa-distill", "draft-model", "sparse-2of4"])
def test_every_kind_of_goal_plans_on_the_tiny_model(goal, tiny_model_dir):
    from llmopt.init import init_recipe

    assert f"model: {tiny_model_dir}" in init_recipe(str(tiny_model_dir), goal)


@pytest.mark.slow
def test_an_unwritable_output_is_a_clear_error(tiny_model_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "r.yaml"  # under a file: no folder can be made there
    assert_clean_error(llmopt("init", "--model", str(tiny_model_dir), "--goal", "int4-onnx", "-o", str(target)), 2,
                       "Cannot write", "no writable folder on the way to it")


@pytest.mark.slow
def test_a_missing_folder_is_created(tiny_model_dir, tmp_path):
    target = tmp_path / "missing-folder" / "r.yaml"
    proc = llmopt("init", "--model", str(tiny_model_dir), "--goal", "int4-onnx", "-o", str(target))
    assert proc.returncode == 0, proc.stderr
    assert target.read_text().splitlines()[1] == f"model: {tiny_model_dir}"
