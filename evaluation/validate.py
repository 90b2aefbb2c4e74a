"""Check a written artifact against the in-memory model it was exported from."""

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


def validate_artifact(reference: Runner, artifact: Runner, tokenizer, config: OnnxValidation) -> ValidationRecord:
    max_diff, agree, total = 0.0, 0, 0
    for prompt in (PROMPTS * ((config.prompts // len(PROMPTS)) + 1))[: config.prompts]:
        ids = np.asarray(tokenizer(prompt)["input_ids"], dtype=np.int64)
        ref, got = reference.logits(ids), artifact.logits(ids)  # (T, V) each
        # NaN/Inf (e.g. an fp16 overflow) must fail: Python's max() would silently skip a NaN difference.
        diff = float(np.abs(ref - got).max()) if np.isfinite(got).all() else float("inf")
        max_diff = max(max_diff, diff)
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += len(ids)
    top1 = agree / total
    passed = bool(max_diff <= config.max_abs_logit_diff and top1 >= config.min_top1_agreement)
    return ValidationRecord(prompts=config.prompts, max_abs_logit_diff=max_diff, top1_agreement=top1, passed=passed)
