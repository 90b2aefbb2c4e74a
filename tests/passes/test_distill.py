"""distill: losses against float64 references, training on tiny models, resume, freeze, teacher cache, pipeline."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from llmopt.errors import InputError, RecipeError
from llmopt.model import ArchInfo
from llmopt.passes.distill import (DistillConfig, DistillPass, hidden_loss, kl_loss, resolve_layer_map,
                                   topk_kl_loss, topk_targets)
from llmopt.passes.distill_trainer import WindowOrder, lr_factor
from llmopt.state import ModelState, PassContext
from tests.conftest import TINY_VOCAB, tiny_llama


def token_windows(count: int = 12, length: int = 32, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, TINY_VOCAB, length).astype(np.int64) for _ in range(count)]


def llama_like(**changes):
    """tiny_llama with other config values (its keyword arguments cannot override the fixed ones)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**tiny_llama().config.to_dict(), **changes})).eval()


def damaged(teacher, scale: float = 0.05, seed: int = 1):
    """A copy of the teacher with noise on every matrix: a student with something to recover."""
    student = copy.deepcopy(teacher)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            if p.ndim == 2:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    return student


def distill_state(student, teacher, windows, *, progress=None, quantized=None, **config) -> ModelState:
    config = {"steps": 6, "batch_size": 4, "lr": 3e-3, "eval_every": 2, "eval_fraction": 0.25, "precision": "fp32",
              **config}
    ctx = PassContext(seed=0, progress=progress or (lambda done, total: None), calibration=lambda: windows,
                      teacher=lambda: teacher)
    state = ModelState(student, None, quantized=quantized or {})
    return DistillPass(DistillConfig(**config)).run(state, ctx)


def distill(student, teacher, windows, **options) -> dict:
    """The pass on `student`, trained in place (one process or data parallel); returns its report info."""
    state = distill_state(student, teacher, windows, **options)
    assert state.model is student
    return state.pass_info["distill"]


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --- losses -------------------------------------------------------------------------------------------------------

def reference_kl(p_logits: np.ndarray, q_logits: np.ndarray, temperature: float) -> float:
    """Mean over positions of T² · KL(softmax(p/T) ‖ softmax(q/T)), in float64 numpy."""
    def log_softmax(x):
        x = x.astype(np.float64) / temperature
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean() * temperature**2)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_and_reverse_kl_match_a_float64_reference(temperature):
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 50) * 3, torch.randn(2, 5, 50) * 3
    forward = float(kl_loss(student, teacher, temperature, reverse=False))
    reverse = float(kl_loss(student, teacher, temperature, reverse=True))
    ref_forward = reference_kl(teacher.numpy(), student.numpy(), temperature)
    ref_reverse = reference_kl(student.numpy(), teacher.numpy(), temperature)
    print(f"T={temperature}: forward {forward:.6f} (ref {ref_forward:.6f}), reverse {reverse:.6f} (ref {ref_reverse:.6f})")
    assert abs(forward - ref_forward) < 1e-4 * max(1, ref_forward)
    assert abs(reverse - ref_reverse) < 1e-4 * max(1, ref_reverse)
    assert abs(forward - reverse) > 1e-3  # the two directions are different objectives


def test_topk_kl_is_exact_when_the_rest_is_one_token_and_a_lower_bound_otherwise():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 50) * 3, torch.randn(2, 5, 50) * 3
    full = float(kl_loss(student, teacher, 1.0, reverse=False))
    exact = float(topk_kl_loss(student, *topk_targets(teacher, 49, 1.0), 1.0))
    coarse = float(topk_kl_loss(student, *topk_targets(teacher, 8, 1.0), 1.0))
    print(f"full KL {full:.5f}, top-49 of 50 {exact:.5f}, top-8 {coarse:.5f}")
    assert abs(exact - full) < 1e-5
    assert 0 < coarse <= full


