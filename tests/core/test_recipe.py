"""Recipe parsing: errors name file, key path and line, and suggest the closest valid name."""

from __future__ import annotations

import re

import pytest

from llmopt.errors import RecipeError
from llmopt.passes import PASSES
from llmopt.recipe import load_recipe, parse_recipe, shipped_recipe_names


def error_of(text: str) -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, where="r.yaml")
    assert info.value.exit_code == 2
    return str(info.value)


def test_defaults():
    recipe = parse_recipe("passes:\n  - type: quantize\n", "r.yaml")
    q = recipe.passes[0]
    assert (q.method, q.bits, q.group_size, q.symmetric) == ("rtn", 4, 32, True)
    assert recipe.export.format == "onnx" and recipe.seed == 0 and recipe.allow_pickle is False


def test_misspelt_pass_key_names_line_path_and_suggestion():
    msg = error_of("seed: 1\npasses:\n  - type: quantize\n    bitz: 4\n")
    assert "r.yaml:4" in msg and "passes[0].bitz" in msg and "Did you mean 'bits'?" in msg


def test_unknown_pass_type_suggests_closest():
    msg = error_of("passes:\n  - type: quantise\n")
    assert "r.yaml:2" in msg and "unknown pass type 'quantise'" in msg and "Did you mean 'quantize'?" in msg


@pytest.mark.parametrize("passes,message", [
    ([{"type": "quantize", "bitz": 4}], "passes[0].bitz: unknown key 'bitz'. Did you mean 'bits'?"),
    ([{"type": "quantise"}], "passes[0].type: unknown pass type 'quantise'. Did you mean 'quantize'?"),
    (["quantize"], "passes[0] needs a 'type'"),
])
def test_the_python_api_refuses_a_bad_pass_as_yaml_does(passes, message):
    """Recipe(passes=[...]) from Python validates each pass by its type's config: a RecipeError (exit 2) at once,
    not an AttributeError (exit 70) in plan()."""
    from llmopt.recipe import Recipe

    with pytest.raises(RecipeError) as info:
        Recipe(passes=passes)
    print(info.value)
    assert message in str(info.value) and ".." not in str(info.value)
    assert Recipe(passes=[{"type": "quantize", "bits": 8}]).passes[0].bits == 8


def test_misspelt_top_level_and_nested_keys():
    assert "Did you mean 'evaluation'?" in error_of("evaluaton: {}\n")
    msg = error_of("export:\n  formt: onnx\n")
    assert "r.yaml:2" in msg and "export.formt" in msg and "Did you mean 'format'?" in msg


def test_bad_value_says_what_was_expected():
    msg = error_of("passes:\n  - type: quantize\n    bits: 3\n")
    assert "passes[0].bits" in msg and "r.yaml:3" in msg and "4 or 8" in msg
    assert "power of two" in error_of("passes:\n  - type: quantize\n    group_size: 48\n")
    assert "'onnx' or 'safetensors'" in error_of("export: {format: tflite}\n")


def test_yaml_syntax_error_has_a_line():
    assert "r.yaml:2" in error_of("passes:\n\t- type: quantize\n")


def test_safe_loading_refuses_python_tags():
    assert "not valid YAML" in error_of("model: !!python/object/apply:os.system ['echo hi']\n")


def test_shipped_recipes_load_by_name():
    names = shipped_recipe_names()
    assert {"int4-onnx", "int4-safetensors"} <= set(names)
    for name in names:
        load_recipe(name)
    assert load_recipe("int4-onnx").export.format == "onnx"


def test_unknown_recipe_name_suggests():
    with pytest.raises(RecipeError, match="Did you mean 'int4-onnx'"):
        load_recipe("int4-onx")


def test_every_pass_is_documented_tested_and_used_by_a_shipped_recipe():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    used = {p.type for name in shipped_recipe_names() for p in load_recipe(name).passes}
    for pass_type, cls in PASSES.items():
        assert cls.type == pass_type and (root / "passes" / f"{pass_type}.py").is_file()
        assert (root / "tests" / "passes" / f"test_{pass_type}.py").is_file(), pass_type
        assert cls.__doc__ and len(cls.__doc__) > 40, f"{pass_type} needs a docstring"
        assert pass_type in used, f"no shipped recipe uses {pass_type}"


@pytest.mark.parametrize("text,message", [
    ("", "the recipe is empty"),
    ("   \n# only a comment\n", "the recipe is empty"),
    ("a: &x [1, 2]\nb: [*x, *x]\n", "YAML aliases (*name) are not allowed"),
    ("seed: 0\n" + "# padding\n" * 120_000, "larger than 1 MiB"),
])
def test_empty_huge_and_aliased_recipes_are_refused(text, message, tmp_path):
    with pytest.raises(RecipeError, match=re.escape(message)):
        parse_recipe(text)
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(path)


def test_a_billion_laughs_is_refused_quickly():
    import time

    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
    started = time.perf_counter()
    with pytest.raises(RecipeError, match="aliases"):
        parse_recipe(bomb)
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("text,message", [
    ("seed: 1\nseed: 2\n", "r.yaml:2: seed: the key 'seed' appears twice in one mapping (first on line 1)"),
    ("passes:\n  - type: quantize\n    bits: 4\n    bits: 8\n", "r.yaml:4: passes[0].bits: the key 'bits' appears twice"),
    ("checks: {max_kl: .nan}\n", "checks.max_kl: Input should be a finite number (got nan)"),
    ("checks: {min_decode_speedup: .inf}\n", "checks.min_decode_speedup: Input should be a finite number"),
    ("passes:\n  - type: quantize\n    damp: .inf\n", "passes[0].damp: Input should be a finite number"),
    ("seed: -1\n", "seed: Input should be greater than or equal to 0 (got -1)"),
    ("seed: 18446744073709551616\n", "seed: Input should be less than or equal to 4294967295"),
], ids=["duplicate-top-level", "duplicate-in-a-pass", "nan-threshold", "inf-threshold", "inf-setting",
        "negative-seed", "seed-2**64"])
def test_what_yaml_or_numbers_would_let_through_is_refused(text, message):
    """PyYAML keeps the last of two equal keys and NaN compares false with everything: both would pass
    `validate` and then surprise every run. numpy takes seeds below 2**32 only."""
    with pytest.raises(RecipeError) as refused:
        parse_recipe(text, where="r.yaml")
    print(refused.value)
    assert message in str(refused.value)
