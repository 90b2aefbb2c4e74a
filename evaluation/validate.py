"""Check a written artifact against the in-memory model it was exported from.

Short prompts alone miss what only shows late in a sequence or in cached decoding: a wrong sliding window
(correct up to the window, wrong after it), a rotary table cut short, a KV cache written in the wrong layout. So
besides the prompts, one long sequence (at least 256 tokens and longer than every attention window of the
model) is compared in one prefill, and the artifact then decodes greedily with its KV cache from that long
context, each of its tokens checked against the reference's next-token choice on the same context (a near-tie
within the measured logit error counts as agreeing).
"""

from __future__ import annotations

import numpy as np

from llmopt.evaluation.report import ValidationRecord
from llmopt.evaluation.runners import Runner
from llmopt.recipe import OnnxValidation

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "In 1969, the first humans landed on the Moon. The mission was called",
    "Quantization reduces the memory footprint of neural networks by",
    "Once upon a time, in a small village by the sea,",
]
LONG_TOKENS = 256  # the least the long sequence has
DECODE_TOKENS = 16  # generated with the artifact's KV cache after the long context


def long_sequence_length(windows: list[int | None], max_positions: int | None) -> int:
    """Tokens of the long sequence: 256, or more than the longest attention window, within the model's positions."""
    longest = max((w for w in windows if w), default=0)
    length = max(LONG_TOKENS, longest + 32)
    return min(length, max_positions - DECODE_TOKENS) if max_positions else length


def validate_artifact(reference: Runner, artifact: Runner, tokenizer, config: OnnxValidation,
                      long_tokens: int = LONG_TOKENS) -> ValidationRecord:
    from llmopt.evaluation.text import builtin_text

    max_diff, agree, total = 0.0, 0, 0
    sequences = [np.asarray(tokenizer(p)["input_ids"], dtype=np.int64)
                 for p in (PROMPTS * ((config.prompts // len(PROMPTS)) + 1))[: config.prompts]]
    from llmopt.evaluation.text import token_ids, window_of

    text_ids, first = token_ids(tokenizer, builtin_text()[:200_000])
    long = window_of(text_ids, 0, long_tokens, first)
    for ids in [*sequences, long]:
        ref, got = reference.logits(ids), artifact.logits(ids)  # (T, V) each
        # NaN/Inf (e.g. an fp16 overflow) must fail: Python's max() would silently skip a NaN difference.
        diff = float(np.abs(ref - got).max()) if np.isfinite(got).all() else float("inf")
        max_diff = max(max_diff, diff)
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += len(ids)
    top1 = agree / total
    # Cached decoding: the artifact's greedy tokens after the long context, each judged by the reference on the
    # same tokens (teacher-forced, so one near-tie does not derail the rest). A token agrees when the reference
    # ranks it within twice the largest logit difference the prefills measured: a near-tie that int8 compute
    # may break either way agrees, a token a wrong cache picks (the prefills exact, the decode not) does not.
    generated = artifact.generate(long, DECODE_TOKENS)
    ref = reference.logits(generated)[len(long) - 1:-1]  # (DECODE_TOKENS, V)
    chosen = generated[len(long):]
    margin = ref.max(-1) - ref[np.arange(len(chosen)), chosen]  # 0 where the artifact picked the reference's best
    decode_top1 = float((margin <= 2 * max_diff).mean())
    passed = bool(max_diff <= config.max_abs_logit_diff and top1 >= config.min_top1_agreement
                  and decode_top1 >= config.min_top1_agreement)
    return ValidationRecord(prompts=config.prompts, max_abs_logit_diff=max_diff, top1_agreement=top1, passed=passed,
                            long_tokens=len(long), decode_tokens=DECODE_TOKENS, decode_top1_agreement=decode_top1)
