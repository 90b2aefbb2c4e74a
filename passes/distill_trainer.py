"""The training loop of `distill`: accelerate, exact resume from pickle-free checkpoints, a teacher cache.

accelerate's Accelerator places the model, runs autocast (bf16/fp16), accumulates gradients and, when
started by `accelerate launch`, wraps the model in DistributedDataParallel or shards it with FSDP2
(`fully_shard`): each process trains on its own micro-batches (`batch_size` windows each) and the gradients
are averaged. The same code as on one CPU:

    accelerate launch --multi_gpu --num_processes 4 my_script.py          # a script calling DistillPass(...).run
    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 4 my_script.py

Under FSDP2 the weights are DTensor shards: checkpoints and the best weights are gathered from them
(`full_tensor`, a collective every process joins), the optimizer moments are cut back into shards on resume,
and the trained model is rebuilt unsharded at the end (`unsharded_copy`).

Checkpoints: llmopt.passes.distill_checkpoints (safetensors and JSON only, never pickle).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmopt.artifact import new_scratch
from llmopt.errors import InputError
from llmopt.passes.distill import TrainingConfig, hidden_loss, kl_loss, lm_loss, topk_kl_loss, topk_targets
from llmopt.passes.distill_checkpoints import (RunState, cache_matches, fingerprint, full_tensor, latest_checkpoint,
                                             load_checkpoint, load_optimizer, local_numel, save_checkpoint)

CACHE_FILE = "teacher-topk.safetensors"


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): linear warm-up, cosine to 0.

    The first step already moves (a schedule evaluated at 0 would waste it), and the rate depends on the
    step alone, so a resumed run needs no scheduler state.
    """
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class WindowOrder:
    """The training window read by the n-th sample of the run: a fresh seeded permutation every epoch.

    A pure function of (seed, n), so every process, at any step, finds its batch without a loader's state.
    """

    def __init__(self, windows: list[int], seed: int) -> None:
        self.windows, self.seed = windows, seed
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def take(self, start: int, size: int) -> list[int]:
        out = []
        for n in range(start, start + size):
            epoch, pos = divmod(n, len(self.windows))
            if epoch != self._epoch:
                self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))
            out.append(self.windows[int(self._perm[pos])])
        return out


