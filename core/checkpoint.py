"""Checkpoint safety: check a folder's weight files before transformers reads any of them.

What is checked, and by whom:
- every *.safetensors header, by safetensors' own reader (`safe_open`): it refuses a file shorter than its
  header, a header length larger than the file, a header that is not JSON, and tensor offsets that overlap,
  leave gaps or do not cover the file exactly. No hand-written header parsing is needed for any of these.
- a shard index (model.safetensors.index.json, pytorch_model.bin.index.json), by hand because no library
  checks it before use: every shard it names is a file inside the folder (no `../`, no absolute path, no
  symlink leading outside), exists, and holds the tensors the index says it does.
- weight files that are symlinks must stay inside the folder (a hub snapshot's links into the cache's
  blobs/ folder count as inside: the caller passes the repository's cache folder as `root`).
- the attention projections' shapes agree with the config's head counts (a config edited by hand, or
  weights from another model, otherwise fail deep inside transformers or load silently wrong).
- pickle weights (only with allow_pickle): each file is unpickled with torch's weights_only unpickler,
  which refuses any callable, so a malicious file is rejected before transformers opens it.
- after loading: every weight is finite (`nonfinite_parameters`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from llmopt.errors import InputError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# The pickle files transformers loads; others in a repository (training_args.bin, optimizer.pt) are never read.
_PICKLE_WEIGHTS = re.compile(r"^pytorch_model(-\d+-of-\d+)?\.bin$")
MAX_INDEX_BYTES = 64 << 20  # an index lists tensor names; even huge models stay far below this
_CORRUPT_HINT = "Re-download or re-save the checkpoint; the file is damaged or was not written completely."


def check_checkpoint(folder: Path, config: dict[str, Any], *, allow_pickle: bool, root: Path | None = None) -> None:
    """Raise InputError if the weight files of `folder` are unsafe or inconsistent. Reads headers only."""
    root = (root or folder).resolve()
    shapes: dict[str, tuple[int, ...]] = {}
    safetensors_files = sorted(folder.glob("*.safetensors"))
    for path in safetensors_files:
        _check_inside(path, root, folder)
        shapes.update(read_safetensors_shapes(path))
    if (folder / SAFETENSORS_INDEX).exists():
        for shard, names in read_shard_index(folder, SAFETENSORS_INDEX, root).items():
            present = read_safetensors_shapes(folder / shard)
            missing = [n for n in names if n not in present]
            if missing:
                raise InputError(f"'{folder / SAFETENSORS_INDEX}' says shard '{shard}' holds '{missing[0]}', "
                                 f"but that shard has no such tensor ({len(missing)} missing).", _CORRUPT_HINT)
            shapes.update(present)
    check_head_shapes(config, shapes, folder)
    if allow_pickle and not safetensors_files:  # transformers reads pickle files only when no safetensors exist
        pickles = [p for p in sorted(folder.iterdir()) if _PICKLE_WEIGHTS.match(p.name)]
        if (folder / PICKLE_INDEX).exists():
            pickles += [folder / s for s in read_shard_index(folder, PICKLE_INDEX, root) if folder / s not in pickles]
        for path in pickles:
            _check_inside(path, root, folder)
            check_pickle_weights(path)


def read_safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a .safetensors header, or InputError if the file is not a valid one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118 (a handle, not a dict)
    except SafetensorError as exc:
        reason = str(exc).removeprefix("Error while deserializing header: ")
        raise InputError(f"'{path}' is not a valid safetensors file: {reason}.", _CORRUPT_HINT) from None
    except OSError as exc:
        raise InputError(f"Cannot read '{path}': {exc.strerror or exc}.", _CORRUPT_HINT) from None


def read_shard_index(folder: Path, index_name: str, root: Path | None = None) -> dict[str, list[str]]:
    """Shard file -> tensor names from a shard index, each shard checked to be an existing file inside `root`."""
    index_path = folder / index_name
    root = (root or folder).resolve()
    try:
        if index_path.stat().st_size > MAX_INDEX_BYTES:
            raise InputError(f"'{index_path}' is larger than {MAX_INDEX_BYTES >> 20} MiB.", _CORRUPT_HINT)
        index = json.loads(index_path.read_bytes())
    except OSError as exc:
        raise InputError(f"Cannot read '{index_path}': {exc.strerror or exc}.", _CORRUPT_HINT) from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InputError(f"'{index_path}' is not valid JSON ({exc}).", _CORRUPT_HINT) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise InputError(f"'{index_path}' has no `weight_map` of tensor names to shard files.", _CORRUPT_HINT)
    shards: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        shards.setdefault(shard, []).append(tensor)
    for shard in shards:
        if not shard or Path(shard).is_absolute() or "\x00" in shard:
            raise InputError(f"'{index_path}' names shard '{shard}', which is not a file name inside the checkpoint "
                             "folder; llmopt reads no file outside it.", _CORRUPT_HINT)
        path = folder / shard
        _check_inside(path, root, folder, named_by=index_path)
        if not path.is_file():
            raise InputError(f"'{index_path}' names shard '{shard}', which is missing from '{folder}'.",
                             "Download or copy every shard listed in the index next to it.")
    return shards


def _check_inside(path: Path, root: Path, folder: Path, named_by: Path | None = None) -> None:
    """Refuse a path that resolves (through `..` or symlinks) outside `root`."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise InputError(f"Cannot resolve '{path}': {exc}.", _CORRUPT_HINT) from None
    if not resolved.is_relative_to(root):
        source = f"'{named_by}' names '{path.relative_to(folder)}', which" if named_by else f"'{path}'"
        raise InputError(f"{source} leads outside the checkpoint folder (to '{resolved}'); llmopt reads no weight "
                         "file outside it.", "Copy the weight files into the checkpoint folder itself.")


