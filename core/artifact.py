"""Atomic artifact output: staging folder beside the destination, manifest last, then one atomic swap.

A run can be killed (SIGKILL, power cut of the process) at any instant, so no cleanup code can be relied on: the
output is only ever changed by one rename or exchange, and every folder a run creates carries its pid in its name
(`.NAME.staging-PID-*`, `.NAME.old-PID-*`, `llmopt-PID-*` in TMPDIR) so that a later run can tell a dead run's
leftovers from a live run's work and remove only the former.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Self

from llmopt.errors import RecipeError, ResourceError
from llmopt.write_safety import MANIFEST, Input, check_artifact_output, nearest_writable_folder, real


def check_destination(output: Path, force: bool, inputs: Iterable[Input] = (), *, dry_run: bool = False) -> Path:
    """The resolved artifact folder to write, checked before anything runs: the write-safety rule
    (llmopt.write_safety), an existing output only with --force, a parent folder that exists or can be made.
    A dry run creates nothing and only checks that the parent could be made."""
    if not dry_run:
        _restore_backup(real(output))
    target = check_artifact_output(output, inputs, force)
    if target.exists() and not force:
        raise RecipeError(
            f"Output '{output}' already exists; llmopt never overwrites an artifact unless asked.",
            "Pass --force to replace it (the old one stays intact until the new one is complete), or choose another --output.",
        )
    if target.exists() and not target.is_dir():
        raise RecipeError(f"Output '{output}' exists and is not a folder.", "Choose a folder path for --output.")
    parent = target.parent
    if dry_run:
        if nearest_writable_folder(parent) is None:
            raise RecipeError(f"Cannot create '{output}': no writable folder on the way to it.",
                              "Choose an --output in a folder you can write to.")
    elif not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise RecipeError(f"Cannot create the output's parent folder '{parent}': {exc}.", "Choose a writable --output.") from None
    return target


def remove_tree(path: Path) -> None:
    """Remove a folder we created, or the symlink left where one was (rmtree refuses a symlink)."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


class OutputLock:
    """`.NAME.lock` beside the output, holding the pid of the run writing it: two runs never share an output.

    The exclusion is an advisory lock (flock) on that file, not the file's existence: the kernel drops it when its
    process dies, however it dies, so a killed run's lock is free at once, and there is no moment (a file created
    but its pid not yet written, a stale lock being removed) when two runs can both think it theirs. The pid inside
    is for the message; a live pid there also holds the output (a run without the flock, such as an older llmopt).
    """

    def __init__(self, output: Path) -> None:
        self.output = output
        self.path = output.parent / f".{output.name}.lock"
        self.fd: int | None = None

    def __enter__(self) -> Self:
        for _ in range(10):  # a retry only when a finishing holder removed the file between our open and lock
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:  # the output's folder is read-only, not ours, or not a folder
                raise RecipeError(f"Cannot write next to '{self.output}': {exc.strerror or exc}.",
                                  "Choose an --output in a folder you can write to.") from None
            if not _try_flock(fd):
                holder = _read_pid(fd)
                os.close(fd)
                raise self._held(holder)
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # we locked a file its holder has just unlinked: lock the one now at the path
                os.close(fd)
                continue
            holder = _read_pid(fd)
            if holder is not None and _alive(holder):
                os.close(fd)
                raise self._held(holder)
            self._write_pid(fd)  # the previous content, if any, was a killed run's
            self.fd = fd
            return self
        raise RecipeError(f"Cannot take the lock '{self.path}'.", "Remove it if no llmopt run is using that output.")

    def _held(self, holder: int | None) -> RecipeError:
        who = f"pid {holder}" if holder is not None else "just starting"
        return RecipeError(f"Another llmopt run ({who}) is writing '{self.output}'.",
                           "Wait for it to finish, or choose another --output.")

    def _write_pid(self, fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)

    def __exit__(self, *exc) -> None:
        # Unlinked while still locked, then released: a run waiting on this file finds it gone and retries.
        self.path.unlink(missing_ok=True)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _try_flock(fd: int) -> bool:
    """Lock `fd` exclusively without waiting; False when another process holds it. Where the system has no flock
    (not POSIX), True: the pid in the file is then the only guard."""
    try:
        import fcntl
    except ImportError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):  # empty: its holder has not written it yet
        return None


def _alive(pid: int) -> bool:
    """Whether process `pid` runs. psutil, not os.kill(pid, 0): that would terminate the process on Windows, and a
    killed run its parent has not reaped yet (a zombie) is dead for our purposes."""
    import psutil

    if pid <= 0 or not psutil.pid_exists(pid):  # 0 is the kernel's, never a run's
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's process: alive
        return True


