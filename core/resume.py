"""`--resume`: a run killed after some passes continues from the last completed one.

After each pass the pipeline writes the ModelState to `.NAME.resume/pass-NN/` beside the output (NN passes done):
the torch weights (`model.safetensors`, tied tensors once), the model config, the quantization codes, scales and
zero points (`quantized.safetensors`, their metadata in JSON), the pass records, `precision`, `graph_fusions` and
the random generators' states, so that the passes after it draw the same numbers as in an uninterrupted run.
Nothing is pickled. A checkpoint is written under a `.tmp` name and renamed when complete; the previous one is then
removed, so at most one full copy of the model is kept. A distill pass keeps its step checkpoints in
`.NAME.resume/distill-NN/` and continues from the latest one.

The folder is tied to the output (one run at a time holds the output's lock) and carries a fingerprint of what
decides the passes' results: the recipe, the model files (paths, sizes and modification times: hashing a 28 GB
checkpoint would take minutes), and the versions of llmopt, torch and transformers. A run that unwinds (success,
error, Ctrl-C, SIGTERM) removes the folder, as it removes its staging folder; only a run that could not unwind
(SIGKILL, the OOM killer) leaves it for `--resume`. Checkpoints are not fsynced (that would stall every pass on
the disk): after a power cut a checkpoint may be cut short, and resuming from it is refused with a clear error.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmopt.errors import InputError, RecipeError

RUN_FILE = "run.json"


def resume_folder(output: Path) -> Path:
    return output.parent / f".{output.name}.resume"


def fingerprint(recipe: dict[str, Any], source: Any, versions: dict[str, str]) -> dict[str, str]:
    """Digests of what shapes the passes' numbers: the resolved recipe, the model's files, the library versions."""
    model_files: list[Any] = []
    root = Path(source.path)
    if root.is_dir():
        for path in sorted(root.rglob("*")):
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts):
                st = path.stat()  # follows a hub snapshot's symlinks to the blobs
                model_files.append([str(path.relative_to(root)), st.st_size, st.st_mtime_ns])
    parts = {
        "recipe": recipe,
        "model": {"path": str(root.resolve()) if root.exists() else source.path, "gguf_file": source.gguf_file,
                  "revision": source.revision, "files": model_files},
        "versions": {name: versions.get(name) for name in ("llmopt", "torch", "transformers")},
    }
    return {name: hashlib.sha256(json.dumps(part, sort_keys=True, default=str).encode()).hexdigest()[:16]
            for name, part in parts.items()}


# How a changed part of the fingerprint is named in the error.
_CHANGED = {"recipe": "the recipe (its passes, export, evaluation, seed or model)", "model": "the model's files",
            "versions": "the llmopt, torch or transformers version"}


@dataclass
class Restored:
    state: Any  # ModelState
    records: list[dict[str, Any]]  # PassRecord fields of the passes done, in order
    passes_done: int


class ResumeStore:
    """The resume folder of one output, owned by the run that holds the output's lock."""

    def __init__(self, output: Path, key: dict[str, str]) -> None:
        self.output, self.key = output, key
        self.folder = resume_folder(output)

    def start(self, resume: bool) -> bool:
        """Prepare the folder; True when a checkpoint of this same run is there to continue from.

        Without `resume`, whatever a killed run left is removed. With it, a folder of another run is an error:
        resuming would mix two recipes or models, and starting afresh silently could throw away hours of work.
        """
        if resume and self.folder.is_dir():
            try:
                found = json.loads((self.folder / RUN_FILE).read_text(encoding="utf-8"))["key"]
            except (OSError, ValueError, KeyError, TypeError):  # killed before run.json was complete: nothing to
                found = None  # continue from
            if not isinstance(found, dict):
                found = None
            if found is not None and found != self.key:
                changed = [_CHANGED.get(name, name) for name in self.key if found.get(name) != self.key[name]]
                raise RecipeError(
                    f"Cannot resume into '{self.output}': the checkpoint in '{self.folder}' was made by a different "
                    f"run ({', '.join(changed)} changed since), and continuing it would mix the two.",
                    "Run again with the original recipe and model, or without --resume to start afresh (the old "
                    "checkpoint is then removed).")
            if found == self.key:
                return True
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(exist_ok=True)
        tmp = self.folder / f"{RUN_FILE}.tmp"
        tmp.write_text(json.dumps({"key": self.key}) + "\n", encoding="utf-8")
        os.replace(tmp, self.folder / RUN_FILE)
        return False

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def distill_dir(self, index: int) -> Path:
        return self.folder / f"distill-{index:02d}"

    def checkpointing(self, pass_: Any, index: int) -> Any:
        """`pass_`, with its step checkpoints in this folder when it keeps some (distill's `checkpoint_dir`) and
        the recipe chose no folder: a killed pass then continues from its last step, not from its start. The
        folder is left out of distill's own fingerprint, so this changes nothing in what it computes."""
        config = pass_.config
        if "checkpoint_dir" not in type(config).model_fields or config.checkpoint_dir is not None:
            return pass_
        pass_ = copy.copy(pass_)  # the plan's pass stays as the recipe made it
        pass_.config = config.model_copy(update={"checkpoint_dir": str(self.distill_dir(index))})
        return pass_

    def latest(self) -> Path | None:
        done = sorted(p for p in self.folder.glob("pass-*") if p.is_dir() and not p.name.endswith(".tmp"))
        return done[-1] if done else None

    def save(self, passes_done: int, state: Any, records: list[dict[str, Any]]) -> None:
        """Checkpoint `state` after `passes_done` passes; then drop the older checkpoint and finished distill
        checkpoints."""
        import numpy as np
        import torch
        from safetensors.numpy import save_file as save_numpy
        from safetensors.torch import save_file, save_model

        folder = self.folder / f"pass-{passes_done:02d}"
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_model(state.model, str(tmp / "model.safetensors"))  # tied tensors once, as safetensors requires
        arrays, quantized = {}, {}
        for name, qt in state.quantized.items():
            for part in ("codes", "scales", "zero_points"):
                arrays[f"{name}.{part}"] = np.ascontiguousarray(getattr(qt, part))
            quantized[name] = {"kind": qt.kind, "bits": qt.bits, "group_size": qt.group_size,
                               "symmetric": qt.symmetric, "activations": qt.activations}
        save_numpy(arrays, str(tmp / "quantized.safetensors"))
        np_state = np.random.get_state()
        rng = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_state[1].astype(np.int64))}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(tmp / "rng.safetensors"))
        python_rng = random.getstate()
        meta = {
            "key": self.key, "passes_done": passes_done, "records": records, "config": _config_json(state.model.config),
            "quantized": quantized, "pass_info": state.pass_info, "precision": state.precision,
            "graph_fusions": state.graph_fusions,
            "numpy_rng": [np_state[0], np_state[2], np_state[3], np_state[4]],
            "python_rng": [python_rng[0], list(python_rng[1]), python_rng[2]],
        }
        (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")
        os.replace(tmp, folder)
        for old in self.folder.glob("pass-*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
        for index in range(passes_done):
            shutil.rmtree(self.distill_dir(index), ignore_errors=True)

    def restore(self, state: Any) -> Restored:
        """The latest checkpoint applied to `state` (the freshly loaded input model), generators included."""
        from safetensors import SafetensorError

        folder = self.latest()
        try:
            return self._read(folder, state)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
            # Files cut short: written but not yet on disk when the machine lost power, or edited by hand.
            raise InputError(f"The checkpoint '{folder}' cannot be loaded: {type(exc).__name__}: {exc}",
                             "Run again without --resume to start afresh.") from None

    def _read(self, folder: Path, state: Any) -> Restored:
        import numpy as np
        import torch
        from safetensors.numpy import load_file as load_numpy
        from safetensors.torch import load_file, load_model

        from llmopt.quantized import QuantizedTensor, simulate_int8_activations
        from llmopt.state import ModelState

        meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        if meta["key"] != self.key:  # run.json said otherwise: a folder edited by hand
            raise ValueError("it belongs to another run")
        model = _model_for_config(state.model, meta["config"])
        load_model(model, str(folder / "model.safetensors"))  # strict: every tensor present, shapes equal
        model.eval()
        arrays = load_numpy(str(folder / "quantized.safetensors"))
        quantized = {name: QuantizedTensor(name=name, codes=arrays[f"{name}.codes"], scales=arrays[f"{name}.scales"],
                                           zero_points=arrays[f"{name}.zero_points"], **fields)
                     for name, fields in meta["quantized"].items()}
        for name, qt in quantized.items():
            if qt.activations == "int8" and qt.kind == "linear":  # a forward hook: not part of the weights
                simulate_int8_activations(model.get_submodule(name.removesuffix(".weight")))
        rng = load_file(str(folder / "rng.safetensors"))
        torch.set_rng_state(rng["torch"])
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        kind, pos, has_gauss, cached = meta["numpy_rng"]
        np.random.set_state((kind, rng["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
        version, internal, gauss_next = meta["python_rng"]
        random.setstate((version, tuple(internal), gauss_next))
        restored = ModelState(model, state.tokenizer, quantized=quantized, pass_info=meta["pass_info"],
                              precision=meta["precision"], graph_fusions=meta["graph_fusions"])
        return Restored(restored, meta["records"], meta["passes_done"])


def _config_json(config: Any) -> dict[str, Any]:
    return json.loads(config.to_json_string(use_diff=False))


def _model_for_config(model: Any, saved: dict[str, Any]) -> Any:
    """`model` itself when the passes kept its architecture; else a model of the same class built from its config
    with the passes' changes (pruned widths, heads or layers, untied head) applied, its weights left to load."""
    from transformers.initialization import no_init_weights

    current = _config_json(model.config)
    if current == saved:
        return model
    config = copy.deepcopy(model.config)
    for key, value in saved.items():
        if current.get(key, object()) != value:
            setattr(config, key, value)
    for key in set(current) - set(saved):
        delattr(config, key)
    if _config_json(config) != saved:
        raise ValueError(f"its model config cannot be rebuilt as a {type(config).__name__}")
    with no_init_weights():  # the checkpoint overwrites every weight: skip the random initialization
        rebuilt = type(model)(config)
    from llmopt.experts import unfuse_experts

    unfuse_experts(rebuilt)  # the checkpoint names experts one by one, as the pipeline's model has them
    rebuilt.generation_config = copy.deepcopy(model.generation_config)
    return rebuilt