def test_a_student_identical_to_its_teacher_has_zero_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, TINY_VOCAB) * 4
    values = {"forward": kl_loss(logits, logits, 2.0, reverse=False), "reverse": kl_loss(logits, logits, 2.0, reverse=True),
              "topk": topk_kl_loss(logits, *topk_targets(logits, 16, 2.0), 2.0)}
    hidden = tuple(torch.randn(2, 6, 8) for _ in range(3))
    values["hidden"] = hidden_loss(hidden, hidden, {1: 1, 2: 2})
    print({k: float(v) for k, v in values.items()})
    assert all(abs(float(v)) < 1e-6 for v in values.values())
    # And through the whole pass: the held-out loss before training is zero for an identical copy.
    teacher = tiny_llama()
    info = distill(copy.deepcopy(teacher), teacher, token_windows(8), steps=1, hidden_weight=1.0)
    print("held-out loss of an identical student:", info["loss_curve"][0])
    assert info["loss_curve"][0][0] == 0 and abs(info["loss_curve"][0][2]) < 1e-6


# --- training -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss,extra", [("forward_kl", {}), ("reverse_kl", {}), ("topk_kl", {"top_k": 64}),
                                        ("forward_kl", {"lm_weight": 0.1, "hidden_weight": 0.5})])
def test_loss_decreases_on_a_tiny_model(loss, extra):
    teacher = tiny_llama()
    student = damaged(teacher)
    info = distill(student, teacher, token_windows(), steps=8, loss=loss, **extra)
    curve = info["loss_curve"]
    first, last = curve[0][2], info["best_eval_loss"]
    print(f"{loss} {extra}: held-out {first:.4f} -> {last:.4f}; curve {curve}")
    assert [row[0] for row in curve] == list(range(9)) and curve[0][1] is None
    assert last < 0.85 * first
    assert info["steps_done"] == 8 and info["tokens_seen"] == 8 * 4 * 32
    assert not student.training and next(student.parameters()).dtype == torch.float32
    assert all(p.requires_grad for p in student.parameters())  # flags restored for later passes


def test_a_shallower_student_learns_hidden_states_through_the_layer_map():
    assert resolve_layer_map(None, 2, 4) == {1: 2, 2: 4}
    assert resolve_layer_map(None, 3, 3) == {1: 1, 2: 2, 3: 3}
    teacher = tiny_llama()
    student = llama_like(num_hidden_layers=1)
    info = distill(student, teacher, token_windows(), steps=8, kl_weight=0.0, hidden_weight=1.0)
    print("hidden-only loss, 1-layer student of a 2-layer teacher:", info["loss_curve"])
    assert info["best_eval_loss"] < 0.9 * info["loss_curve"][0][2]
    with pytest.raises(InputError, match="do not exist"):
        resolve_layer_map({1: 3}, 1, 2)


def test_gradient_accumulation_equals_a_bigger_batch():
    teacher = tiny_llama()
    a, b = damaged(teacher), damaged(teacher)
    distill(a, teacher, token_windows(), batch_size=4, grad_accum=1, steps=3)
    distill(b, teacher, token_windows(), batch_size=2, grad_accum=2, steps=3)
    diff = max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))
    print(f"batch 4 vs 2 x 2 accumulated: max |Δw| = {diff:.2e}")
    assert diff < 1e-5


