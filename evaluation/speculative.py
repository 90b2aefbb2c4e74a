"""Speculative decoding with a draft model: acceptance rate, speed with and without it, output equality.

The generation itself is transformers' assisted generation (`generate(..., assistant_model=draft)`); what
transformers does not report is how often the draft is right, so that is measured here directly.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# Fixed, varied prompts: greedy decoding from them is reproducible run to run.
DEFAULT_PROMPTS = (
    "The Python language reference describes",
    "A list comprehension consists of brackets containing",
    "When an exception is raised inside a function,",
    "The with statement is used to wrap the execution of a block",
)


@dataclass
class SpeculativeScores:
    prompts: int
    new_tokens: int  # at most, per prompt
    draft_tokens: int  # tokens the draft proposes per step (constant schedule)
    acceptance_rate: float  # P(draft's greedy token == target's | the prefix so far is the target's own)
    expected_tokens_per_step: float  # accepted draft tokens + the target's own, per target forward
    tokens_per_s_plain: float  # median over prompts
    tokens_per_s_assisted: float
    speedup: float  # assisted / plain tokens per second
    outputs_equal: bool  # greedy assisted generation must reproduce plain greedy generation exactly
    threads: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def acceptance_rate(draft: Any, sequences: list[np.ndarray], prompt_lengths: list[int]) -> float:
    """Share of the target's generated tokens that the draft predicts greedily from the target's own prefix.

    With greedy decoding a drafted token is accepted exactly when it equals the target's next token, given
    that the tokens before it were accepted, so this is the per-token acceptance rate alpha of
    Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative Decoding"), measured with one
    teacher-forced forward pass of the draft per sequence.
    """
    import torch

    hits = total = 0
    with torch.no_grad():
        for seq, start in zip(sequences, prompt_lengths):
            ids = torch.from_numpy(seq[None].astype(np.int64))  # (1, T)
            guess = draft(input_ids=ids).logits[0, start - 1:-1].argmax(-1).numpy()  # predicts seq[start:]
            hits += int((guess == seq[start:]).sum())
            total += len(seq) - start
    return hits / max(total, 1)


def expected_tokens_per_step(alpha: float, draft_tokens: int) -> float:
    """(1 - alpha^(k+1)) / (1 - alpha): tokens produced per target forward with k drafted (Leviathan et al.)."""
    if alpha >= 1.0:
        return float(draft_tokens + 1)
    return (1 - alpha ** (draft_tokens + 1)) / (1 - alpha)


def measure_speculative(target: Any, draft: Any, tokenizer: Any, *, prompts: tuple[str, ...] = DEFAULT_PROMPTS,
                        new_tokens: int = 64, draft_tokens: int = 5, threads: int | None = None) -> SpeculativeScores:
    """Greedy generation of `new_tokens` from each prompt, by the target alone and assisted by the draft."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    # A constant schedule: transformers' default adapts k during generation, which would make the
    # expected-tokens figure depend on the run.
    draft.generation_config.num_assistant_tokens = draft_tokens
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    # Rates count the tokens actually generated: a prompt may end early on an end-of-sequence token
    # (min_new_tokens would avoid that, but transformers refuses it with an assistant).
    common = dict(do_sample=False, max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)

    plain_rates, assisted_rates, sequences, lengths, equal = [], [], [], [], True
    with torch.no_grad():
        warm = tokenizer(prompts[0], return_tensors="pt")
        target.generate(**warm, **{**common, "max_new_tokens": 2})  # first-call allocations
        target.generate(**warm, assistant_model=draft, **{**common, "max_new_tokens": 2})
        for prompt in prompts:
            inputs = tokenizer(prompt, return_tensors="pt")
            length = inputs["input_ids"].shape[1]
            start = time.perf_counter()
            plain = target.generate(**inputs, **common)
            plain_rates.append((plain.shape[1] - length) / (time.perf_counter() - start))
            start = time.perf_counter()
            assisted = target.generate(**inputs, assistant_model=draft, **common)
            assisted_rates.append((assisted.shape[1] - length) / (time.perf_counter() - start))
            equal = equal and torch.equal(plain, assisted)
            sequences.append(plain[0].numpy())
            lengths.append(length)
    alpha = acceptance_rate(draft, sequences, lengths)
    plain_tps, assisted_tps = statistics.median(plain_rates), statistics.median(assisted_rates)
    return SpeculativeScores(
        prompts=len(prompts), new_tokens=new_tokens, draft_tokens=draft_tokens, acceptance_rate=alpha,
        expected_tokens_per_step=expected_tokens_per_step(alpha, draft_tokens),
        tokens_per_s_plain=plain_tps, tokens_per_s_assisted=assisted_tps, speedup=assisted_tps / plain_tps,
        outputs_equal=bool(equal), threads=torch.get_num_threads())
