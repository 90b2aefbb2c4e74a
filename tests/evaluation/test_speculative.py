"""Speculative decoding measurement (`llmopt bench --assistant`): acceptance rate, output equality, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmopt.evaluation.speculative import acceptance_rate, expected_tokens_per_step, measure_speculative
from tests.conftest import tiny_llama
from tests.cli.test_cli import assert_clean_error, llmopt

PROMPTS = ("The with statement", "A list comprehension")


def _other_draft(target):
    """A draft that agrees with the target on some tokens only: the target with noise on every weight."""
    import copy

    draft = copy.deepcopy(target)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * p.std() * 0.7)
    return draft


def _stepwise_acceptance(target, draft, tokenizer, prompt: str, new_tokens: int) -> float:
    """Reference: walk the target's greedy continuation token by token and ask the draft each time."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    hits = 0
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = target(input_ids=ids).logits[0, -1].argmax()
            hits += int(draft(input_ids=ids).logits[0, -1].argmax() == nxt)
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
    return hits / new_tokens


def test_a_draft_identical_to_the_model_is_always_accepted(tiny_tokenizer):
    target = tiny_llama()
    s = measure_speculative(target, tiny_llama(), tiny_tokenizer, prompts=PROMPTS, new_tokens=12, draft_tokens=4)
    assert s.acceptance_rate == 1.0, s
    assert s.expected_tokens_per_step == 5.0
    assert s.outputs_equal


def test_acceptance_matches_a_token_by_token_reference_and_outputs_stay_exact(tiny_tokenizer):
    target = tiny_llama()
    draft = _other_draft(target)
    s = measure_speculative(target, draft, tiny_tokenizer, prompts=PROMPTS, new_tokens=12, draft_tokens=3)
    reference = np.mean([_stepwise_acceptance(target, draft, tiny_tokenizer, p, 12) for p in PROMPTS])
    print(f"acceptance {s.acceptance_rate:.3f}, reference {reference:.3f}")
    assert 0.0 < s.acceptance_rate < 1.0
    assert s.acceptance_rate == pytest.approx(reference, abs=1e-9)
    assert s.outputs_equal, "greedy assisted generation must reproduce the model's own greedy output"
    assert s.tokens_per_s_plain > 0 and s.tokens_per_s_assisted > 0
    assert s.speedup == pytest.approx(s.tokens_per_s_assisted / s.tokens_per_s_plain)


def test_acceptance_counts_only_generated_positions():
    # A "draft" whose argmax is always token 5: it is right exactly where the sequence continues with 5.
    class Constant(torch.nn.Module):
        def forward(self, input_ids):
            logits = torch.zeros(*input_ids.shape, 10)
            logits[..., 5] = 1.0
            return type("Out", (), {"logits": logits})()

    seq = np.array([5, 5, 5, 1, 5, 2, 5])  # prompt of 3 (all 5s, not counted), then 1 5 2 5
    assert acceptance_rate(Constant(), [seq], [3]) == 0.5


@pytest.mark.parametrize("alpha,k,expected", [(0.0, 4, 1.0), (0.5, 1, 1.5), (0.5, 3, 1.875), (1.0, 4, 5.0)])
def test_expected_tokens_per_step(alpha, k, expected):
    assert expected_tokens_per_step(alpha, k) == pytest.approx(expected)


@pytest.mark.slow
def test_cli_bench_prints_json(tiny_model_dir, tmp_path, tiny_tokenizer):
    draft_dir = tmp_path / "draft"
    _other_draft(tiny_llama()).save_pretrained(draft_dir, safe_serialization=True)
    tiny_tokenizer.save_pretrained(draft_dir)
    proc = llmopt("bench", str(tiny_model_dir), "--assistant", str(draft_dir), "--new-tokens", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["outputs_equal"] is True and 0 <= data["acceptance_rate"] <= 1 and data["prompts"] == 4


@pytest.mark.slow
def test_cli_bench_refuses_an_onnx_draft_and_another_vocabulary(tiny_model_dir, tmp_path, tiny_tokenizer):
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "model.onnx").write_bytes(b"")
    assert_clean_error(llmopt("bench", str(tiny_model_dir), "--assistant", str(onnx_dir)), 3, "ONNX artifact")

    other = tmp_path / "other-vocab"
    tiny_llama(vocab_size=500).save_pretrained(other, safe_serialization=True)
    tiny_tokenizer.save_pretrained(other)
    assert_clean_error(llmopt("bench", str(tiny_model_dir), "--assistant", str(other)), 3, "vocabulary of 500 tokens")
