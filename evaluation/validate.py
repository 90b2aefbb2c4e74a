"""Check a written artifact against the in-memory model it was exported from.

Short prompts alone miss what only shows late in a sequence or in cached decoding: a wrong sliding window
(correct up to the window, wrong after it), a rotary table cut short, a KV cache written in the wrong layout. So
besides the prompts, one long sequence (at least 256 tokens and longer than every attention window of the
model) is compared in one prefill, and the artifact then decodes the text's next tokens one at a time with its KV
cache from that long context, each of its choices checked against the reference's on the same tokens (a near-tie
within the measured logit error counts as agreeing).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from llmopt.errors import LlmoptError, ResultValidationError
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


def validation_sequences(tokenizer, config: OnnxValidation, long_tokens: int = LONG_TOKENS,
                         vocab_size: int | None = None) -> list[np.ndarray]:
    """The token sequences the check runs: the prompts, then the long sequence followed by the DECODE_TOKENS that
    the artifact is fed one at a time through its KV cache. Without a tokenizer (a bare checkpoint streamed), seeded
    random ids below `vocab_size`: the numbers are checked as well, on text of no meaning."""
    if tokenizer is None:
        rng = np.random.default_rng(0)
        lengths = [8 + 4 * i for i in range(config.prompts)] + [long_tokens + DECODE_TOKENS]
        return [rng.integers(3, vocab_size, n).astype(np.int64) for n in lengths]
    from llmopt.evaluation.text import builtin_text, token_ids, window_of

    sequences = [np.asarray(tokenizer(p)["input_ids"], dtype=np.int64)
                 for p in (PROMPTS * ((config.prompts // len(PROMPTS)) + 1))[: config.prompts]]
    text_ids, first = token_ids(tokenizer, builtin_text()[:200_000])
    return [*sequences, window_of(text_ids, 0, long_tokens + DECODE_TOKENS, first)]


def validate_artifact(reference: Runner | list[np.ndarray], artifact: Runner, sequences: list[np.ndarray],
                      config: OnnxValidation) -> ValidationRecord:
    """Compare the artifact with `reference` on `sequences` (validation_sequences()). `reference` is a runner, or
    its logits on those sequences computed beforehand (a streamed model, never whole in memory)."""
    refs = reference if isinstance(reference, list) else [reference.logits(ids) for ids in sequences]
    max_diff, agree, total = 0.0, 0, 0
    *prompts, long = sequences
    for ids, ref in zip([*prompts, long[:-DECODE_TOKENS]], refs):
        got = artifact.logits(ids)  # (T, V)
        ref = ref[:len(ids)]  # the long sequence's reference runs on into the decoded tokens
        max_diff = max(max_diff, _max_abs_diff(ref, got))
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += len(ids)
    top1 = agree / total
    # Cached decoding: after the long context in one prefill, the next tokens fed one at a time through the
    # artifact's KV cache, as generate() feeds them (the same in-place buffers where the graph shares them), each
    # step's choice judged by the reference on the same tokens. A choice agrees when the reference ranks it within
    # twice the largest logit difference the prefills measured: a near-tie that int8 compute may break either way
    # agrees, a token a wrong cache picks (the prefills exact, the decode not) does not.
    prefill = len(long) - DECODE_TOKENS
    steps = artifact.decode_logits(long, prefill)  # (DECODE_TOKENS, V)
    ref = refs[-1][prefill:]
    margin = ref.max(-1) - ref[np.arange(len(ref)), steps.argmax(-1)]  # 0 where the artifact chose the reference's
    decode_top1 = float((margin <= 2 * max_diff).mean()) if np.isfinite(steps).all() else 0.0
    passed = bool(max_diff <= config.max_abs_logit_diff and top1 >= config.min_top1_agreement
                  and decode_top1 >= config.min_top1_agreement)
    return ValidationRecord(prompts=config.prompts, max_abs_logit_diff=max_diff, top1_agreement=top1, passed=passed,
                            long_tokens=prefill, decode_tokens=DECODE_TOKENS, decode_top1_agreement=decode_top1)


def _max_abs_diff(ref: np.ndarray, got: np.ndarray, rows: int = 256) -> float:
    """max |ref - got| over (T, V) logits, a block of rows at a time: a 4k-token sequence's logits are 0.5 GB at a
    32k vocabulary, and the whole-array difference would hold two more. NaN/Inf (e.g. an fp16 overflow) gives inf:
    Python's max() would silently skip a NaN difference."""
    worst = 0.0
    for start in range(0, len(got), rows):
        block = got[start:start + rows]
        if not np.isfinite(block).all():
            return float("inf")
        worst = max(worst, float(np.abs(ref[start:start + rows] - block).max()))
    return worst


@contextmanager
def runtime_failures() -> Iterator[None]:
    """A runtime that cannot load or execute the artifact fails the check too (exit 4), as one named error;
    llmopt's own errors and running out of memory pass through as they are."""
    try:
        yield
    except (MemoryError, LlmoptError):
        raise
    except Exception as exc:
        raise ResultValidationError(f"The exported artifact could not be run: {exc}",
                                    "Report this with the recipe; try `export.accuracy_level: 0`.") from None


def validation_failure(validation: ValidationRecord, config: OnnxValidation) -> ResultValidationError:
    """The error that stops a run whose artifact does not reproduce its model (exit 4, nothing written)."""
    return ResultValidationError(
        f"The exported artifact does not reproduce the optimized model: max |Δlogit| "
        f"{validation.max_abs_logit_diff:.4g} (limit {config.max_abs_logit_diff}), top-1 agreement "
        f"{validation.top1_agreement:.3f} and in cached decoding after {validation.long_tokens} tokens "
        f"{validation.decode_top1_agreement:.3f} (minimum {config.min_top1_agreement}).",
        "Nothing was written. Try `export.accuracy_level: 0`, or loosen `export.validate` if this is expected.")
