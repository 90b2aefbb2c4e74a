"""SIGKILL at any point of `llmopt optimize --force` never damages the previous artifact, and what a killed run
leaves behind (staging folder, lock, scratch folder in TMPDIR) neither stops nor litters the next run.

A SIGKILL cannot be caught, so none of llmopt's cleanup runs: the guarantee must come from the order of the
file-system steps alone. The kill points are spread over the measured length of one run, plus points set off by
the file system at the moments that matter most: the export writing into staging, the report written (the staging
folder nearly complete), the manifest written (the swap follows at once) and the swap just done.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cli.test_exit_codes import run_main

FORMATS = ("onnx", "safetensors")
MODEL_FILE = {"onnx": "model.onnx", "safetensors": "model.safetensors"}
# The previous artifact: int4 RTN, seed 0. The killed runs: int8, seed 1, so the artifact they would write differs in
# its weights. No evaluation: the runs spend their time writing files, not measuring (and the test stays short).
RECIPE = ("seed: {seed}\npasses:\n  - type: quantize\n    bits: {bits}\n    group_size: 16\n"
          "export: {{format: {format}}}\nevaluation: {{enabled: false}}\n")
# Fractions of a run's length (measured by the first round), interleaved between the two formats, which run side by
# side (half the wall time): 8 distinct points of the same sequence of steps; its end is covered by the file-system
# triggers.
FRACTIONS = {"onnx": (0.15, 0.35, 0.55, 0.75), "safetensors": (0.25, 0.45, 0.65, 0.85)}


def tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def debris(folder: Path, temp: Path) -> list[str]:
    """What runs left beside `folder/out`, and their scratch folders in the temp folder."""
    beside = [p.name for p in folder.iterdir() if p.name.startswith(".out.")]
    return sorted(beside + [f"TMPDIR/{p.name}" for p in temp.iterdir() if p.name.startswith("llmopt-")])


def owners(names: list[str], kind: str) -> set[int]:
    """Pids in the names of staging folders (kind 'staging') or scratch folders (kind 'scratch')."""
    pattern = r"\.out\.staging-(\d+)-" if kind == "staging" else r"TMPDIR/llmopt-(\d+)-"
    return {int(m.group(1)) for m in map(re.compile(pattern).match, names) if m}


class Run:
    """`llmopt optimize RECIPE --output FOLDER/out --force` in a child process, its temp folder in the sandbox."""

    def __init__(self, folder: Path, recipe: Path, model: Path, temp: Path) -> None:
        self.folder, self.out = folder, folder / "out"
        self.previous_inode = self.out.stat().st_ino if self.out.exists() else None
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(temp)}
        env.pop("LLMOPT_DEBUG", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "llmopt", "optimize", str(recipe), "--model", str(model),
                                      "--output", str(self.out), "--force"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.started = time.monotonic()
        self.ended_after: float | None = None  # set by kill_round when the run ends before its kill

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def staging_has(self, name: str) -> bool:
        """Whether this run's staging folder holds `name` (not a killed run's: that may hold a whole artifact)."""
        return any((p / name).exists() for p in self.folder.glob(f".out.staging-{self.proc.pid}-*"))

    def swapped(self) -> bool:
        try:
            return self.out.stat().st_ino != self.previous_inode
        except FileNotFoundError:  # between the two renames of promote's fallback: a kill point too
            return True

    def finish(self) -> None:
        _, err = self.proc.communicate(timeout=300)
        assert self.proc.returncode == 0, err


Trigger = Callable[[Run, float], bool]  # (run, one run's length in seconds) -> kill now?


def after_seconds(seconds: float) -> tuple[str, Trigger]:
    return f"{seconds} s", lambda run, length: run.elapsed() >= seconds


FRACTION_LABEL = "of a run"


def after_fraction(fraction: float) -> tuple[str, Trigger]:
    return f"{fraction:.2f} {FRACTION_LABEL}", lambda run, length: run.elapsed() >= fraction * length


def when_staging_has(what: str, name: str) -> tuple[str, Trigger]:
    return what, lambda run, length: run.staging_has(name)


SWAP_DONE = ("swap done", lambda run, length: run.swapped())


def kill_round(runs: dict[str, Run], triggers: dict[str, tuple[str, Trigger]],
               length: dict[str, float]) -> dict[str, float | None]:
    """SIGKILL each run when its trigger fires (polled every millisecond); the seconds it ran, None if it ended
    first."""
    killed: dict[str, float | None] = {}
    while len(killed) < len(runs):
        for fmt, run in runs.items():
            if fmt in killed:
                continue
            if run.proc.poll() is not None:
                killed[fmt], run.ended_after = None, run.elapsed()
            elif triggers[fmt][1](run, length.get(fmt, 0.0)):
                run.proc.send_signal(signal.SIGKILL)
                killed[fmt] = run.elapsed()
        time.sleep(0.001)
    for run in runs.values():
        run.proc.wait(timeout=60)
        run.proc.stderr.close()
    return killed


def exchange_supported(folder: Path) -> bool:
    from llmopt.artifact import _exchange

    a, b = folder / "a", folder / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").touch()
    try:
        return _exchange(a, b) and (b / "x").exists()
    finally:
        shutil.rmtree(a)
        shutil.rmtree(b)


@pytest.mark.slow
def test_sigkill_at_any_point_keeps_the_previous_artifact(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from llmopt.artifact import check_destination

    temp = tmp_path / "temp"
    temp.mkdir()
    atomic = exchange_supported(tmp_path)  # where not, promote's fallback: two renames, undone by the next run
    folders, old_recipe, new_recipe = {}, {}, {}
    for fmt in FORMATS:
        folders[fmt] = tmp_path / fmt
        folders[fmt].mkdir()
        old_recipe[fmt] = tmp_path / f"old-{fmt}.yaml"
        old_recipe[fmt].write_text(RECIPE.format(seed=0, bits=4, format=fmt), encoding="utf-8")
        new_recipe[fmt] = tmp_path / f"new-{fmt}.yaml"
        new_recipe[fmt].write_text(RECIPE.format(seed=1, bits=8, format=fmt), encoding="utf-8")
    # The good artifact A of each format, and a copy to start every kill point from it.
    t0 = time.monotonic()
    runs = {fmt: Run(folders[fmt], old_recipe[fmt], tiny_model_dir, temp) for fmt in FORMATS}
    for run in runs.values():
        run.finish()
    previous = {fmt: tree(folders[fmt] / "out") for fmt in FORMATS}
    for fmt in FORMATS:
        shutil.copytree(folders[fmt] / "out", tmp_path / f"previous-{fmt}")

    # The first round (killed at the swap) measures a run's length for the time-based points. The last one (killed
    # while the export writes into staging) leaves a staging folder, a lock and a scratch folder behind.
    schedule = {fmt: [after_seconds(0.2), *map(after_fraction, FRACTIONS[fmt]),
                      when_staging_has("report written", "report.json"),
                      when_staging_has("export writing", MODEL_FILE[fmt])] for fmt in FORMATS}
    # The manifest is written microseconds before the swap: if the poll misses that instant, kill just after it.
    manifest_written = ("manifest written", lambda run, length: run.staging_has("manifest.json") or run.swapped())
    rounds = [{"onnx": SWAP_DONE, "safetensors": manifest_written}]
    rounds += [dict(zip(FORMATS, pair)) for pair in zip(*(schedule[fmt] for fmt in FORMATS))]
    t1 = time.monotonic()
    length: dict[str, float] = {}
    new_model: dict[str, str] = {}
    outcomes = []
    retried: list[dict] = []
    for triggers in rounds:  # grows by the retries below
        runs = {fmt: Run(folders[fmt], new_recipe[fmt], tiny_model_dir, temp) for fmt in FORMATS}
        killed = kill_round(runs, triggers, length)
        pids = {run.proc.pid for run in runs.values()}
        for fmt, run in runs.items():
            where = f"{fmt}, kill at {triggers[fmt][0]}"
            out = run.out
            if not out.exists() and not atomic:  # killed between promote's two renames: the next run restores
                check_destination(out, force=True)
                where += " (restored from the backup)"
            assert out.is_dir(), f"{where}: the output is missing; left: {debris(run.folder, temp)}"
            now = tree(out)
            if now == previous[fmt]:
                state = "previous"
            else:  # swapped in: a complete new artifact, the new recipe's, never a mix
                manifest = json.loads((out / "manifest.json").read_text())
                assert manifest["seed"] == 1 and sorted(now) == sorted([*manifest["files"], "manifest.json"]), where
                new_model.setdefault(fmt, now[MODEL_FILE[fmt]])
                assert now[MODEL_FILE[fmt]] == new_model[fmt], where  # the same weights every time
                state = "new"
            code, err = run_main(monkeypatch, capsys, "verify", str(out))
            assert code == 0, (where, err)
            outcomes.append((fmt, triggers[fmt][0], killed[fmt], state))
            if state == "new":  # back to A, so that every point starts from the same previous artifact
                shutil.rmtree(out)
                shutil.copytree(tmp_path / f"previous-{fmt}", out)
            # A run that got as far as making its staging (scratch) folder removed those of the runs killed before.
            left = debris(run.folder, temp)
            if owners(left, "staging") & pids:
                assert owners(left, "staging") <= pids, (where, left)
            if owners(left, "scratch") & pids:
                assert owners(left, "scratch") <= pids, (where, left)
        if not length:
            length = {fmt: seconds or runs[fmt].elapsed() for fmt, seconds in killed.items()}
        # A timed point that came after the run's end (the machine got faster since the first round measured a
        # run's length) is tried once more, against the length that run has just shown.
        late = [fmt for fmt, run in runs.items() if run.ended_after is not None and triggers[fmt][0].endswith(
            FRACTION_LABEL)]
        for fmt in late:
            length[fmt] = min(length[fmt], runs[fmt].ended_after)
        if late and not any(triggers is earlier for earlier in retried):
            retried.append(triggers)
            rounds.insert(len(rounds) - 1, triggers)  # before the last round: its debris is checked below
    t2 = time.monotonic()
    survived = sum(seconds is not None for _, _, seconds, _ in outcomes)
    swapped = sum(seconds is not None and state == "new" for _, _, seconds, state in outcomes)
    with capsys.disabled():  # run_main reads capsys: print past it
        print("\none run until its swap: " + ", ".join(f"{fmt} {s:.1f} s" for fmt, s in length.items()))
        for fmt, label, seconds, state in outcomes:
            when = "ended before the kill" if seconds is None else f"killed after {seconds:5.2f} s"
            print(f"{fmt:12s} {label:>17s}: {when}, output: the {state} artifact, verify passes")
        print(f"kill points survived: {survived} ({swapped} after the swap, {survived - swapped} before it)")
    assert survived >= 10 and swapped >= 1 and survived - swapped >= 8, outcomes  # "swap done" gives one new

    # The last kill left its debris; beside it, folders of a live run (this test's pid) that must stay untouched.
    live = [f".out.staging-{os.getpid()}-live", f"TMPDIR/llmopt-{os.getpid()}-live"]
    for fmt in FORMATS:
        left = debris(folders[fmt], temp)
        with capsys.disabled():
            print(f"{fmt}: left by the killed runs: {left}")
        assert ".out.lock" in left and owners(left, "staging") and owners(left, "scratch"), left
        (folders[fmt] / live[0]).mkdir()
    (temp / live[1].removeprefix("TMPDIR/")).mkdir()
    # A normal run on each output succeeds despite the debris, and removes that of dead runs only.
    runs = {fmt: Run(folders[fmt], new_recipe[fmt], tiny_model_dir, temp) for fmt in FORMATS}
    for run in runs.values():
        run.finish()
    for fmt, run in runs.items():
        if fmt in new_model:  # safetensors has a swapped-in artifact only when a timed kill came after its swap
            assert tree(run.out)[MODEL_FILE[fmt]] == new_model[fmt]
        assert run_main(monkeypatch, capsys, "verify", str(run.out))[0] == 0
        assert debris(run.folder, temp) == sorted(live), debris(run.folder, temp)
    with capsys.disabled():
        print(f"wall time: previous artifacts {t1 - t0:.0f} s, {len(rounds)} kill rounds {t2 - t1:.0f} s, "
              f"final run {time.monotonic() - t2:.0f} s")


def dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def artifact(folder: Path, text: str) -> dict[str, str]:
    from llmopt.artifact import write_manifest

    folder.mkdir()
    (folder / "model.safetensors").write_text(text)
    write_manifest(folder, recipe={}, versions={}, seed=0)
    return tree(folder)


def test_a_kill_between_the_fallback_renames_is_undone_by_the_next_run(tmp_path):
    """Where the file system cannot exchange two folders, promote renames the output away, then the new one in:
    a run killed between the two leaves no output, only the backup, which the next run puts back first."""
    from llmopt.artifact import check_destination, new_staging
    from llmopt.errors import RecipeError

    out = tmp_path / "out"
    previous = artifact(out, "previous")
    pid = dead_pid()
    backup = tmp_path / f".out.old-{pid}-0a0a0a0a"
    out.rename(backup)
    artifact(tmp_path / f".out.staging-{pid}-0b0b0b0b", "new")  # complete, not yet renamed in
    with pytest.raises(RecipeError, match="already exists"):  # a run without --force: A is back, and kept
        check_destination(out, force=False)
    assert tree(out) == previous
    staging = new_staging(out)  # under the lock: the dead run's staging folder goes
    assert sorted(p.name for p in tmp_path.iterdir()) == [staging.name, "out"]


def test_a_backup_being_removed_is_not_restored_and_a_live_runs_is_not_touched(tmp_path):
    from llmopt.artifact import check_destination, new_staging

    out = tmp_path / "out"
    backup = tmp_path / f".out.old-{dead_pid()}-0c0c0c0c"
    artifact(backup, "previous")
    (backup / "model.safetensors").unlink()  # its removal had begun
    check_destination(out, force=True)
    assert not out.exists()  # a partial artifact is never put in place
    live = artifact(tmp_path / f".out.old-{os.getpid()}-0d0d0d0d", "a live run's, mid-swap")
    check_destination(out, force=True)
    assert not out.exists() and tree(tmp_path / f".out.old-{os.getpid()}-0d0d0d0d") == live
    new_staging(out).rmdir()
    assert (tmp_path / f".out.old-{os.getpid()}-0d0d0d0d").is_dir()  # backups stay while no output is in place


def test_promote_without_an_atomic_exchange(tmp_path, monkeypatch):
    import llmopt.artifact

    monkeypatch.setattr(llmopt.artifact, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    artifact(out, "previous")
    new = artifact(tmp_path / ".out.staging-1-x", "new")
    llmopt.artifact.promote(tmp_path / ".out.staging-1-x", out)
    assert tree(out) == new and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_killed_runs_staging_goes_even_before_its_parent_reaps_it(tmp_path):
    import psutil
    from llmopt.artifact import new_staging

    zombie = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        zombie.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        (tmp_path / f".out.staging-{zombie.pid}-0e0e0e0e").mkdir()  # not reaped yet: its pid still exists
        staging = new_staging(tmp_path / "out")
        assert [p.name for p in tmp_path.iterdir()] == [staging.name]
    finally:
        zombie.wait()


# A child that takes the output's lock; with HOLD_AT_WRITE it stops at the instant the lock is taken but its pid not
# yet written (the file exists and is empty), where the lock used to be taken for a stale one.
LOCKER = """
import os, sys, time
from pathlib import Path
from llmopt.artifact import OutputLock
from llmopt.errors import RecipeError

