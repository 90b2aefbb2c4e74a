"""Atomic artifact output: staging folder beside the destination, manifest last, then one rename."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from llmopt.errors import RecipeError, ResourceError

MANIFEST = "manifest.json"


def check_destination(output: Path, force: bool) -> None:
    if output.exists() and not force:
        raise RecipeError(
            f"Output '{output}' already exists; llmopt never overwrites an artifact unless asked.",
            "Pass --force to replace it (the old one stays intact until the new one is complete), or choose another --output.",
        )
    if output.exists() and not output.is_dir():
        raise RecipeError(f"Output '{output}' exists and is not a folder.", "Choose a folder path for --output.")
    parent = output.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise RecipeError(f"Cannot create the output's parent folder '{parent}': {exc}.", "Choose a writable --output.") from None


class OutputLock:
    """`.NAME.lock` beside the output, holding the pid of the run writing it: two runs never share an output.

    A lock whose process is gone (a run that was killed) is taken over.
    """

    def __init__(self, output: Path) -> None:
        self.output = output
        self.path = output.parent / f".{output.name}.lock"

    def __enter__(self) -> "OutputLock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None:
                    raise RecipeError(
                        f"Another llmopt run (pid {holder}) is writing '{self.output}'.",
                        "Wait for it to finish, or choose another --output.") from None
                self.path.unlink(missing_ok=True)  # stale: its run is gone
                continue
            except OSError as exc:  # the output's folder is read-only, not ours, or not a folder
                raise RecipeError(f"Cannot write next to '{self.output}': {exc.strerror or exc}.",
                                  "Choose an --output in a folder you can write to.") from None
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise RecipeError(f"Cannot take the lock '{self.path}'.", "Remove it if no llmopt run is using that output.")

    def _holder(self) -> int | None:
        """The pid in the lock file if that process is alive, else None."""
        try:
            pid = int(self.path.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def new_staging(output: Path) -> Path:
    """A fresh folder beside `output` (same file system, so the final move is a rename)."""
    staging = output.parent / f".{output.name}.staging-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
    except OSError as exc:
        raise ResourceError(f"Cannot create a staging folder next to '{output}': {exc}.", "Check free space and permissions.") from None
    return staging


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, *, recipe: dict[str, Any], versions: dict[str, str], seed: int) -> dict[str, Any]:
    """manifest.json: sha256 and size of every file, the recipe as run, versions, seed. Written last."""
    files = {
        str(p.relative_to(folder)): {"sha256": _sha256(p), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST
    }
    manifest = {"format_version": 1, "files": files, "recipe": recipe, "versions": versions, "seed": seed}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)
    return manifest


def verify_manifest(folder: Path) -> list[str]:
    """Problems found when checking an artifact folder against its manifest (empty when intact)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"no readable {MANIFEST}: {exc}"]
    problems = []
    for name, meta in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            problems.append(f"missing {name}")
        elif path.stat().st_size != meta["bytes"] or _sha256(path) != meta["sha256"]:
            problems.append(f"changed {name}")
    listed = set(manifest["files"]) | {MANIFEST}
    problems += [f"unexpected {p.relative_to(folder)}" for p in sorted(folder.rglob("*"))
                 if p.is_file() and str(p.relative_to(folder)) not in listed]
    return problems


def promote(staging: Path, output: Path) -> None:
    """Move the complete staging folder into place; an existing output is swapped out, then removed."""
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(output, old)
    try:
        os.replace(staging, output)
    except OSError:
        if old is not None:
            os.replace(old, output)  # put the previous artifact back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
