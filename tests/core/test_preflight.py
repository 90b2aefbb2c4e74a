"""Pre-flight: a run that cannot fit in memory or on disk is refused before anything starts (exit 5)."""

from __future__ import annotations

from collections import namedtuple

import pytest

from llmopt import preflight
from llmopt.pipeline import plan
from tests.cli.test_exit_codes import run_main

Usage = namedtuple("Usage", "total used free")


def test_the_estimate_counts_parameters_and_copies(tiny_model_dir, fast_recipe, tmp_path):
    from tests.conftest import tiny_llama

    parameters = sum(p.numel() for p in tiny_llama().parameters())
    found = preflight.estimate(plan(fast_recipe(), model=str(tiny_model_dir)), tmp_path / "o")
    assert found.parameters == parameters
    assert found.memory_bytes == 4 * parameters * 3  # working model + baseline and artifact for evaluation
    # The baseline export; the artifact; no resume checkpoint without passes.
    assert (found.temp_disk_bytes, found.output_disk_bytes) == (4 * parameters, 4 * parameters)
    assert found.fits_memory and found.fits_disk
    teacher = preflight.estimate(plan(fast_recipe("passes:\n  - {type: distill, steps: 2}\n", name="d.yaml"),
                                      model=str(tiny_model_dir)), tmp_path / "o")
    assert teacher.memory_bytes == 4 * parameters * 4  # + the teacher's copy
    assert teacher.output_disk_bytes == 4 * parameters * 2  # + the distilled model's resume checkpoint


def test_too_little_memory_exits_5_before_anything_starts(tiny_model_dir, fast_recipe, tmp_path, monkeypatch, capsys):
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("M", (), {"available": 1000})())
    code, err = run_main(monkeypatch, capsys, "optimize", str(fast_recipe()), "--model", str(tiny_model_dir),
                         "-o", str(tmp_path / "o"))
    assert code == 5 and "MB of memory" in err and "evaluation.enabled: false" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.yaml"]  # no staging, no lock left behind
    monkeypatch.setenv(preflight.SKIP_ENV, "1")  # the escape hatch the message names
    preflight.check(preflight.estimate(plan(fast_recipe(), model=str(tiny_model_dir)), tmp_path / "o"))


def test_too_little_disk_fails_the_dry_run_after_showing_the_plan(tiny_model_dir, fast_recipe, tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 100, 100))
    code, err = run_main(monkeypatch, capsys, "optimize", str(fast_recipe()), "--model", str(tiny_model_dir),
                         "-o", str(tmp_path / "o"), "--dry-run", "--json")
    assert code == 5 and "This run writes about" in err and "TMPDIR" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("same_disk, free_output, free_temp, fits", [
    (True, 99, 10**9, False), (True, 10**9, 0, True), (False, 60, 60, True), (False, 60, 40, False),
    (False, 40, 60, False)])
def test_disk_needs_add_up_only_on_one_file_system(same_disk, free_output, free_temp, fits):
    found = preflight.Estimate(parameters=1, memory_bytes=0, available_memory_bytes=1, output_disk_bytes=50,
                               temp_disk_bytes=50,
                               free_output_bytes=free_output, free_temp_bytes=free_temp, same_disk=same_disk)
    assert found.fits_disk is fits


@pytest.mark.parametrize("evaluates,teacher", [(True, False), (False, False), (False, True)])
def test_the_memory_hint_offers_only_what_applies(evaluates, teacher):
    from llmopt.errors import ResourceError

    need = preflight.Estimate(parameters=10**9, memory_bytes=12 * 10**9, available_memory_bytes=900 * 10**6,
                              output_disk_bytes=0, temp_disk_bytes=0, free_output_bytes=10**12,
                              free_temp_bytes=10**12, same_disk=True, evaluates=evaluates, has_teacher=teacher)
    with pytest.raises(ResourceError) as refused:
        preflight.check(need)
    print(refused.value)
    assert "needs about 12.0 GB of memory" in refused.value.message and "900.0 MB is available" in refused.value.message
    assert ("evaluation.enabled: false" in refused.value.hint) == evaluates
    assert ("rop distillation's teacher" in refused.value.hint) == teacher  # first in the sentence: capitalised
