"""The command line: fast start-up, exit codes, one-paragraph errors, no tracebacks for user mistakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest


def llmopt(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    full_env.pop("LLMOPT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "llmopt", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def assert_clean_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_help_does_not_import_torch_or_transformers():
    code = ("import sys\nfrom llmopt.cli import app\nimport typer.testing\n"
            "r = typer.testing.CliRunner().invoke(app, ['--help'])\nassert r.exit_code == 0, r.output\n"
            "print(sorted(m for m in ('torch', 'transformers', 'optimum', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    start = time.perf_counter()
    proc = llmopt("--help")
    elapsed = time.perf_counter() - start
    print(f"llmopt --help: {elapsed:.2f} s")
    assert proc.returncode == 0 and "optimize" in proc.stdout


def test_switches_are_not_shown_as_taking_a_value():
    """`--force` takes no value, so --help must not print `<bool>` beside it (typer's default for a bool option);
    typer's own --help keeps its marker, which llmopt does not declare."""
    for command in ("optimize", "validate", "inspect", "compare", "init", "schema", "verify"):
        proc = llmopt(command, "--help", env={"COLUMNS": "160"})
        assert proc.returncode == 0, proc.stderr
        marked = [line for line in proc.stdout.splitlines() if "<bool>" in line and "--help" not in line]
        assert not marked, (command, marked)


def test_recipe_error_exit_2_with_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("passes:\n  - type: quantize\n    bitz: 4\n")
    proc = llmopt("validate", str(recipe), "--model", "demo")
    assert_clean_error(proc, 2, "bad.yaml:3", "passes[0].bitz", "Did you mean 'bits'?")


def test_missing_model_exit_3(tmp_path):
    proc = llmopt("validate", "int4-onnx", "--model", str(tmp_path / "nope"))
    assert_clean_error(proc, 3, "is not an existing folder")


def test_pickle_only_checkpoint_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    proc = llmopt("validate", "int4-onnx", "--model", str(tmp_path))
    assert_clean_error(proc, 3, "pickle", "--allow-pickle")


def test_remote_code_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {"AutoModel": "x.Y"}}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    proc = llmopt("validate", "int4-onnx", "--model", str(tmp_path))
    assert_clean_error(proc, 3, "trust_remote_code")


def test_uncached_hub_id_offline_fails_fast(tmp_path):
    start = time.perf_counter()
    proc = llmopt("validate", "int4-onnx", "--model", "no-such-org/no-such-model",
                  env={"HF_HOME": str(tmp_path / "hf")})
    elapsed = time.perf_counter() - start
    assert_clean_error(proc, 3, "not in the local cache")
    assert elapsed < 30, elapsed


@pytest.mark.slow
def test_validate_plans_without_loading_weights(tiny_model_dir):
    proc = llmopt("validate", "int4-onnx", "--model", str(tiny_model_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan == {"valid": True, "recipe": plan["recipe"], "model": str(tiny_model_dir), "model_type": "llama",
                    "passes": ["quantize"], "export": "onnx"}


@pytest.mark.slow
def test_validate_checks_passes_against_architecture(tiny_model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - type: quantize\n    group_size: 128\n")  # hidden_size is 64
    proc = llmopt("validate", str(recipe), "--model", str(tiny_model_dir))
    assert_clean_error(proc, 2, "passes[0].group_size: 128 does not divide")


def test_recipes_list_and_show():
    listing = llmopt("recipes")
    assert listing.returncode == 0 and "int4-onnx" in listing.stdout and "int4-safetensors" in listing.stdout
    shown = llmopt("recipes", "show", "int4-onnx")
    assert shown.returncode == 0 and "type: quantize" in shown.stdout
    assert_clean_error(llmopt("recipes", "show", "nope"), 2, "No recipe")


def test_existing_output_needs_force(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous artifact")
    proc = llmopt("optimize", "int4-onnx", "--model", str(tiny_model_dir), "--output", str(out))
    assert_clean_error(proc, 2, "already exists", "--force")
    assert (out / "keep.txt").read_text() == "previous artifact"