out, go = Path(sys.argv[1]), Path(sys.argv[2])
if os.environ.get("HOLD_AT_WRITE"):
    def hold(self, fd):
        print("locked", flush=True)
        time.sleep(60)
    OutputLock._write_pid = hold
while not go.exists():
    time.sleep(0.001)
try:
    with OutputLock(out):
        print("held", flush=True)
        time.sleep(3)
except RecipeError as exc:
    print(exc.message, flush=True)
"""


def test_a_lock_whose_pid_is_not_written_yet_is_held(tmp_path):
    from llmopt.artifact import OutputLock
    from llmopt.errors import RecipeError

    out, go = tmp_path / "out", tmp_path / "go"
    go.touch()
    child = subprocess.Popen([sys.executable, "-c", LOCKER, str(out), str(go)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "HOLD_AT_WRITE": "1"})
    try:
        assert child.stdout.readline() == "locked\n"
        assert (tmp_path / ".out.lock").read_text() == ""  # the moment a second run took the lock as stale
        with pytest.raises(RecipeError) as refused:
            OutputLock(out).__enter__()
        assert refused.value.message == f"Another llmopt run (just starting) is writing '{out}'."
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=60)
    with OutputLock(out):  # killed with its lock empty: the lock is free at once
        assert (tmp_path / ".out.lock").read_text() == str(os.getpid())
    assert not (tmp_path / ".out.lock").exists()


@pytest.mark.slow
def test_of_runs_started_together_one_takes_the_lock(tmp_path):
    out, go = tmp_path / "out", tmp_path / "go"
    children = [subprocess.Popen([sys.executable, "-c", LOCKER, str(out), str(go)], stdout=subprocess.PIPE, text=True)
                for _ in range(6)]
    time.sleep(3)  # let them all import and wait at the start line
    go.touch()
    said = [child.communicate(timeout=120)[0].strip() for child in children]
    print(f"\n{said}")
    assert said.count("held") == 1, said
    pattern = re.compile(rf"Another llmopt run \((pid \d+|just starting)\) is writing '{re.escape(str(out))}'\.")
    assert all(pattern.fullmatch(s) for s in said if s != "held"), said


# distill's teacher cache without a checkpoint_dir, in a scratch folder of the temp folder.
DISTILLER = """
import sys
import numpy as np
from transformers import AutoModelForCausalLM
from llmopt.passes.distill import DistillConfig, DistillPass
from llmopt.state import ModelState, PassContext