def split(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) window indices; a seeded choice, so the held-out windows do not depend on order."""
    held = 0 if fraction == 0 else max(1, round(count * fraction))
    if count - held < 1:
        raise InputError(f"distill: {count} windows leave none for training after holding out {held}.",
                         "Raise `calibration.samples`, or lower eval_fraction.")
    order = np.random.default_rng(seed).permutation(count)
    return sorted(int(i) for i in order[held:]), sorted(int(i) for i in order[:held])


class Objective:
    """The weighted loss of a batch of windows, with the teacher's targets computed on the fly or read from disk."""

    def __init__(self, config: TrainingConfig, windows: list[np.ndarray], teacher: Any, layer_map: dict[int, int]):
        self.c, self.windows, self.teacher, self.layer_map = config, windows, teacher, layer_map
        self.cache: Any = None
        self.device = torch.device("cpu")
        self.autocast: Callable[[], Any] = contextlib.nullcontext
        self._teacher_device: torch.device | None = None

    def start(self, accelerator: Any, cache_dir: Path | None) -> None:
        self.device, self.autocast = accelerator.device, accelerator.autocast
        if self.teacher is None:
            return
        self._teacher_device = next(self.teacher.parameters()).device
        if self.c.cache_teacher:  # the key is computed where the weights are, so it does not depend on the device
            key = fingerprint(self.windows, self.teacher, self.c.top_k, self.c.temperature)
        self.teacher.to(self.device)
        if self.c.cache_teacher:
            path = cache_dir / CACHE_FILE
            if not cache_matches(path, key):
                if accelerator.is_main_process:
                    self._write_cache(path, key)
                accelerator.wait_for_everyone()
            self.cache = safe_open(str(path), framework="pt")
            self.teacher.to(self._teacher_device)  # not needed any more: free the accelerator's memory

    def finish(self) -> None:
        self.cache = None
        if self.teacher is not None and self._teacher_device is not None:
            self.teacher.to(self._teacher_device)

    def _write_cache(self, path: Path, key: str) -> None:
        n, length, k, b = len(self.windows), len(self.windows[0]), self.c.top_k, self.c.batch_size
        ids = np.empty((n, length, k), dtype=np.int32)
        logp = np.empty((n, length, k + 1), dtype=np.float32)
        for start in range(0, n, b):
            batch = self._batch(range(start, min(n, start + b)))  # (B, T)
            with torch.no_grad(), self.autocast():
                logits = self.teacher(input_ids=batch, use_cache=False).logits
            top_ids, top_logp = topk_targets(logits, k, self.c.temperature)
            ids[start:start + b], logp[start:start + b] = top_ids.int().cpu().numpy(), top_logp.cpu().numpy()
        tmp = path.with_suffix(".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"ids": torch.from_numpy(ids), "logp": torch.from_numpy(logp)}, str(tmp), metadata={"key": key})
        os.replace(tmp, path)

    def _batch(self, window_ids: Any) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.windows[i] for i in window_ids]).astype(np.int64)).to(self.device)

    def __call__(self, model: Any, window_ids: list[int]) -> torch.Tensor:
        c, ids = self.c, self._batch(window_ids)  # (B, T)
        hidden = c.hidden_weight > 0
        out = model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        loss = torch.zeros((), device=self.device)
        if c.lm_weight:
            loss = loss + c.lm_weight * lm_loss(out.logits, ids)
        if self.cache is not None:
            top_ids = torch.stack([self.cache.get_slice("ids")[i:i + 1][0] for i in window_ids]).long()
            top_logp = torch.stack([self.cache.get_slice("logp")[i:i + 1][0] for i in window_ids])
            kl = topk_kl_loss(out.logits, top_ids.to(self.device), top_logp.to(self.device), c.temperature)
            return loss + c.kl_weight * kl
        if c.kl_weight == 0 and not hidden:
            return loss  # plain language-model fine-tuning: no teacher run
        with torch.no_grad(), self.autocast():
            teacher = self.teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        if c.kl_weight and c.loss == "topk_kl":
            top_ids, top_logp = topk_targets(teacher.logits, c.top_k, c.temperature)
            loss = loss + c.kl_weight * topk_kl_loss(out.logits, top_ids, top_logp, c.temperature)
        elif c.kl_weight:
            kl = kl_loss(out.logits, teacher.logits, c.temperature, reverse=c.loss == "reverse_kl")
            loss = loss + c.kl_weight * kl
        if hidden:
            loss = loss + c.hidden_weight * hidden_loss(out.hidden_states, teacher.hidden_states, self.layer_map)
        return loss


