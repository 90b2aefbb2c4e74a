"""`--resume`: a run SIGKILLed after a completed pass continues from it and writes the same artifact as an
uninterrupted run; a changed recipe is refused; a run that unwinds leaves no checkpoint behind.

The kill point is deterministic: the test polls for the checkpoint folder the pipeline renames into place once a
pass's state is completely written, and kills the run then (the next pass takes far longer than the poll's 1 ms).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import llmopt
from tests.cli.test_exit_codes import run_main

# Files whose content includes timings: the reports, the model card, and the manifest that hashes them.
TIMED = {"report.json", "report.md", "report.html", "README.md", "manifest.json", "llmopt.log"}
# Pruning changes the architecture (so resuming rebuilds the model from the checkpoint's config); GPTQ draws its
# calibration windows with the seed and takes long enough for the kill to land between the two passes.
TWO_PASSES = ("seed: 3\npasses:\n  - {{type: prune, method: width, mlp: 0.25, multiple_of: 16, importance: magnitude}}\n"
              "  - {{type: quantize, method: gptq, bits: {bits}, group_size: 16}}\n"
              "calibration: {{samples: 8, seq_len: 64}}\nexport: {{format: safetensors}}\n"
              "evaluation: {{enabled: false}}\n")
DISTILL = ("seed: 5\npasses:\n  - {type: distill, steps: 40, batch_size: 2, lr: 0.003, eval_every: 4, precision: fp32}\n"
           "calibration: {samples: 16, seq_len: 32}\nexport: {format: safetensors}\nevaluation: {enabled: false}\n")


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in TIMED}


def manifest_hashes(folder: Path) -> dict[str, str]:
    files = json.loads((folder / "manifest.json").read_text())["files"]
    return {name: meta["sha256"] for name, meta in files.items() if name not in TIMED}


def kill_when(recipe: Path, model: Path, out: Path, ready: str, temp: Path) -> float:
    """Start `llmopt optimize` in a child process and SIGKILL it as soon as `out`'s resume folder holds `ready`;
    returns the seconds it ran."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(temp)}
    env.pop("LLMOPT_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "llmopt", "optimize", str(recipe), "--model", str(model),
                             "--output", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    started = time.monotonic()
    target = out.parent / f".{out.name}.resume" / ready
    while not target.exists():
        assert proc.poll() is None, f"the run ended before {ready} appeared: {proc.communicate()[1]}"
        assert time.monotonic() - started < 300
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    return time.monotonic() - started


@pytest.fixture()
def sandbox(tmp_path, monkeypatch) -> Path:
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    return tmp_path


@pytest.mark.slow
def test_resume_after_a_kill_gives_the_uninterrupted_artifact(sandbox, tiny_model_dir, monkeypatch, capsys):
    from llmopt.passes.prune import PrunePass

    recipe = sandbox / "r.yaml"
    recipe.write_text(TWO_PASSES.format(bits=4), encoding="utf-8")
    t0 = time.monotonic()
    whole = llmopt.optimize(recipe, model=str(tiny_model_dir), output=sandbox / "whole").output
    t1 = time.monotonic()
    assert not (sandbox / ".whole.resume").exists()  # a successful run removes its checkpoints

    out = sandbox / "out"
    seconds = kill_when(recipe, tiny_model_dir, out, "pass-01", sandbox / "temp")
    resume_dir = sandbox / ".out.resume"
    kept = sorted(p.name for p in resume_dir.iterdir())
    print(f"\nuninterrupted run {t1 - t0:.1f} s; killed after {seconds:.2f} s, leaving {kept}")
    assert not out.exists() and kept == ["pass-01", "run.json"], kept
    killed_state = json.loads((resume_dir / "pass-01" / "state.json").read_text())
    assert [r["type"] for r in killed_state["records"]] == ["prune"]

    # A changed recipe: refused with exit 2, and the checkpoint is kept for the original recipe.
    changed = sandbox / "changed.yaml"
    changed.write_text(TWO_PASSES.format(bits=8), encoding="utf-8")
    code, err = run_main(monkeypatch, capsys, "optimize", str(changed), "--model", str(tiny_model_dir),
                         "--output", str(out), "--resume")
    assert code == 2 and "Traceback" not in err, err
    assert (f"Cannot resume into '{out}': the checkpoint in '{resume_dir}' was made by a different run (the recipe "
            "(its passes, export, evaluation, seed or model) changed since)") in " ".join(err.split()), err
    assert sorted(p.name for p in resume_dir.iterdir()) == ["pass-01", "run.json"]

    # Resume: the prune pass is not run again (it would raise), the artifact equals the uninterrupted one.
    def not_again(self, state, ctx):
        raise AssertionError("prune ran again")

    monkeypatch.setattr(PrunePass, "run", not_again)
    code, err = run_main(monkeypatch, capsys, "optimize", str(recipe), "--model", str(tiny_model_dir),
                         "--output", str(out), "--resume")
    assert code == 0, err
    a, b = digests(whole), digests(out)
    print(f"resumed artifact: {len(b)} files, model.safetensors {b['model.safetensors'][:16]}")
    assert "model.safetensors" in a and "config.json" in a
    assert a == b, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert manifest_hashes(whole) == manifest_hashes(out)
    report = json.loads((out / "report.json").read_text())
    assert [p["type"] for p in report["passes"]] == ["prune", "quantize"]
    assert report["passes"][0] == killed_state["records"][0]  # the killed run's record, not a new one
    assert any(n.startswith("resumed after 1 completed pass(es) of a killed run (prune)") for n in report["notes"])
    assert not resume_dir.exists()
    assert sorted(p.name for p in sandbox.iterdir()) == ["changed.yaml", "out", "r.yaml", "temp", "whole"]


@pytest.mark.slow
def test_a_run_without_resume_removes_a_stale_checkpoint(sandbox, tiny_model_dir):
    recipe = sandbox / "r.yaml"
    recipe.write_text(TWO_PASSES.format(bits=4), encoding="utf-8")
    out = sandbox / "out"
    kill_when(recipe, tiny_model_dir, out, "pass-01", sandbox / "temp")
    assert (sandbox / ".out.resume" / "pass-01").is_dir()
    result = llmopt.optimize(recipe, model=str(tiny_model_dir), output=out)
    assert [p.type for p in result.report.passes] == ["prune", "quantize"]
    assert not any("resumed" in n for n in result.report.notes)  # both passes ran
    assert not (sandbox / ".out.resume").exists()


@pytest.mark.slow
def test_resume_without_a_checkpoint_starts_afresh(sandbox, tiny_model_dir, fast_recipe):
    recipe = fast_recipe("passes:\n  - {type: quantize, group_size: 16}\nexport: {format: safetensors}\n")
    result = llmopt.optimize(recipe, model=str(tiny_model_dir), output=sandbox / "out", resume=True)
    assert [p.type for p in result.report.passes] == ["quantize"] and result.passed
    assert not any("resumed" in n for n in result.report.notes)
    assert not (sandbox / ".out.resume").exists()


def test_a_failed_run_removes_its_checkpoints(sandbox, tiny_model_dir, monkeypatch):
    """An error after a completed pass unwinds: the checkpoint goes with the staging folder."""
    from llmopt.errors import ResultValidationError
    from llmopt.passes.quantize import QuantizePass

    def diverge(self, state, ctx):
        assert (sandbox / ".out.resume" / "pass-01").is_dir()  # the prune pass was checkpointed
        raise ResultValidationError("diverged", "hint")

    monkeypatch.setattr(QuantizePass, "run", diverge)
    recipe = sandbox / "r.yaml"
    recipe.write_text(TWO_PASSES.format(bits=4), encoding="utf-8")
    with pytest.raises(ResultValidationError, match="diverged"):
        llmopt.optimize(recipe, model=str(tiny_model_dir), output=sandbox / "out")
    assert sorted(p.name for p in sandbox.iterdir()) == ["r.yaml", "temp"]


@pytest.mark.slow
def test_a_killed_distill_pass_continues_from_its_step_checkpoint(sandbox, tiny_model_dir, monkeypatch, capsys):
    recipe = sandbox / "d.yaml"
    recipe.write_text(DISTILL, encoding="utf-8")
    whole = llmopt.optimize(recipe, model=str(tiny_model_dir), output=sandbox / "whole")
    out = sandbox / "out"
    kill_when(recipe, tiny_model_dir, out, "distill-00/step-000008", sandbox / "temp")
    steps = sorted(p.name for p in (sandbox / ".out.resume" / "distill-00").glob("step-*"))
    assert not out.exists() and steps and not (sandbox / ".out.resume" / "pass-01").exists(), steps
    resumed = llmopt.optimize(recipe, model=str(tiny_model_dir), output=out, resume=True)
    info, info_whole = resumed.report.passes[0].info, whole.report.passes[0].info
    print(f"\ndistill killed with {steps}; resumed from step {info['resumed_from_step']} of {info['steps']}")
    assert 8 <= info["resumed_from_step"] < 40 and info_whole["resumed_from_step"] == 0
    assert info["loss_curve"] == info_whole["loss_curve"]  # the same steps, the same losses
    assert digests(whole.output) == digests(out)
    assert not (sandbox / ".out.resume").exists()


def test_a_checkpoint_restores_w8a8_hooks_tied_weights_and_the_generators(tmp_path, tiny_tokenizer):
    """The in-memory round trip the resumed run relies on: the same logits (activation quantization is a forward
    hook, not a weight), the same codes, and the random numbers the next pass would have drawn."""
    import random

    import numpy as np
    import torch
    from llmopt.passes.quantize import QuantizeConfig, QuantizePass
    from llmopt.quantized import float_activations
    from llmopt.resume import ResumeStore
    from llmopt.state import ModelState, PassContext

    from tests.conftest import tiny_llama

    state = QuantizePass(QuantizeConfig(bits=8, activations="int8")).run(
        ModelState(tiny_llama(tie=True), tiny_tokenizer), PassContext())
    state.pass_info["extra"] = {"seen": [1, 2]}
    store = ResumeStore(tmp_path / "out", {"recipe": "r"})
    assert store.start(resume=False) is False
    store.save(1, state, [{"type": "quantize", "seconds": 1.5, "info": state.pass_info["quantize"]}])
    expected_draws = (torch.rand(4), np.random.rand(4), random.random())

    torch.manual_seed(123)  # move every generator on: restore must put them back
    np.random.seed(123)
    random.seed(123)
    fresh = ModelState(tiny_llama(tie=True), tiny_tokenizer)
    assert ResumeStore(tmp_path / "out", {"recipe": "r"}).start(resume=True) is True
    restored = ResumeStore(tmp_path / "out", {"recipe": "r"}).restore(fresh)
    assert torch.equal(restored.state.model(torch.arange(24)[None]).logits, state.model(torch.arange(24)[None]).logits)
    with float_activations():  # without the hooks the logits differ: the comparison above saw them
        plain = restored.state.model(torch.arange(24)[None]).logits
    assert not torch.equal(plain, state.model(torch.arange(24)[None]).logits)
    assert restored.passes_done == 1 and restored.records[0]["seconds"] == 1.5
    assert restored.state.pass_info == state.pass_info and set(restored.state.quantized) == set(state.quantized)
    for name, qt in state.quantized.items():
        again = restored.state.quantized[name]
        assert (again.bits, again.kind, again.activations) == (qt.bits, qt.kind, qt.activations)
        assert np.array_equal(again.codes, qt.codes) and np.array_equal(again.scales, qt.scales)
    # W8A8 leaves the embedding float: quantizing the tied lm_head untied it, so the model was rebuilt untied.
    model, original = restored.state.model, state.model
    assert original.lm_head.weight is not original.model.embed_tokens.weight and model is not fresh.model
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    draws = (torch.rand(4), np.random.rand(4), random.random())
    assert torch.equal(draws[0], expected_draws[0]) and np.array_equal(draws[1], expected_draws[1])
    assert draws[2] == expected_draws[2]


def test_a_checkpoint_of_an_unchanged_architecture_loads_into_the_loaded_model(tmp_path, tiny_tokenizer):
    import torch
    from llmopt.passes.quantize import QuantizeConfig, QuantizePass
    from llmopt.resume import ResumeStore
    from llmopt.state import ModelState, PassContext

    from tests.conftest import tiny_llama

    state = QuantizePass(QuantizeConfig(bits=4, group_size=16, embeddings=True)).run(
        ModelState(tiny_llama(tie=True), tiny_tokenizer), PassContext())
    store = ResumeStore(tmp_path / "out", {"recipe": "r"})
    store.start(resume=False)
    store.save(1, state, [])
    fresh = ModelState(tiny_llama(tie=True), tiny_tokenizer)
    torch.nn.init.zeros_(fresh.model.model.norm.weight)  # a norm weight the checkpoint must overwrite
    restored = store.restore(fresh).state
    model = restored.model
    assert model is fresh.model and model.lm_head.weight is model.model.embed_tokens.weight  # tied, as quantized
    ids = torch.arange(24)[None]
    assert torch.equal(model(ids).logits, state.model(ids).logits)
    assert sorted(p.name for p in (tmp_path / ".out.resume").iterdir()) == ["pass-01", "run.json"]
    store.save(2, restored, [])  # the next pass's checkpoint replaces it
    assert sorted(p.name for p in (tmp_path / ".out.resume").iterdir()) == ["pass-02", "run.json"]


def test_a_damaged_checkpoint_is_refused_with_a_clear_error(tmp_path, tiny_tokenizer):
    from llmopt.errors import InputError
    from llmopt.resume import ResumeStore
    from llmopt.state import ModelState

    from tests.conftest import tiny_llama

    store = ResumeStore(tmp_path / "out", {"recipe": "r"})
    store.start(resume=False)
    store.save(1, ModelState(tiny_llama(), tiny_tokenizer), [])
    weights = tmp_path / ".out.resume" / "pass-01" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # cut short, as by a power cut before the page cache was flushed
    with pytest.raises(InputError) as refused:
        store.restore(ModelState(tiny_llama(), tiny_tokenizer))
    assert refused.value.message.startswith(f"The checkpoint '{weights.parent}' cannot be loaded: ")
    assert refused.value.hint == "Run again without --resume to start afresh."
