"""The write-safety rule (llmopt.write_safety): no output overlaps an input or another artifact, whatever the
spelling of the path, and `--force` replaces only what llmopt wrote. Each refusal is checked to leave every
file under the sandbox as it was (`fails_cleanly` hashes the whole tree before and after)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.test_exit_codes import run_main
from tests.core.test_faults import FAST, ckpt, fails_cleanly, previous_artifact, sandbox, write_recipe  # noqa: F401


def optimize_args(sandbox: Path, model: Path, output: Path | str, *extra: str, recipe: Path | None = None) -> tuple:
    recipe = recipe or write_recipe(sandbox)
    return ("optimize", str(recipe), "--model", str(model), "--output", str(output), *extra)


@pytest.mark.parametrize("where", ["model", "model-parent", "inside-model", "model-via-symlink", "model-dotdot"])
def test_output_overlapping_the_model_is_refused_and_the_model_survives(where, monkeypatch, capsys, sandbox, ckpt):
    (sandbox / "sibling.txt").write_text("the user's other file")
    (sandbox / "link").symlink_to(ckpt)
    output = {"model": ckpt, "model-parent": sandbox, "inside-model": ckpt / "sub",
              "model-via-symlink": sandbox / "link", "model-dotdot": ckpt / "sub" / ".."}[where]
    how = {"model": "is the model", "model-parent": "contains the model", "inside-model": "is inside the model",
           "model-via-symlink": "is the model", "model-dotdot": "is the model"}[where]
    fails_cleanly(monkeypatch, capsys, sandbox, 2, (how, "Choose an output outside"),
                  *optimize_args(sandbox, ckpt, output, "--force"))
    assert (ckpt / "model.safetensors").is_file() and (sandbox / "sibling.txt").is_file()


def test_output_inside_an_existing_artifact_is_refused(monkeypatch, capsys, sandbox, ckpt):
    artifact = previous_artifact(sandbox / "out", {"model.safetensors": "weights"})
    fails_cleanly(monkeypatch, capsys, sandbox, 2, ("is inside the artifact", "llmopt verify"),
                  *optimize_args(sandbox, ckpt, artifact / "int4" / "sub"))
    from llmopt.artifact import verify_manifest

    assert verify_manifest(artifact) == []


def test_force_replaces_only_artifacts(monkeypatch, capsys, sandbox, tiny_model_dir):
    """`--output . --force` (or any folder of the user's) is refused before anything runs."""
    work = sandbox / "work"
    work.mkdir()
    (work / "notes.txt").write_text("the user's notes")
    monkeypatch.chdir(work)
    fails_cleanly(monkeypatch, capsys, sandbox, 2, ("is not an llmopt artifact", "holds other files"),
                  *optimize_args(sandbox, tiny_model_dir, ".", "--force"))
    documents = sandbox / "documents"
    documents.mkdir()
    (documents / "thesis.txt").write_text("years of work")
    fails_cleanly(monkeypatch, capsys, sandbox, 2, ("is not an llmopt artifact",),
                  *optimize_args(sandbox, tiny_model_dir, documents, "--force"))


@pytest.mark.parametrize("role", ["evaluation", "calibration", "recipe"])
def test_output_overlapping_data_or_the_recipe_is_refused(role, monkeypatch, capsys, sandbox, ckpt):
    from llmopt.evaluation.text import builtin_text

    data = sandbox / "data"
    data.mkdir()
    text = data / "text.txt"
    text.write_text(builtin_text()[:20000])
    body = ("passes:\n  - type: quantize\n    bits: 4\n    group_size: 16\n    method: gptq\n"
            "export: {format: safetensors}\n" + FAST)
    if role in ("evaluation", "calibration"):
        body = body.replace(f"{role}:\n" if role == "evaluation" else "calibration: {",
                            f"{role}:\n  data: {text}\n" if role == "evaluation" else f"calibration: {{data: {text}, ")
    recipe = data / "r.yaml" if role == "recipe" else sandbox / "r.yaml"
    recipe.write_text(body, encoding="utf-8")
    needle = {"evaluation": "contains evaluation data", "calibration": "contains calibration data",
              "recipe": "contains the recipe"}[role]
    fails_cleanly(monkeypatch, capsys, sandbox, 2, (needle,), *optimize_args(sandbox, ckpt, data, "--force",
                                                                               recipe=recipe))


def test_dry_run_and_validate_run_the_same_output_checks(monkeypatch, capsys, sandbox, ckpt):
    fails_cleanly(monkeypatch, capsys, sandbox, 2, ("contains the model",),
                  *optimize_args(sandbox, ckpt, sandbox, "--force", "--dry-run"))
    recipe = write_recipe(sandbox)
    fails_cleanly(monkeypatch, capsys, sandbox, 2, ("is the model",), "validate", str(recipe), "--model", str(ckpt),
                  "--output", str(ckpt), "--force")
    (sandbox / "file").write_text("x")
    fails_cleanly(monkeypatch, capsys, sandbox, 2, ("no writable folder",),
                  *optimize_args(sandbox, ckpt, sandbox / "file" / "out", "--dry-run"))


@pytest.mark.slow
def test_symlinked_output_is_replaced_through_the_link_and_leaves_nothing(monkeypatch, capsys, sandbox, ckpt):
    from llmopt.artifact import verify_manifest

    target = previous_artifact(sandbox / "real-out", {"model.safetensors": "previous"})
    link = sandbox / "out"
    link.symlink_to(target)
    code, err = run_main(monkeypatch, capsys, *optimize_args(sandbox, ckpt, link, "--force"))
    assert code == 0, err
    assert link.is_symlink() and link.resolve() == target.resolve()  # the link is kept and sees the new artifact
    assert verify_manifest(target) == [] and (target / "report.json").is_file()
    leftovers = [p.name for p in sandbox.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers  # no staging folder or link, no backup, no lock


@pytest.mark.slow
def test_report_files_go_where_asked_never_into_an_input_or_the_artifact(monkeypatch, capsys, sandbox, ckpt):
    out = sandbox / "out"
    fails_cleanly(monkeypatch, capsys, sandbox, 2, ("is inside the output folder",),
                  *optimize_args(sandbox, ckpt, out, "--junit-xml", str(out / "junit.xml")))
    fails_cleanly(monkeypatch, capsys, sandbox, 2, ("is inside the model",),
                  *optimize_args(sandbox, ckpt, out, "--junit-xml", str(ckpt / "model.safetensors")))
    # A folder that does not exist yet is created (as pytest does for --junitxml).
    junit = sandbox / "reports" / "ci" / "junit.xml"
    code, err = run_main(monkeypatch, capsys, *optimize_args(sandbox, ckpt, out, "--junit-xml", str(junit)))
    assert code == 0, err
    assert "<testsuite" in junit.read_text()
    schema = sandbox / "new" / "schema.json"
    code, err = run_main(monkeypatch, capsys, "schema", "--output", str(schema))
    assert code == 0, err
    assert json.loads(schema.read_text())["title"] == "llmopt recipe"
    # compare never writes over a report it reads
    report = out / "report.json"
    fails_cleanly(monkeypatch, capsys, sandbox, 2, ("is a compared report",),
                  "compare", str(report), str(report), "--format", "md", "--output", str(report))
    # init never writes into the model
    fails_cleanly(monkeypatch, capsys, sandbox, 2, ("is inside the model",),
                  "init", "--model", str(ckpt), "--goal", "int4-onnx", "--output", str(ckpt / "config.json"), "--force")


def test_verify_stays_inside_the_artifact(sandbox, monkeypatch, capsys):
    from llmopt.artifact import verify_manifest

    secret = sandbox / "secret.txt"
    secret.write_text("outside")
    artifact = previous_artifact(sandbox / "out", {"model.safetensors": "weights"})
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["files"]["../secret.txt"] = {"sha256": "0" * 64, "bytes": 7}
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    assert verify_manifest(artifact) == ["manifest.json names ../secret.txt, which is outside the artifact"]

    linked = previous_artifact(sandbox / "linked", {"model.safetensors": "weights"})
    (linked / "model.safetensors").unlink()
    (linked / "model.safetensors").symlink_to(secret)
    (linked / "escape").symlink_to(sandbox, target_is_directory=True)
    assert verify_manifest(linked) == ["model.safetensors is a symlink (an artifact holds plain files only)",
                                       "unexpected escape (a symlink)"]
    # A manifest of the wrong shape is a finding, not a crash.
    for bad in ("[1, 2]", '{"files": {"a": {"sha256": "x"}}}', '{"files": 3}', "[" * 100000,
                '{"files": {"\\u0000": {"sha256": "", "bytes": 0}}}'):  # a NUL in a name (found by the fuzzer)
        (linked / "manifest.json").write_text(bad)
        problems = verify_manifest(linked)
        assert problems and all(isinstance(p, str) for p in problems), problems
        code, err = run_main(monkeypatch, capsys, "verify", str(linked))
        assert code == 4 and "Traceback" not in err, err


def test_output_over_a_teacher_is_refused(monkeypatch, capsys, sandbox, ckpt, tiny_model_dir):
    recipe = write_recipe(sandbox, f"passes:\n  - type: distill\n    steps: 1\n    teacher: {ckpt}\n")
    fails_cleanly(monkeypatch, capsys, sandbox, 2, ("is the teacher of passes[0]",),
                  *optimize_args(sandbox, tiny_model_dir, ckpt, "--force", recipe=recipe))