def check_head_shapes(config: dict[str, Any], shapes: dict[str, tuple[int, ...]], folder: Path) -> None:
    """Attention projections must match the config's head counts (Llama-style names; others are not checked)."""
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if not (isinstance(hidden, int) and isinstance(heads, int) and heads > 0):
        return
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    if not (isinstance(kv_heads, int) and isinstance(head_dim, int)):
        return
    expected_rows = {"q_proj": heads * head_dim, "k_proj": kv_heads * head_dim, "v_proj": kv_heads * head_dim}
    for name, shape in shapes.items():
        match = re.search(r"self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight$", name)
        if not match or len(shape) != 2:
            continue
        proj = match.group(1)
        if proj == "o_proj":
            expected, got, what = heads * head_dim, shape[1], "columns"
        else:
            expected, got, what = expected_rows[proj], shape[0], "rows"
        if got != expected:
            raise InputError(
                f"'{folder}': {name} has {got} {what}, but config.json (num_attention_heads={heads}, "
                f"num_key_value_heads={kv_heads}, head_dim={head_dim}) needs {expected}.",
                "The config and the weights belong to different models: restore the config.json that came with "
                "these weights.")


def check_pickle_weights(path: Path) -> None:
    """Unpickle with torch's weights_only unpickler (tensors and plain containers only, never a callable)."""
    import pickle

    import torch

    try:
        # map_location="meta": the check allocates no tensor memory; transformers loads the weights afterwards.
        torch.load(path, map_location="meta", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch's message carries terminal colour codes
        # torch's message is a page of advice (including how to disable the check); keep only the reason.
        reason = re.search(r"WeightsUnpickler error: ([^\n]*?)\.?(?: Please|\n|$)", text)
        reason_text = reason.group(1) if reason else (text.strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(
            f"'{path}' was refused by torch's safe unpickler (weights_only=True): {reason_text[:200]}. "
            "It asks to call code or is not a plain tensor checkpoint, so it was not loaded.",
            "Use a safetensors copy of the weights, or re-save them with torch.save from a trusted environment.",
        ) from None


def nonfinite_parameters(model: Any) -> list[str]:
    """Names of the model's parameters that hold a NaN or an infinity (each tied tensor once)."""
    import torch

    return [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
