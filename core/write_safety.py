"""The write-safety rule, in one place: an output never overlaps an input or another artifact.

Every command that writes asks here first, before anything is read or written: `optimize` (and its `--dry-run`)
for the artifact folder, `init`, `schema --output`, `compare --output` and `--junit-xml` for single files. Paths
are compared resolved (symlinks followed, `..` removed), so a link or a relative spelling cannot hide an overlap.

The rule:
- an output is not an input (the model, a teacher, evaluation or calibration data, the recipe), does not
  contain one (replacing it with `--force` would delete it) and is not inside one (a checkpoint folder is read,
  never written into);
- an output is not inside an existing artifact (its manifest would no longer match: `llmopt verify` fails);
- `--force` replaces only what llmopt wrote: an artifact folder (with its manifest.json) or an empty folder,
  never a folder of other files (the current folder, a home folder, a checkpoint's parent).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmopt.errors import RecipeError

MANIFEST = "manifest.json"  # the artifact's mark (llmopt.artifact writes it last)


@dataclass(frozen=True)
class Input:
    """Something a command reads, which no output may overlap."""

    role: str  # for the message: "the model", "evaluation data", ...
    path: Path  # resolved


def real(path: str | Path) -> Path:
    """`path` resolved: `~` expanded, symlinks followed (also through a missing tail), `..` removed."""
    return Path(os.path.realpath(Path(path).expanduser()))


def is_artifact(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def recipe_inputs(recipe: Any, model_path: Path | None) -> list[Input]:
    """What a run of `recipe` reads from the file system: the model (its resolved files), the recipe file, and
    every data path or teacher named in it that is a local path ('builtin', 'hf:' and hub ids are not)."""
    found = [Input("the model", real(model_path))] if model_path is not None else []
    if recipe.source and Path(recipe.source).is_file():
        found.append(Input("the recipe", real(recipe.source)))
    named = [("evaluation data", recipe.evaluation.data if recipe.evaluation.enabled else None),
             ("calibration data", recipe.calibration.data)]
    named += [(f"the teacher of passes[{i}]", getattr(p, "teacher", None)) for i, p in enumerate(recipe.passes)]
    for role, spec in named:
        if spec and spec != "builtin" and not spec.startswith("hf:") and Path(spec).expanduser().exists():
            found.append(Input(role, real(spec)))
    return found


def _overlap(output: Path, given: str, inputs: Iterable[Input]) -> None:
    for item in inputs:
        if output == item.path:
            how = "is"
        elif item.path.is_relative_to(output):
            how = "contains"
        elif output.is_relative_to(item.path):
            how = "is inside"
        else:
            continue
        raise RecipeError(f"The output '{given}' {how} {item.role} ('{item.path}'); an output never overlaps what "
                          "a run reads or writes elsewhere, so nothing of yours can be overwritten or deleted.",
                          "Choose an output outside the model, data and artifact folders, e.g. --output out/.")


def _inside_artifact(output: Path, given: str) -> None:
    for parent in output.parents:
        if is_artifact(parent):
            raise RecipeError(f"The output '{given}' is inside the artifact '{parent}'; writing there would break "
                              "that artifact's manifest (`llmopt verify` would fail).",
                              "Choose an output folder outside every existing artifact.")


def check_artifact_output(output: str | Path, inputs: Iterable[Input], force: bool) -> Path:
    """The resolved artifact folder to write, after checking the write-safety rule (RecipeError, exit 2)."""
    given = str(output)
    target = real(output)
    inputs = list(inputs)
    _overlap(target, given, inputs)
    _inside_artifact(target, given)
    if force and target.is_dir() and not is_artifact(target) and any(target.iterdir()):
        raise RecipeError(f"--force would replace '{given}', which is not an llmopt artifact (no {MANIFEST}) and "
                          "holds other files; llmopt replaces only artifacts it wrote.",
                          "Choose a new folder for --output (e.g. a subfolder), or empty that folder yourself.")
    return target


def check_file_output(output: str | Path, inputs: Iterable[Input] = ()) -> Path:
    """The resolved path of a single output file (a report, a schema, JUnit XML, a recipe), checked against the
    inputs and existing artifacts; its parent folder is created."""
    given = str(output)
    target = real(output)
    _overlap(target, given, inputs)
    _inside_artifact(target, given)
    if target.is_dir():
        raise RecipeError(f"The output '{given}' is a folder.", "Give a file path.")
    return target


def write_file(output: str | Path, text: str, inputs: Iterable[Input] = ()) -> Path:
    """Write a small text output atomically (a temporary file, then a rename), creating its folder: an
    interrupted write never leaves a half-written file."""
    target = check_file_output(output, inputs)
    if nearest_writable_folder(target.parent) is None:
        raise RecipeError(f"Cannot write '{output}': no writable folder on the way to it.",
                          "Choose a path in a folder you can write to.")
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def nearest_writable_folder(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` when it is a writable folder (where its missing folders would be
    created), else None."""
    for folder in (path, *path.parents):
        if folder.exists():
            return folder if folder.is_dir() and os.access(folder, os.W_OK | os.X_OK) else None
    return None