def train(model: Any, objective: Objective, c: TrainingConfig, trainable: list[str], *, seed: int,
          progress: Callable[[int, int], None]) -> tuple[Any, dict[str, Any]]:
    """Train `model` on `objective`; returns it, on the CPU in eval mode with the best weights, and the run's
    info. The same module, trained in place, except under FSDP: fully_shard consumes the module, and the
    returned one is rebuilt from the gathered weights."""
    from accelerate.utils import set_seed

    started = time.perf_counter()
    accelerator = _accelerator(c)
    sharded = _sharded(accelerator)
    set_seed(seed, device_specific=True)  # dropout masks differ per process but repeat run to run
    train_ids, held_out = split(len(objective.windows), c.eval_fraction, seed)
    root = Path(c.checkpoint_dir) if c.checkpoint_dir else None
    params = dict(model.named_parameters())
    chosen = {name: params[name] for name in trainable}
    for name, p in params.items():
        p.requires_grad_(name in chosen)
    checkpointing = c.gradient_checkpointing and not model.is_gradient_checkpointing
    if checkpointing:
        # Non-reentrant: gradients still reach the layers when the embedding is frozen.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    key = fingerprint(objective.windows, model, objective.teacher, c.model_dump_json(
        exclude={"checkpoint_dir", "checkpoint_every"}), seed, accelerator.num_processes, trainable)
    trainable_count = sum(p.numel() for p in chosen.values())
    frozen_count = sum(p.numel() for name, p in params.items() if name not in chosen)
    plain_class = type(model)  # fully_shard swaps the class of the modules it shards
    del params
    if not sharded:  # fully_shard moves each shard to the device itself: the whole model never lands on one GPU
        model.to(accelerator.device)
    # The teacher cache without a checkpoint_dir: a scratch folder named with our pid, which a later run removes
    # if this one is killed (the pipeline gives distill a checkpoint_dir in the output's resume folder instead).
    scratch = new_scratch() if c.cache_teacher and root is None else None
    try:
        objective.start(accelerator, root or scratch)
        decay = [p for p in chosen.values() if p.ndim >= 2]  # matrices; norms and biases are not decayed
        groups = [{"params": decay, "weight_decay": c.weight_decay},
                  {"params": [p for p in chosen.values() if p.ndim < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=c.lr)
        latest = latest_checkpoint(root) if root else None
        run, optimizer_state = load_checkpoint(latest, key, chosen, accelerator) if latest else (RunState(), None)
        resumed_from = run.step
        wrapped, optimizer = accelerator.prepare(model, optimizer)
        if sharded:  # fully_shard replaced the parameters by DTensor shards, under the same names
            chosen = {name: p for name, p in wrapped.named_parameters() if name in chosen}
        held = sum(local_numel(p) for p in wrapped.parameters())  # by this process: all, or its shards
        if optimizer_state is not None:  # after prepare: FSDP's optimizer holds the shards, not the old tensors
            load_optimizer(optimizer, optimizer_state)
        inner = accelerator.unwrap_model(wrapped)  # for evaluation: no DDP collectives, autocast kept

        def evaluate() -> float | None:
            if not held_out:
                return None
            inner.eval()
            world = accelerator.num_processes
            mine = held_out[accelerator.process_index::world]
            # Under FSDP every forward all-gathers the weights, so every process runs as many batches as the
            # busiest one; a process with fewer windows repeats one with weight 0.
            batches = math.ceil(math.ceil(len(held_out) / world) / c.batch_size) if sharded else \
                math.ceil(len(mine) / c.batch_size)
            total = torch.zeros(2, device=accelerator.device)  # (sum of batch losses * windows, windows)
            with torch.no_grad():
                for i in range(batches):
                    chunk = mine[i * c.batch_size:(i + 1) * c.batch_size]
                    count = len(chunk)
                    total += torch.stack([objective(inner, chunk or held_out[:1]).float() * count, torch.tensor(
                        float(count), device=accelerator.device)])
            total = accelerator.reduce(total, "sum")
            wrapped.train()
            return float(total[0] / total[1])

        def record(step: int, train_loss: float | None, eval_loss: float | None) -> None:
            run.curve.append([step, train_loss, eval_loss])
            if eval_loss is None:
                return
            if run.best_loss is None or eval_loss < run.best_loss:  # NaN never improves
                run.best_loss, run.best_step, run.bad_evals = eval_loss, step, 0
                run.best = {n: full_tensor(p.detach()).to("cpu", copy=True) for n, p in chosen.items()}
            else:
                run.bad_evals += 1
                run.stopped_early = c.early_stopping_patience is not None and run.bad_evals >= c.early_stopping_patience

        if not run.curve and held_out:
            record(0, None, evaluate())  # the starting point: kept if training only makes things worse
        order = WindowOrder(train_ids, seed)
        world, rank, every = accelerator.num_processes, accelerator.process_index, c.checkpoint_every or c.eval_every
        loop_started = time.perf_counter()
        wrapped.train()
        while run.step < c.steps and not run.stopped_early:
            for group in optimizer.param_groups:
                group["lr"] = c.lr * lr_factor(run.step, c.warmup, c.steps)
            losses = []
            for micro in range(c.grad_accum):
                batch = order.take(((run.step * c.grad_accum + micro) * world + rank) * c.batch_size, c.batch_size)
                with accelerator.accumulate(wrapped):  # no gradient all-reduce until the last micro-batch
                    loss = objective(wrapped, batch)
                    accelerator.backward(loss)  # divides by grad_accum
                    if accelerator.sync_gradients and c.max_grad_norm:
                        accelerator.clip_grad_norm_(list(chosen.values()), c.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach().float())
            run.step += 1
            train_loss = float(accelerator.reduce(torch.stack(losses).mean(), "mean"))
            due = run.step % c.eval_every == 0 or run.step == c.steps
            record(run.step, train_loss, evaluate() if due else None)
            if root and (run.step % every == 0 or run.step == c.steps or run.stopped_early):
                save_checkpoint(root, run, chosen, optimizer, accelerator, key, gather=sharded)
            progress(run.step, c.steps)
        loop_seconds = time.perf_counter() - loop_started
    finally:
        objective.finish()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if sharded:
        model = unsharded_copy(wrapped, plain_class, run.best or {})
    else:
        with torch.no_grad():
            for name, value in (run.best or {}).items():
                chosen[name].copy_(value)
        model = accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)  # drops the autocast forward too
        if checkpointing:
            model.gradient_checkpointing_disable()
    accelerator.free_memory()
    model.to("cpu").eval()
    tokens_per_step = c.grad_accum * c.batch_size * world * len(objective.windows[0])
    return model, {
        "steps": c.steps, "steps_done": run.step, "resumed_from_step": resumed_from, "stopped_early": run.stopped_early,
        "tokens_seen": run.step * tokens_per_step, "train_windows": len(train_ids), "held_out_windows": len(held_out),
        "best_eval_loss": run.best_loss, "best_step": run.best_step, "loss_curve": run.curve,
        "seconds": time.perf_counter() - started,
        "tokens_per_s": (run.step - resumed_from) * tokens_per_step / loop_seconds if run.step > resumed_from else None,
        "trainable_parameters": trainable_count, "frozen_parameters": frozen_count,
        "device": str(accelerator.device), "processes": world, "precision": accelerator.mixed_precision,
        "sharding": "fsdp2" if sharded else ("ddp" if world > 1 else None), "parameters_per_process": held,
    }


def _accelerator(c: TrainingConfig) -> Any:
    from accelerate import Accelerator

    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}.get(c.precision)
    if mixed is None:  # auto: the recipe decides, not the launcher's flags, so a run can be replayed
        mixed = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if torch.cuda.is_available() else "no"
    try:
        accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=c.grad_accum)
    except ValueError as exc:  # accelerate keeps one precision per process; fp16 needs a GPU
        raise InputError(f"distill: precision '{c.precision}' cannot be used here: {exc}",
                         "Use fp32 or bf16 on a CPU, and one precision for every distill pass of a recipe.") from None
    return accelerator


