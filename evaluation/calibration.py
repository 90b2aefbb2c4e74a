"""Calibration data for passes that need activations: seeded token windows, disjoint from evaluation."""

from __future__ import annotations

from typing import Any

import numpy as np

from llmopt.errors import InputError
from llmopt.evaluation.text import load_text


def calibration_batches(tokenizer: Any, *, data: str, text_field: str, samples: int, seq_len: int, seed: int,
                        skip_tokens: int = 0) -> tuple[list[np.ndarray], str]:
    """`samples` windows of `seq_len` token ids (int64), drawn with `seed`, after the first `skip_tokens`.

    `skip_tokens` keeps calibration away from the evaluation tokens when both read the same text,
    so that the report does not measure a model on the text it was calibrated on.
    """
    from llmopt.evaluation.text import token_ids, window_of

    text, description = load_text(data, text_field)
    ids, first = token_ids(tokenizer, text)
    ids = ids[skip_tokens:]
    if len(ids) < seq_len:
        raise InputError(
            f"Calibration data has {len(ids)} tokens after the evaluation part, fewer than seq_len={seq_len}.",
            "Use a larger calibration text or a smaller `calibration.seq_len`.",
        )
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - seq_len + 1, size=samples)
    return [window_of(ids, s, seq_len, first) for s in starts], \
        f"{description}: {samples} samples x {seq_len} tokens, seed {seed}"
