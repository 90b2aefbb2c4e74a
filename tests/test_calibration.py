"""Calibration windows: seeded, the right shape, and away from the evaluation tokens."""

from __future__ import annotations

import numpy as np
import pytest

from llmopt.errors import InputError
from llmopt.evaluation.calibration import calibration_batches


def test_seeded_and_shaped(tiny_tokenizer):
    a, description = calibration_batches(tiny_tokenizer, data="builtin", text_field="text", samples=5, seq_len=32, seed=3)
    b, _ = calibration_batches(tiny_tokenizer, data="builtin", text_field="text", samples=5, seq_len=32, seed=3)
    c, _ = calibration_batches(tiny_tokenizer, data="builtin", text_field="text", samples=5, seq_len=32, seed=4)
    assert len(a) == 5 and all(w.shape == (32,) and w.dtype == np.int64 for w in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert "5 samples x 32 tokens, seed 3" in description


def test_skips_the_evaluation_tokens(tiny_tokenizer, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("alpha " * 100 + "omega " * 400)
    n_alpha = len(tiny_tokenizer("alpha " * 100, add_special_tokens=False)["input_ids"])
    alpha_ids = set(tiny_tokenizer("alpha", add_special_tokens=False)["input_ids"])
    windows, _ = calibration_batches(tiny_tokenizer, data=str(text), text_field="text", samples=20, seq_len=16,
                                     seed=0, skip_tokens=n_alpha)
    assert not any(set(w.tolist()) & alpha_ids for w in windows)


def test_too_little_text_is_a_clear_error(tiny_tokenizer, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("tiny")
    with pytest.raises(InputError, match="fewer than seq_len=64"):
        calibration_batches(tiny_tokenizer, data=str(text), text_field="text", samples=1, seq_len=64, seed=0)
