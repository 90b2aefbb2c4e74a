"""`llmopt init`: a starting recipe for a model, from a shipped recipe, checked against the model's config."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from llmopt.errors import RecipeError
from llmopt.write_safety import Input, check_file_output, write_file


def init_recipe(model: str, goal: str, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> str:
    """The text of shipped recipe `goal` with `model:` set, adapted so that it plans on this model.

    A quantization group size that does not divide the model's widths is lowered to the largest power of
    two that does (the only setting of the shipped recipes that depends on the model's shape).
    """
    from llmopt.model import ArchInfo, load_config, resolve_model
    from llmopt.passes.quantize import input_widths
    from llmopt.pipeline import plan
    from llmopt.recipe import find_shipped_recipe, parse_recipe, shipped_recipe_names

    shipped = find_shipped_recipe(goal)
    if shipped is None:
        raise RecipeError(f"No shipped recipe '{goal}'.", f"Choose one of: {', '.join(shipped_recipe_names())}.")
    source = resolve_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    arch = ArchInfo.from_config(load_config(source))
    lines = shipped.read_text(encoding="utf-8").splitlines(keepends=True)
    header = [line for line in lines[:1] if line.startswith("#")]
    text = "".join(header) + f"model: {model}\n" + "".join(lines[len(header):])
    widths = input_widths(arch).values()

    def fit(match: re.Match) -> str:
        size = int(match.group(2))
        while size > 16 and any(w % size for w in widths):
            size //= 2
        return f"{match.group(1)}{size}"

    text = re.sub(r"(group_size:\s*)(\d+)", fit, text)
    plan(parse_recipe(text, where=f"{goal} for {model}"), allow_pickle=allow_pickle,
         trust_remote_code=trust_remote_code)  # the same checks as `llmopt validate`
    return text


def write_new_file(path: Path, text: str, force: bool, inputs: Iterable[Input] = ()) -> None:
    """Write `text` to `path` atomically (llmopt.write_safety.write_file); an existing file only with `force`,
    and never over one of `inputs`."""
    check_file_output(path, inputs)
    if path.exists() and not force:
        raise RecipeError(f"'{path}' already exists.", "Pass --force to replace it, or choose another --output.")
    write_file(path, text, inputs)