def _dead_runs(folder: Path, prefix: str) -> list[Path]:
    """Entries `PREFIX<pid>-*` in `folder` whose run is gone (a pid that is alive again, reused, keeps its entry)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)-")
    found = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    for path in entries:
        match = pattern.match(path.name)
        if match and not _alive(int(match.group(1))):
            found.append(path)
    return found


def _restore_backup(output: Path) -> None:
    """Put back the previous artifact when a run was killed between the two renames of `promote`'s fallback."""
    if output.exists():
        return
    for backup in _dead_runs(output.parent, f".{output.name}.old-"):
        if verify_manifest(backup):  # its removal had begun (the swap was done, then the output was deleted)
            continue
        try:
            os.rename(backup, output)
            return
        except OSError:  # another run restored it first, or it is not ours to move
            continue


def _remove_dead_runs_leftovers(output: Path) -> None:
    """Staging folders of killed runs, and backups whose output is in place (a kill while the backup was removed)."""
    leftovers = _dead_runs(output.parent, f".{output.name}.staging-")
    if output.exists():
        leftovers += _dead_runs(output.parent, f".{output.name}.old-")
    for path in leftovers:
        remove_tree(path)


def new_scratch() -> Path:
    """A fresh scratch folder in the temp folder (TMPDIR), after removing those of killed runs."""
    temp = Path(tempfile.gettempdir())
    for path in _dead_runs(temp, "llmopt-"):
        shutil.rmtree(path, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"llmopt-{os.getpid()}-"))


def new_staging(output: Path) -> Path:
    """A fresh folder beside `output` (same file system, so the final move is a rename). Called under the output's
    lock: what killed runs left beside `output` is removed first."""
    _remove_dead_runs_leftovers(output)
    staging = output.parent / f".{output.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
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
    """Problems found when checking an artifact folder against its manifest (empty when intact).

    What this proves: that no file was changed, removed or added by accident (a bad copy, a truncated
    download, an edit) since llmopt wrote the artifact. Not who wrote it: anyone can re-hash the files and
    rewrite the manifest, so a manifest is no signature (sign manifest.json with an external tool, e.g.
    sigstore or gpg, for that). The check never leaves the folder: a listed name that climbs out (`../`, an
    absolute path) or a symlink is a problem, not something to follow.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        return [f"no readable {MANIFEST}: {exc}"]
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return [f"{MANIFEST} has no `files` mapping of file names to sha256 and size"]
    root = folder.resolve()
    problems = []
    for name, meta in files.items():
        path = folder / name
        if not isinstance(meta, dict) or not isinstance(meta.get("bytes"), int) or not isinstance(meta.get("sha256"), str):
            problems.append(f"{MANIFEST} entry for {name!r} lacks its sha256 or size")
        elif not name or "\x00" in name:
            problems.append(f"{MANIFEST} names {name!r}, which is no file name")
        elif Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"{MANIFEST} names {name}, which is outside the artifact")
        elif path.is_symlink():
            problems.append(f"{name} is a symlink (an artifact holds plain files only)")
        elif not path.resolve().is_relative_to(root):  # through a symlinked folder
            problems.append(f"{MANIFEST} names {name}, which is outside the artifact")
        elif not path.is_file():
            problems.append(f"missing {name}")
        elif path.stat().st_size != meta["bytes"] or _sha256(path) != meta["sha256"]:
            problems.append(f"changed {name}")
    listed = set(files) | {MANIFEST}
    for path in sorted(_walk(folder)):
        rel = str(path.relative_to(folder))
        if rel not in listed:
            problems.append(f"unexpected {rel}" + (" (a symlink)" if path.is_symlink() else ""))
    return problems


def _walk(folder: Path) -> list[Path]:
    """Every file and symlink under `folder`, without following symlinked folders out of it."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        here = Path(dirpath)
        found += [here / n for n in filenames]
        found += [here / n for n in dirnames if (here / n).is_symlink()]
    return found


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step: Linux's renameat2(RENAME_EXCHANGE). os.replace cannot replace a non-empty
    folder, and Python has no binding for renameat2, hence ctypes. False where the system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without the wrapper (glibc < 2.28)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # e.g. an older kernel, NFS
        return False
    raise OSError(code, os.strerror(code), str(b))


def promote(staging: Path, output: Path) -> None:
    """Put the complete staging folder in place so that at every instant `output` is the previous artifact or the
    new one; the previous one is then removed."""
    if not output.exists():
        os.replace(staging, output)
        return
    if _exchange(staging, output):
        remove_tree(staging)  # it now holds the previous artifact
        return
    # Without an atomic exchange: two renames. A kill between them leaves no output but the backup, which the next
    # run's check_destination puts back (its name carries our pid, so it is restored only once we are gone).
    old = output.parent / f".{output.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(output, old)
    try:
        os.replace(staging, output)
    except OSError:
        os.replace(old, output)  # put the previous artifact back
        raise
    shutil.rmtree(old, ignore_errors=True)
