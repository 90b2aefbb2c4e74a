"""Evaluation text: built-in, a local file, or a Hugging Face dataset."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from llmopt.errors import InputError

BUILTIN_DESCRIPTION = (
    "Python's own documentation (the language reference topics in the standard library's "
    "pydoc_data.topics, PSF license), sorted by topic name"
)


def builtin_text() -> str:
    """English prose every Python installation already has, so evaluation works offline anywhere.

    pydoc_data.topics holds the text of the Python language reference that `help()` prints
    (about 700 kB, PSF-licensed); sorting by topic makes the selection deterministic.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a few stripped-down distributions drop it
        raise InputError(
            "This Python installation has no pydoc_data module, the source of the built-in evaluation text.",
            "Set `evaluation.data` (or --eval-data) to a local .txt or .jsonl file.",
        ) from None
    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def leading_token(tokenizer: Any) -> int | None:
    """The token the tokenizer puts before every text (Gemma's `<bos>`), or None (SmolLM2, Llama 3's chat
    tokenizers put none). Windows cut from a long text start with it too, as every text the model was trained on
    did: Gemma-3-270M's perplexity on the built-in text is about 17 with it and 64 without."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    marked, plain = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    return int(bos) if marked[:1] == [bos] and plain[:1] != [bos] else None


def token_ids(tokenizer: Any, text: str) -> tuple[np.ndarray, int | None]:
    """`text`'s token ids (int64, no special tokens) and the token each window cut from them starts with."""
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64), leading_token(tokenizer)


def window_of(ids: np.ndarray, start: int, length: int, first: int | None) -> np.ndarray:
    """`length` tokens from `start`: the text's own, or `first` and the text's next length - 1."""
    if first is None:
        return ids[start:start + length]
    return np.concatenate([np.array([first], dtype=np.int64), ids[start:start + length - 1]])


def check_data_spec(data: str, key: str) -> None:
    """Plan time, before any weight is read: a local data file named in the recipe exists and can be read."""
    if data == "builtin" or data.startswith("hf:"):
        return
    path = Path(data).expanduser()
    if not path.is_file() or not os.access(path, os.R_OK):
        why = "cannot be read" if path.is_file() else ("is a folder" if path.is_dir() else "does not exist")
        raise InputError(f"{key}: '{data}' {why}.",
                         "Use 'builtin', a path to a readable .txt or .jsonl file, or 'hf:NAME[:CONFIG][@SPLIT]'.")


def load_text(data: str, text_field: str = "text") -> tuple[str, str]:
    """(text, description) for an `evaluation.data` value."""
    if data == "builtin":
        return builtin_text(), BUILTIN_DESCRIPTION
    if data.startswith("hf:"):
        return _dataset_text(data[3:], text_field)
    path = Path(data).expanduser()
    if not path.is_file():
        raise InputError(
            f"Evaluation data '{data}' is not a file.",
            "Use 'builtin', a path to a .txt or .jsonl file, or 'hf:NAME[:CONFIG][@SPLIT]' for a dataset.",
        )
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"Cannot read evaluation data '{path}': {exc}.", "Give a UTF-8 text file.") from None
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise InputError(f"{path}:{n}: not valid JSON.", "Each line of a .jsonl file must be one JSON object.") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise InputError(f"{path}:{n}: no string field '{text_field}'.",
                                 "Set `evaluation.text_field` to the field that holds the text.")
            texts.append(row[text_field])
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise InputError(f"Evaluation data '{path}' is empty.", "Give a file with text in it.")
    return raw, f"local file {path.name}"


def _dataset_text(spec: str, text_field: str) -> tuple[str, str]:
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        import datasets  # optional: only needed for hf: data
    except ImportError:
        raise InputError(f"Evaluation data 'hf:{spec}' needs the `datasets` package.",
                         "pip install datasets, or use a local .txt/.jsonl file.") from None
    try:
        rows = datasets.load_dataset(name, config or None, split=split or "test")
    except Exception as exc:  # datasets raises many types (network, missing config, ...)
        raise InputError(f"Cannot load dataset '{spec}': {exc}", "Check the name, config and split, or use a local file.") from None
    if text_field not in rows.column_names:
        raise InputError(f"Dataset '{spec}' has no column '{text_field}' (columns: {rows.column_names}).",
                         "Set `evaluation.text_field`.")
    return "\n\n".join(t for t in rows[text_field] if t), f"dataset {spec}"
