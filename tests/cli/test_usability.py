"""inspect, schema, generated pass docs, dry run, model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.test_cli import assert_clean_error, llmopt

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_inspect_reads_headers_only(tiny_model_dir):
    proc = llmopt("inspect", str(tiny_model_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    # tiny Llama: embed 384x64, lm_head 384x64, per layer q,o 64x64, k,v 32x64, mlp 3x128x64, 2 norms of 64
    per_layer_attention = 2 * 64 * 64 + 2 * 32 * 64
    assert info["parameters_by_module_type"] == {
        "mlp": 2 * 3 * 128 * 64, "attention": 2 * per_layer_attention, "embedding": 384 * 64,
        "lm_head": 384 * 64, "norm": 2 * 2 * 64 + 64,
    }
    assert info["parameters"] == sum(info["parameters_by_module_type"].values())
    assert info["kv_cache_bytes_per_token_fp32"] == 2 * 2 * 2 * 16 * 4  # k+v, layers, kv heads, head_dim, fp32
    assert info["passes"]["quantize"] == "applies" and info["exporters"]["onnx"] == "supported"
    human = llmopt("inspect", str(tiny_model_dir))
    assert human.returncode == 0 and "KV cache per token" in human.stdout


def test_schema_validates_shipped_recipes_and_rejects_typos():
    import jsonschema
    import yaml

    proc = llmopt("schema")
    schema = json.loads(proc.stdout)
    validator = jsonschema.Draft202012Validator(schema)
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        errors = list(validator.iter_errors(yaml.safe_load(recipe.read_text())))
        assert not errors, (recipe.name, errors[:1])
    bad = {"passes": [{"type": "quantize", "bitz": 4}]}
    assert list(validator.iter_errors(bad)), "a misspelt pass key must fail schema validation"


def test_pass_docs_are_generated_from_the_configs():
    proc = llmopt("schema", "--docs")
    assert proc.returncode == 0
    committed = (ROOT / "docs" / "passes.md").read_text()
    assert proc.stdout == committed, "docs/passes.md is stale: run `python docs/regenerate.py`"
    assert "| `group_size` | integer | `32` |" in committed


def test_the_readme_lists_every_pass_from_its_docstring():
    from llmopt.passes import PASSES
    from llmopt.schema import pass_list_markdown

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme[readme.index("<!-- passes -->\n") + len("<!-- passes -->\n"):readme.index("<!-- /passes -->")]
    assert block == pass_list_markdown(), "README's pass list is stale: run `python docs/regenerate.py`"
    assert [line.split("`")[1] for line in block.splitlines()] == list(PASSES)


def test_report_schema_file_is_generated_from_the_report_model():
    proc = llmopt("schema", "--report")
    assert proc.returncode == 0
    committed = (ROOT / "docs" / "report.schema.json").read_text()
    assert proc.stdout == committed, "docs/report.schema.json is stale: run `python docs/regenerate.py`"
    assert '"schema_version"' in committed and '"intervals"' in committed


@pytest.mark.slow
def test_dry_run_prints_the_plan_and_writes_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "deep" / "out"
    proc = llmopt("optimize", "int4-onnx", "--model", str(tiny_model_dir), "--output", str(out), "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["passes"][0]["type"] == "quantize" and plan["parameters"] > 0
    assert plan["estimated_peak_memory_mb"] >= plan["parameters"] * 4 / 1e6
    assert not (tmp_path / "deep").exists()
    text = llmopt("optimize", "int4-onnx", "--model", str(tiny_model_dir), "--output", str(out), "--dry-run").stdout
    print(text)
    # The plan as a recipe spells it: no Python reprs (None, {'...'}), the gates with their sense.
    assert '1. quantize (method: "rtn", bits: 4, group_size: 32, symmetric: false, embeddings: true)' in text
    assert "checks: max_perplexity_increase_pct ≤ 50.0, min_top1_agreement ≥ 0.6" in text
    assert "None" not in text and "{'" not in text
    out.mkdir(parents=True)
    assert_clean_error(llmopt("optimize", "int4-onnx", "--model", str(tiny_model_dir), "--output", str(out),
                              "--dry-run"), 2, "already exists")


@pytest.mark.slow
def test_artifact_has_a_model_card(tiny_model_dir, fast_recipe, tmp_path):
    import llmopt as api

    result = api.optimize(fast_recipe("passes:\n  - type: quantize\n    group_size: 16\nexport: {format: safetensors}\n"),
                          model=str(tiny_model_dir), output=tmp_path / "o")
    card = (result.output / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\ntags:\n- llmopt\n- safetensors\n- quantize\n---")
    assert f"| perplexity | {result.report.baseline.perplexity:,.3f} | {result.report.optimized.perplexity:,.3f} |" in card
    assert "type: quantize" in card
    # It names the model and compares with the files the user started from, not only the float32 export.
    assert f"# {tiny_model_dir.name} — optimized with llmopt" in card
    given = sum(p.stat().st_size for p in tiny_model_dir.glob("*.safetensors"))
    assert f"The input model's weight files take {given / 1e6:.1f} MB on disk" in card
    assert "README.md" in json.loads((result.output / "manifest.json").read_text())["files"]


def test_docs_regenerate_rewrites_a_stale_readme_block():
    import runpy

    regenerate = runpy.run_path(str(ROOT / "docs" / "regenerate.py"))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = regenerate["readme_blocks"]()
    assert regenerate["with_blocks"](readme, blocks) == readme  # the committed README is current
    stale = readme.replace(blocks["passes"], "- `quantize`: an old line\n")
    assert stale != readme and regenerate["with_blocks"](stale, blocks) == readme