model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
teacher = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
windows = [np.random.default_rng(i).integers(0, 300, 32) for i in range(8)]
config = DistillConfig(steps=100000, batch_size=2, loss="topk_kl", top_k=8, cache_teacher=True, precision="fp32")
DistillPass(config).run(ModelState(model, None), PassContext(calibration=lambda: windows, teacher=lambda: teacher))
"""


@pytest.mark.slow
def test_a_killed_distill_runs_scratch_is_removed_by_the_next_run(tmp_path, tiny_model_dir, monkeypatch):
    import tempfile

    from llmopt.artifact import new_scratch

    temp = tmp_path / "temp"
    temp.mkdir()
    child = subprocess.Popen([sys.executable, "-c", DISTILLER, str(tiny_model_dir)], stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "TMPDIR": str(temp)})
    deadline = time.monotonic() + 120
    while not list(temp.glob("llmopt-*/teacher-topk.safetensors")):  # the cache is written: training begins
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()[1]
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=60)
    left = [p.name for p in temp.iterdir()]
    assert len(left) == 1 and left[0].startswith(f"llmopt-{child.pid}-"), left  # named with the killed run's pid
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    mine = new_scratch()  # what the next run (or distill pass) does first
    assert [p.name for p in temp.iterdir()] == [mine.name]
    mine.rmdir()
