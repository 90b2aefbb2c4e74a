"""Every documented exit code is reachable, with a one-paragraph message and no traceback."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.cli.test_cli import assert_clean_error, llmopt

INT4 = ("passes:\n  - type: quantize\n    bits: 4\n    group_size: 16\nexport: {format: safetensors}\n"
        "evaluation:\n  max_tokens: 256\n  window: 64\n  speed: {prompt_tokens: 8, new_tokens: 4, runs: 1}\n")


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """The CLI entry point in this process (so a fault can be injected), returning (exit code, stderr)."""
    from llmopt.cli import main

    monkeypatch.setattr(sys, "argv", ["llmopt", *args])
    monkeypatch.delenv("LLMOPT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as stop:
        main()
    return stop.value.code, capsys.readouterr().err


def test_0_success_and_2_recipe_error(tmp_path):
    assert llmopt("recipes").returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes:\n  - type: quantise\n")
    assert_clean_error(llmopt("validate", str(bad), "--model", "demo"), 2, "Did you mean 'quantize'")


def test_3_input_rejected(tmp_path):
    assert_clean_error(llmopt("inspect", str(tmp_path / "nowhere")), 3, "not an existing folder")


def test_5_disk_full_while_writing_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from llmopt.exporters.safetensors import SafetensorsExporter

    def full(self, state, folder):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))

    monkeypatch.setattr(SafetensorsExporter, "export", full)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(INT4)
    code, err = run_main(monkeypatch, capsys, "optimize", str(recipe), "--model", str(tiny_model_dir),
                         "--output", str(tmp_path / "out"))
    assert code == 5 and "disk is full" in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # no output, no staging folder


def test_70_internal_error_says_it_is_a_bug(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from llmopt.passes.quantize import QuantizePass

    def broken(self, state, ctx):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(QuantizePass, "run", broken)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(INT4)
    code, err = run_main(monkeypatch, capsys, "optimize", str(recipe), "--model", str(tiny_model_dir),
                         "--output", str(tmp_path / "out"))
    assert code == 70 and "This is a bug in llmopt" in err and "LLMOPT_DEBUG=1" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "Interrupted"), (signal.SIGTERM, 143, "Terminated")])
@pytest.mark.slow
def test_130_and_143_a_signal_mid_run_removes_its_staging_folder(sig, code, word, tiny_model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(INT4)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "llmopt", "optimize", str(recipe), "--model", str(tiny_model_dir),
                             "--output", str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env,
                            # A test run started in the background (`cmd &`) ignores SIGINT, and a child inherits
                            # that: give the child the default, as a terminal's Ctrl-C finds it.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".out.staging-") for p in tmp_path.iterdir()):  # the run is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code and word in err and "Traceback" not in err, (proc.returncode, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # no output, staging or lock left


def test_two_runs_on_one_output_the_second_is_refused(tiny_model_dir, tmp_path):
    import llmopt
    from llmopt.errors import RecipeError

    recipe = tmp_path / "r.yaml"
    recipe.write_text(INT4)
    lock = tmp_path / ".out.lock"
    lock.write_text(str(os.getpid()))  # a live run holds the output
    with pytest.raises(RecipeError, match=rf"Another llmopt run \(pid {os.getpid()}\) is writing"):
        llmopt.optimize(recipe, model=str(tiny_model_dir), output=tmp_path / "out")
    assert not (tmp_path / "out").exists() and lock.read_text() == str(os.getpid())

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(str(gone.pid))  # a run that was killed: its lock is stale and taken over
    result = llmopt.optimize(recipe, model=str(tiny_model_dir), output=tmp_path / "out")
    assert result.output.is_dir() and not lock.exists()
