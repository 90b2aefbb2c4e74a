"""Calibration windows: seeded, the right shape, and away from the evaluation tokens."""

from __future__ import annotations

import numpy as np
import pytest

from llmopt.errors import InputError
from llmopt.evaluation.calibration import calibration_batches


@pytest.mark.slow
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


class _BosTokenizer:
    """Puts token 1 before every text, as Gemma's tokenizer puts <bos>."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [3 + ord(c) % 50 for c in text]}


def test_windows_start_with_the_token_the_tokenizer_puts_first(tiny_tokenizer, tmp_path):
    from llmopt.evaluation.quality import token_windows
    from llmopt.evaluation.text import leading_token

    text = "".join(chr(97 + i % 26) for i in range(500))
    windows = token_windows(_BosTokenizer(), text, 400, 100)
    plain = [3 + ord(c) % 50 for c in text]
    assert len(windows) == 4 and all(len(w) == 100 and w[0] == 1 for w in windows)
    assert np.concatenate([w[1:] for w in windows]).tolist() == plain[:396]  # the text, contiguous, nothing skipped
    (tmp_path / "t.txt").write_text(text)
    batches, _ = calibration_batches(_BosTokenizer(), data=str(tmp_path / "t.txt"), text_field="text", samples=3,
                                     seq_len=50, seed=0)
    assert all(len(w) == 50 and w[0] == 1 and 1 not in w[1:] for w in batches)
    # SmolLM2-like tokenizers put nothing first: the windows are the text's own tokens, as before
    assert leading_token(tiny_tokenizer) is None
    ids = tiny_tokenizer("x " * 300, add_special_tokens=False)["input_ids"]
    assert [w.tolist() for w in token_windows(tiny_tokenizer, "x " * 300, 128, 64)] == [ids[:64], ids[64:128]]