def launch_two_processes(out, mode: str) -> dict[str, dict[str, torch.Tensor]]:
    """tests/passes/ddp_distill_script.py under `torchrun`, which starts what `accelerate launch --multi_gpu`
    starts (one process per device, torch.distributed), here two CPU processes talking over gloo; `fsdp` adds
    the environment `accelerate launch --use_fsdp --fsdp_version 2` sets, `-2-nodes` starts them as a
    two-node job (one launcher per node, node ranks 0 and 1, rendezvous at a master address), the way
    `accelerate launch --num_machines 2` does, and `-tied` trains a model whose lm_head is its embedding.
    Returns the files it wrote."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file

    script = Path(__file__).with_name("ddp_distill_script.py")
    sharding = mode.split("-")[0]
    extra = ["tied"] if mode.endswith("-tied") else []
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    if sharding == "fsdp":
        env |= {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    launcher = [sys.executable, "-m", "torch.distributed.run"]
    if "-2-nodes" in mode:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        commands = [launcher + ["--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1", "--master_addr",
                                "127.0.0.1", "--master_port", str(port), str(script), str(out), sharding, *extra]
                    for node in (0, 1)]
    else:
        commands = [launcher + ["--standalone", "--nproc_per_node", "2", str(script), str(out), sharding, *extra]]
    launched = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for command in commands]
    try:
        for process in launched:
            _, stderr = process.communicate(timeout=600)
            assert process.returncode == 0, stderr[-3000:]
    finally:  # a failed node leaves the other waiting at a collective: do not leave it running
        for process in launched:
            process.kill()
    files = {}
    for path in sorted(Path(out).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            assert f.metadata()["processes"] == "2"
            assert f.metadata()["sharding"] == ("fsdp2" if sharding == "fsdp" else "ddp")
            assert f.metadata()["class"] == "LlamaForCausalLM"  # a plain model, not FSDP's wrapper class
            eval_losses = json.loads(f.metadata()["eval_losses"])
            held = int(f.metadata()["parameters_per_process"])
            total = sum(p.numel() for p in tiny_llama(tie=bool(extra)).parameters())
            print(f"{mode} {path.stem}: {held} of {total} parameters held by the process")
            if sharding == "fsdp":  # each process stores its half of every tensor (rows rounded up), not a replica
                assert total / 2 <= held < total / 2 * 1.05
            else:
                assert held == total
        files[path.stem] = {**load_file(str(path)), "eval_losses": torch.tensor(eval_losses, dtype=torch.float64)}
    return files


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp-2-nodes-tied"])
@pytest.mark.slow
def test_two_processes_equal_one_process_accumulating(tmp_path, mode):
    """The pass unchanged under a distributed launcher. Each process trains on its own micro-batches; DDP
    averages the gradients of whole replicas, FSDP2 reduce-scatters them to the shard each process owns and
    the pass gathers the trained weights back into a plain model: either way the same steps as one process
    accumulating both micro-batches."""
    files = launch_two_processes(tmp_path, mode)
    ranks = [files["rank-0"], files["rank-1"]]
    assert all(torch.equal(ranks[0][n], ranks[1][n]) for n in ranks[0])  # every process ends with the same model

    teacher = tiny_llama(tie=mode.endswith("-tied"))
    single = damaged(teacher)
    single_info = distill(single, teacher, token_windows(), batch_size=2, grad_accum=2, steps=3)
    diff = max(float((p - ranks[0][n]).abs().max()) for n, p in single.named_parameters())
    moved = max(float((p - q).abs().max()) for p, q in zip(single.parameters(), damaged(teacher).parameters()))
    with torch.no_grad():
        logits = single(input_ids=torch.from_numpy(token_windows(count=2)[0][None])).logits[0]
    logit_diff = float((logits - ranks[0]["probe_logits"]).abs().max())
    print(f"{mode}: 2 processes x batch 2 vs 1 process x 2 accumulated: max |Δw| = {diff:.2e} (training moved "
          f"weights by {moved:.2e}), max |Δlogit| = {logit_diff:.2e}")
    assert diff < 1e-5 < moved
    assert logit_diff < 1e-4
    single_eval = torch.tensor([row[2] for row in single_info["loss_curve"] if row[2] is not None], dtype=torch.float64)
    assert torch.allclose(ranks[0]["eval_losses"], single_eval, rtol=1e-6)  # held-out windows split, then summed
    if mode.startswith("fsdp"):  # sharded checkpoints: an interrupted train_only run resumes to the uninterrupted result
        from tests.passes.ddp_distill_script import RESUME_CONFIG

        whole, resumed = files["whole-0"], files["resumed-0"]
        start = dict(damaged(teacher).named_parameters())
        resume_diff = max(float((whole[n] - resumed[n]).abs().max()) for n in start)
        trained = {n for n in start if not torch.equal(whole[n], start[n])}
        one = distill(damaged(teacher), teacher, token_windows(), **(RESUME_CONFIG | {"grad_accum": 2}))
        one_eval = torch.tensor([row[2] for row in one["loss_curve"] if row[2] is not None], dtype=torch.float64)
        print(f"fsdp resume from step 2: max |Δw| = {resume_diff:.1e}; trained {len(trained)} tensors; held-out "
              f"losses {whole['eval_losses'].tolist()} (1 process: {one_eval.tolist()})")
        assert resume_diff == 0.0
        assert trained and all(".self_attn." in n for n in trained)  # train_only: the rest stayed frozen
        assert torch.allclose(whole["eval_losses"], one_eval, rtol=1e-6)  # the padded evaluation counts each window once


def test_fsdp_version_1_is_refused_with_the_launch_flag_to_use():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from llmopt.passes.distill_trainer import _sharded

    def launched(version):
        return SimpleNamespace(distributed_type=DistributedType.FSDP,
                               state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version)))
    assert _sharded(launched(2))
    assert not _sharded(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))
    with pytest.raises(InputError, match="FSDP version 2 only") as refused:
        _sharded(launched(1))
    assert "--fsdp_version 2" in refused.value.hint


def test_gradient_checkpointing_changes_nothing_but_memory():
    teacher = tiny_llama()
    a, b = damaged(teacher), damaged(teacher)
    plain = distill(a, teacher, token_windows(), steps=2)["loss_curve"]
    ckpt = distill(b, teacher, token_windows(), steps=2, gradient_checkpointing=True)["loss_curve"]
    diff = max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))
    print(f"gradient checkpointing: max |Δw| = {diff:.2e}")
    assert diff < 1e-6 and np.allclose([r[1] or 0 for r in plain], [r[1] or 0 for r in ckpt], atol=1e-6)
    assert not b.is_gradient_checkpointing


def test_resume_equals_uninterrupted(tmp_path):
    teacher = tiny_llama()
    whole, parts = damaged(teacher), damaged(teacher)
    config = {"steps": 6, "eval_every": 2, "checkpoint_every": 2, "early_stopping_patience": 5}
    done = distill(whole, teacher, token_windows(), checkpoint_dir=str(tmp_path / "a"), **config)

    def interrupt(step, total):
        if step == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        distill(parts, teacher, token_windows(), checkpoint_dir=str(tmp_path / "b"), progress=interrupt, **config)
    saved = sorted(p.name for p in (tmp_path / "b").iterdir())
    print("after the interruption:", saved)
    assert saved == ["step-000002"]
    assert not list((tmp_path / "b" / "step-000002").glob("*.pkl"))  # safetensors + JSON only
    resumed = distill(damaged(teacher), teacher, token_windows(), checkpoint_dir=str(tmp_path / "b"), **config)
    student = damaged(teacher)
    distill(student, teacher, token_windows(), checkpoint_dir=str(tmp_path / "b"), **config)  # finished: no training
    diff = max(float((p - q).abs().max()) for p, q in zip(whole.parameters(), student.parameters()))
    print(f"resumed at {resumed['resumed_from_step']}: curve {resumed['loss_curve']}; max |Δw| = {diff:.1e}")
    assert resumed["resumed_from_step"] == 2
    assert np.allclose(np.array(resumed["loss_curve"], dtype=float), np.array(done["loss_curve"], dtype=float),
                       rtol=1e-6, atol=1e-9, equal_nan=True)
    assert diff < 1e-6
    changed = copy.deepcopy(config) | {"lr": 1e-3}
    with pytest.raises(InputError, match="another run"):
        distill(damaged(teacher), teacher, token_windows(), checkpoint_dir=str(tmp_path / "b"), **changed)


@pytest.mark.parametrize("setting,expect_frozen", [
    ({"freeze": ["*.mlp.*", "model.embed_tokens.weight"]}, lambda n: ".mlp." in n or n == "model.embed_tokens.weight"),
    ({"train_only": ["*.self_attn.*"]}, lambda n: ".self_attn." not in n),
    ({"train_only": ["*.self_attn.*"], "freeze": ["*.q_proj.*"]}, lambda n: ".self_attn." not in n or "q_proj" in n),
])
def test_freeze_patterns_freeze_exactly_what_they_name(setting, expect_frozen):
    teacher = tiny_llama()
    student = damaged(teacher)
    before = weights(student)
    info = distill(student, teacher, token_windows(), steps=2, eval_fraction=0.0, **setting)
    after = weights(student)
    unchanged = {n for n in before if torch.equal(before[n], after[n])}
    expected = {n for n in before if expect_frozen(n)}
    print(setting, f"unchanged {len(unchanged)} of {len(before)}; frozen parameters {info['frozen_parameters']}")
    assert unchanged == expected
    assert info["frozen_parameters"] == sum(before[n].numel() for n in expected)
    assert info["trainable_parameters"] + info["frozen_parameters"] == sum(p.numel() for p in before.values())


def test_a_pattern_that_matches_nothing_is_refused():
    teacher = tiny_llama()
    with pytest.raises(InputError, match=r"freeze: pattern '\*\.attn\.\*' matches no parameter.*self_attn|embed"):
        distill(damaged(teacher), teacher, token_windows(), freeze=["*.attn.*"])
    with pytest.raises(InputError, match="no parameter is left to train"):
        distill(damaged(teacher), teacher, token_windows(), freeze=["*"])


def test_quantized_weights_stay_on_their_grid():
    from llmopt.passes.quantize import QuantizeConfig, QuantizePass

    teacher = tiny_llama()
    state = QuantizePass(QuantizeConfig(group_size=16, exclude=["lm_head"])).run(ModelState(damaged(teacher), None),
                                                                                 PassContext())
    before = weights(state.model)
    info = distill(state.model, teacher, token_windows(), steps=2, quantized=state.quantized)
    after = weights(state.model)
    print(f"{info['frozen_quantized_tensors']} quantized tensors frozen; trainable {info['trainable_parameters']}")
    assert info["frozen_quantized_tensors"] == len(state.quantized) == 14  # q k v o gate up down, 2 layers
    for name, qt in state.quantized.items():
        assert np.array_equal(after[name].numpy(), qt.dequantized()), name
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])


def test_early_stopping_keeps_the_best_weights():
    teacher = tiny_llama()
    student = damaged(teacher)
    start = weights(student)
    # A learning rate this large makes every step worse: the best weights are the starting ones.
    info = distill(student, teacher, token_windows(), steps=20, lr=3.0, warmup_steps=0, eval_every=1,
                   early_stopping_patience=2)
    print({k: info[k] for k in ("steps_done", "stopped_early", "best_step", "best_eval_loss")}, info["loss_curve"])
    assert info["stopped_early"] and info["steps_done"] == 2 and info["best_step"] == 0
    assert all(torch.equal(start[n], p) for n, p in weights(student).items())


def test_cached_teacher_gives_the_same_training_and_runs_the_teacher_once_per_window(tmp_path):
    teacher = tiny_llama()
    a, b = damaged(teacher), damaged(teacher)
    calls = []
    teacher.register_forward_hook(lambda module, args, out: calls.append(1))
    config = {"loss": "topk_kl", "top_k": 16, "steps": 4, "batch_size": 4}
    live = distill(a, teacher, token_windows(), **config)
    live_calls, calls[:] = len(calls), []
    cached = distill(b, teacher, token_windows(), cache_teacher=True, checkpoint_dir=str(tmp_path), **config)
    diff = max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))
    print(f"teacher forwards: live {live_calls}, cached {len(calls)}; max |Δw| = {diff:.2e}")
    assert len(calls) == 3  # 12 windows in batches of 4, once
    assert live_calls == 4 + 3 * 1  # one per step, one per held-out batch at steps 0, 2, 4
    assert (tmp_path / "teacher-topk.safetensors").is_file()
    assert diff < 1e-5
    assert np.allclose([r[2] or 0 for r in live["loss_curve"]], [r[2] or 0 for r in cached["loss_curve"]], atol=1e-5)


# --- schedule, data order, configuration --------------------------------------------------------------------------

def test_learning_rate_warms_up_then_decays_to_zero_by_cosine():
    factors = [lr_factor(s, 4, 20) for s in range(20)]
    print([round(f, 3) for f in factors])
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert abs(factors[12] - 0.5) < 1e-12  # half-way through the decay
    assert all(a > b for a, b in zip(factors[4:], factors[5:])) and 0 < factors[-1] < 0.01


def test_window_order_is_a_fresh_permutation_each_epoch_and_reproducible():
    order = WindowOrder([10, 11, 12, 13, 14], seed=3)
    first, second = order.take(0, 5), order.take(5, 5)
    assert sorted(first) == sorted(second) == [10, 11, 12, 13, 14] and first != second
    assert WindowOrder([10, 11, 12, 13, 14], seed=3).take(3, 4) == (first + second)[3:7]


@pytest.mark.parametrize("fields,message", [
    ({"kl_weight": 0.0}, "nothing to train"),
    ({"cache_teacher": True}, "set loss: topk_kl"),
    ({"cache_teacher": True, "loss": "topk_kl", "hidden_weight": 1.0}, "stores no hidden states"),
    ({"top_k": 8}, "top_k applies to loss: topk_kl only"),
    ({"layer_map": {1: 1}}, "set hidden_weight > 0"),
    ({"steps": 10, "warmup_steps": 10}, "must be below steps"),
    ({"eval_fraction": 0.0, "early_stopping_patience": 2}, "needs a held-out split"),
    ({"epochs": 2}, "Extra inputs"),
])
def test_inconsistent_settings_are_rejected_with_a_reason(fields, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(**fields)


def test_plan_time_checks():
    arch = ArchInfo("llama", 2, 64, 128, 4, 2, 16, TINY_VOCAB, False)
    with pytest.raises(RecipeError, match=r"passes\[1\].top_k: 384 is not below"):
        DistillPass(DistillConfig(loss="topk_kl", top_k=TINY_VOCAB)).check(arch, "passes[1]")
    with pytest.raises(RecipeError, match=r"passes\[1\].layer_map: student layers \[3\]"):
        DistillPass(DistillConfig(hidden_weight=1.0, layer_map={3: 1})).check(arch, "passes[1]")


def test_teacher_checkpoint_with_another_vocabulary_is_refused_at_plan_time(tmp_path):
    llama_like(vocab_size=500).save_pretrained(tmp_path, safe_serialization=True)
    arch = ArchInfo("llama", 2, 64, 128, 4, 2, 16, TINY_VOCAB, False)
    with pytest.raises(RecipeError, match="vocabulary of 500 tokens, the student 384"):
        DistillPass(DistillConfig(teacher=str(tmp_path))).check(arch, "passes[0]")


def test_teacher_must_be_a_separate_model():
    model = tiny_llama()
    with pytest.raises(InputError, match="the student itself"):
        distill(model, model, token_windows())


# --- end to end ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_pipeline_distills_after_quantization_and_reports_the_loss_curve(tmp_path, tiny_model_dir, fast_recipe):
    import llmopt

    recipe = fast_recipe(
        "passes:\n  - type: quantize\n    group_size: 16\n    exclude: [lm_head]\n"
        "  - type: distill\n    steps: 4\n    batch_size: 2\n    lr: 0.003\n    eval_every: 2\n    precision: fp32\n"
        "calibration: {samples: 10, seq_len: 32}\nexport: {format: safetensors}\n")
    result = llmopt.optimize(recipe, model=str(tiny_model_dir), output=tmp_path / "out")
    record = result.report.passes[1]
    info = record.info
    print(record.type, {k: v for k, v in info.items() if k != "loss_curve"}, info["loss_curve"])
    assert record.type == "distill" and info["steps_done"] == 4 and info["held_out_windows"] == 1
    assert [row[0] for row in info["loss_curve"]] == [0, 1, 2, 3, 4]
    assert info["best_eval_loss"] <= info["loss_curve"][0][2]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["passes"][1]["info"]["loss_curve"][0][0] == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.slow
def test_the_launch_example_distills_a_checkpoint_on_two_processes(tmp_path, tiny_model_dir, tiny_tokenizer):
    """examples/distill_launch.py, the script the README's `accelerate launch` commands run, under torchrun on
    two CPU processes: the main process writes a loadable student that moved towards the teacher."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from llmopt.evaluation.text import builtin_text

    student_dir, text, out = tmp_path / "student", tmp_path / "train.txt", tmp_path / "out"
    damaged(tiny_llama()).save_pretrained(student_dir, safe_serialization=True)
    tiny_tokenizer.save_pretrained(student_dir)
    text.write_text(builtin_text()[:60_000], encoding="utf-8")
    script = Path(__file__).resolve().parents[2] / "examples" / "distill_launch.py"
    command = [str(student_dir), str(tiny_model_dir), str(text), str(out), "--samples", "12", "--seq-len", "32",
               "--set", "steps=3", "batch_size=2", "eval_every=1", "lr=3e-3", "precision=fp32"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), *command], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((out / "distill.json").read_text(encoding="utf-8"))
    held_out = [row[2] for row in info["loss_curve"]]
    print(f"example: {info['processes']} processes, held-out loss {held_out}")
    assert info["processes"] == 2 and info["sharding"] == "ddp"
    assert info["best_eval_loss"] < held_out[0]
    trained = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    before = damaged(tiny_llama())
    assert max(float((p - q).abs().max()) for p, q in zip(trained.parameters(), before.parameters())) > 1e-4

    refused = subprocess.run([sys.executable, str(script), *command[:4], "--set", "steps=0"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "steps" in refused.stderr
