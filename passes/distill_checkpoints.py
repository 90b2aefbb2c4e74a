"""Pickle-free checkpoints of the `distill` training loop (llmopt.passes.distill_trainer).

Checkpoints (`checkpoint_dir/step-NNNNNN/`) hold only safetensors and JSON, so resuming never unpickles
anything (the project refuses pickle checkpoints by default, and accelerate's save_state pickles the
optimizer and RNG states): `weights.safetensors` (the trainable parameters: frozen ones never change, so a
`train_only` run writes small checkpoints), `best.safetensors` (the trainable parameters at the best
held-out loss), `optimizer.safetensors` (AdamW moments), `rng-<process>.safetensors` and `state.json`
(step, loss curve, early-stopping counters, optimizer hyper-parameters, fp16 loss scale, and a fingerprint
of the config, data and models: a checkpoint of another run is refused). The learning rate and the data
order are pure functions of the step, so nothing else is needed for a resumed run to take the same steps
as an uninterrupted one. A folder is written under a `.tmp` name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llmopt.errors import InputError


@dataclass
class RunState:
    """What a checkpoint restores besides weights and optimizer: the run's position and history."""

    step: int = 0
    curve: list[list[Any]] = field(default_factory=list)  # [step, train loss | None, held-out loss | None]
    best_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    best: dict[str, torch.Tensor] | None = None  # trainable weights at best_step, on the CPU


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every process calls it, in the same order), else `t`."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local_numel(t: torch.Tensor) -> int:
    """Elements this process stores for `t`: its shard of an FSDP2 DTensor, else all of them."""
    from torch.distributed.tensor import DTensor

    return t.to_local().numel() if isinstance(t, DTensor) else t.numel()


def fingerprint(*parts: Any) -> str:
    """A short digest of windows (arrays), models (config, parameter shapes and sums) and plain values."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, list) and part and isinstance(part[0], np.ndarray):
            for w in part:
                h.update(np.ascontiguousarray(w, dtype=np.int64).tobytes())
        elif hasattr(part, "named_parameters"):
            h.update(part.config.to_json_string().encode())
            with torch.no_grad():
                for name, p in part.named_parameters():
                    h.update(f"{name}{tuple(p.shape)}{float(p.double().sum()):.12e}".encode())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()[:20]


def cache_matches(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("key") == key


def latest_checkpoint(root: Path) -> Path | None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def save_checkpoint(root: Path, run: RunState, chosen: dict[str, torch.Tensor], optimizer: Any, accelerator: Any,
                    key: str, *, gather: bool = False) -> None:
    """Write step-NNNNNN/; `gather`: the tensors are FSDP shards, which every process helps to gather."""
    folder = root / f"step-{run.step:06d}"
    tmp = folder.with_name(folder.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rng = {"cpu": torch.get_rng_state()}
    if accelerator.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(accelerator.device)
    save_file(rng, str(tmp / f"rng-{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process or gather:
        weights = {n: full_tensor(p.detach()).cpu().contiguous() for n, p in chosen.items()}
        state = optimizer.state_dict()
        tensors = {f"{i}.{k}": full_tensor(v.detach()).cpu().contiguous() for i, s in state["state"].items()
                   for k, v in s.items() if torch.is_tensor(v)}
    if accelerator.is_main_process:
        save_file(weights, str(tmp / "weights.safetensors"))
        if run.best is not None:
            save_file(run.best, str(tmp / "best.safetensors"))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        meta = {"key": key, "step": run.step, "curve": run.curve, "best_loss": run.best_loss,
                "best_step": run.best_step, "bad_evals": run.bad_evals, "stopped_early": run.stopped_early,
                "param_groups": state["param_groups"], "scaler": scaler}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        for old in root.glob("step-*"):
            if old != folder and not old.name.endswith(".tmp"):
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(folder: Path, key: str, chosen: dict[str, torch.Tensor],
                    accelerator: Any) -> tuple[RunState, dict[str, Any]]:
    """Put the checkpoint's weights, RNG and loss scale in place; returns the run state and the optimizer's
    (whole, unsharded) state dict, which `load_optimizer` gives to the prepared optimizer."""
    meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    if meta["key"] != key:
        raise InputError(f"The checkpoint in {folder.parent} belongs to another run (different config, data, "
                         "models or number of processes).",
                         "Delete that folder to start afresh, or set another checkpoint_dir.")
    with torch.no_grad():
        for name, value in load_file(str(folder / "weights.safetensors")).items():
            chosen[name].copy_(value)
    state: dict[int, dict[str, Any]] = {}
    for name, value in load_file(str(folder / "optimizer.safetensors")).items():
        index, field_name = name.split(".", 1)
        state.setdefault(int(index), {})[field_name] = value
    groups = [{**g, "betas": tuple(g["betas"])} for g in meta["param_groups"]]
    if meta["scaler"] is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(meta["scaler"])
    rng_file = folder / f"rng-{accelerator.process_index}.safetensors"
    if rng_file.is_file():
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and accelerator.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], accelerator.device)
    best_file = folder / "best.safetensors"
    run = RunState(step=meta["step"], curve=meta["curve"], best_loss=meta["best_loss"], best_step=meta["best_step"],
                   bad_evals=meta["bad_evals"], stopped_early=meta["stopped_early"],
                   best=load_file(str(best_file)) if best_file.is_file() else None)
    return run, {"state": state, "param_groups": groups}


def load_optimizer(optimizer: Any, state_dict: dict[str, Any]) -> None:
    """Load whole moments into `optimizer`, each cut to its parameter's FSDP shard when the parameter is one."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, fields in state_dict["state"].items():
        p = params[index]
        if isinstance(p, DTensor):
            for name, value in fields.items():
                if value.shape == p.shape:  # exp_avg, exp_avg_sq; `step` is a plain scalar
                    fields[name] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
    optimizer.load_state_dict(state_dict)