def _sharded(accelerator: Any) -> bool:
    """Whether `accelerate launch` asked for FSDP; only FSDP2 (per-parameter DTensor shards, names unchanged)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return False
    if accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise InputError("distill runs under FSDP version 2 only; this launch asked for FSDP version "
                         f"{accelerator.state.fsdp_plugin.fsdp_version} (its flat parameters rename the weights "
                         "the pass trains and checkpoints).",
                         "Launch with `accelerate launch --use_fsdp --fsdp_version 2 ...` (or set fsdp_version: 2 "
                         "in the accelerate config).")
    return True


def unsharded_copy(wrapped: Any, plain_class: type, best: dict[str, torch.Tensor]) -> Any:
    """A plain (unsharded, hook-free) model on the CPU with the trained weights, on every process.

    fully_shard rewrites the model in place (DTensor parameters, gathering hooks, a swapped class) and torch
    has no call that undoes it, so the module is rebuilt on the meta device and given the gathered weights.
    """
    weights = {name: best[name] if name in best else full_tensor(p.detach()).cpu()
               for name, p in wrapped.named_parameters()}
    with torch.device("meta"):
        model = plain_class(wrapped.config)
    model.load_state_dict(weights, strict=False, assign=True)
    for name, buffer in wrapped.named_buffers():  # rotary tables etc.: not sharded, and not all in the state dict
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buffer.detach().cpu()
    model.tie_weights()
    model.generation_config = wrapped.generation_config
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"distill under FSDP: no weights gathered for {left[:3]}")
    return model
