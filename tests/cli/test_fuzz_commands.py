"""Property tests through the user-facing commands (in process, as the `llmopt` executable runs them):
generated configs, recipes, manifests, reports and output paths never end in exit 70 ("internal error") or a
traceback, and a dry run never changes a file. Each test prints how many inputs it ran."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cli.test_exit_codes import run_main
from tests.core.test_faults import tree

# database=None: no .hypothesis folder in the working tree; deadline=None: a shared 2-core machine is not a timer.
COMMANDS = settings(max_examples=100, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])
USER_CODES = {0, 1, 2, 3, 4, 5}

json_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
CONFIG_KEYS = ["model_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
               "intermediate_size", "vocab_size", "head_dim", "rope_scaling", "rope_theta", "rms_norm_eps",
               "tie_word_embeddings", "max_position_embeddings", "torch_dtype", "architectures", "auto_map"]


def clean_exit(monkeypatch, capsys, *args: str) -> int:
    code, err = run_main(monkeypatch, capsys, *args)
    assert code in USER_CODES, (code, err)
    assert "Traceback" not in err and "Internal error" not in err, err
    return code


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("fuzz-commands")
    shutil.copytree(tiny_model_dir, root / "model")
    (root / "r.yaml").write_text("passes:\n  - type: quantize\n    bits: 4\n    group_size: 16\n")
    return root


def test_any_config_through_validate_and_inspect(monkeypatch, capsys, fuzz_root):
    model = fuzz_root / "model"
    original = json.loads((model / "config.json").read_text())
    runs = 0

    @COMMANDS
    @given(st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values, max_size=4)
           | st.builds(lambda v: {"__whole__": v}, json_values))
    def check(changes):
        nonlocal runs
        runs += 1
        config = changes["__whole__"] if "__whole__" in changes else {**original, **changes}
        (model / "config.json").write_text(json.dumps(config))
        clean_exit(monkeypatch, capsys, "validate", str(fuzz_root / "r.yaml"), "--model", str(model))
        clean_exit(monkeypatch, capsys, "inspect", str(model))

    try:
        check()
    finally:
        (model / "config.json").write_text(json.dumps(original))
    print(f"{runs} configs")


def test_any_recipe_text_through_validate(monkeypatch, capsys, fuzz_root):
    runs = 0
    keys = st.sampled_from(["seed", "passes", "export", "evaluation", "calibration", "checks", "model", "type",
                            "bits", "group_size", "method", "format", "data", "max_kl", "enabled", "teacher"])
    values = st.recursive(json_scalars | st.sampled_from(["quantize", "prune", "gqa", "distill", "builtin", "onnx"]),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4),
                          max_leaves=15)

    @COMMANDS
    @given(st.dictionaries(keys, values, max_size=5) | st.text(max_size=200))
    def check(data):
        nonlocal runs
        runs += 1
        import yaml

        text = data if isinstance(data, str) else yaml.safe_dump(data, allow_unicode=True)
        path = fuzz_root / "fuzz.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        clean_exit(monkeypatch, capsys, "validate", str(path), "--model", str(fuzz_root / "model"))

    check()
    print(f"{runs} recipes")


def test_any_manifest_through_verify(monkeypatch, capsys, fuzz_root):
    artifact = fuzz_root / "artifact"
    artifact.mkdir(exist_ok=True)
    (artifact / "model.safetensors").write_bytes(b"weights")
    names = st.sampled_from(["model.safetensors", "../r.yaml", "/etc/hostname", "", ".", "sub/x", "manifest.json"])
    entries = st.dictionaries(names | st.text(max_size=10), json_values | st.fixed_dictionaries(
        {"sha256": st.text(max_size=64), "bytes": st.integers(-5, 10)}), max_size=4)
    runs = 0

    @COMMANDS
    @given(json_values | st.fixed_dictionaries({"files": entries}))
    def check(manifest):
        nonlocal runs
        runs += 1
        (artifact / "manifest.json").write_text(json.dumps(manifest))
        assert clean_exit(monkeypatch, capsys, "verify", str(artifact)) in (0, 3, 4)

    check()
    print(f"{runs} manifests")


def test_any_report_through_compare(monkeypatch, capsys, fuzz_root):
    runs = 0

    @COMMANDS
    @given(json_values | st.fixed_dictionaries({"schema_version": st.integers(0, 5) | json_values}),
           st.sampled_from(["table", "md", "json", "html"]))
    def check(report, fmt):
        nonlocal runs
        runs += 1
        path = fuzz_root / "fuzzed-report.json"
        path.write_text(json.dumps(report))
        clean_exit(monkeypatch, capsys, "compare", str(path), str(path), "--format", fmt)

    check()
    (fuzz_root / "fuzzed-report.json").write_text("[" * 50_000 + "]" * 50_000)  # nested past Python's recursion limit
    assert clean_exit(monkeypatch, capsys, "compare", str(fuzz_root / "fuzzed-report.json"), str(fuzz_root / "fuzzed-report.json")) == 3
    print(f"{runs} reports")


def test_any_output_path_through_a_dry_run(monkeypatch, capsys, fuzz_root):
    """Dry runs with outputs spelled every way (the model, its parent, `..`, symlinks, files, artifacts, missing
    folders): a clean exit, and not one file of the tree changed."""
    sandbox = fuzz_root / "paths"
    sandbox.mkdir(exist_ok=True)
    (sandbox / "file").write_text("x")
    artifact = sandbox / "artifact"
    if not artifact.exists():
        from llmopt.artifact import write_manifest

        artifact.mkdir()
        (artifact / "model.onnx").write_text("x")
        write_manifest(artifact, recipe={}, versions={}, seed=0)
        (sandbox / "link-to-model").symlink_to(fuzz_root / "model")
    monkeypatch.chdir(sandbox)
    parts = st.sampled_from([".", "..", "file", "artifact", "link-to-model", "new", "sub", str(fuzz_root / "model"),
                             str(fuzz_root), "~", "/", "model.safetensors"])
    runs = 0
    before = tree(fuzz_root)

    @COMMANDS
    @given(st.lists(parts, min_size=1, max_size=4), st.booleans(), st.booleans())
    def check(path_parts, force, junit):
        nonlocal runs
        runs += 1
        output = str(Path(*path_parts))
        extra = ["--force"] * force + ["--junit-xml", str(Path(output) / "junit.xml")] * junit
        clean_exit(monkeypatch, capsys, "optimize", str(fuzz_root / "r.yaml"), "--model", str(fuzz_root / "model"),
                   "--output", output, "--dry-run", *extra)

    check()
    assert tree(fuzz_root) == before
    print(f"{runs} output paths")
