"""Benchmark: llmopt's int4 weight quantizers side by side on SmolLM2-135M-Instruct (quality; same size).

    python benchmarks/quantization.py [--model demo] [--eval-tokens 4096] [--samples 32] [--threads 2]

Every method quantizes a copy of the same model with the same bits, group size and calibration windows (drawn
after the evaluation tokens, so disjoint from them) and is evaluated in PyTorch on the same tokens against the
float model: perplexity, its increase, KL and top-1 agreement. All int4 variants store the same number of
bytes (codes + one scale per group, + zero points when asymmetric), so they differ only in accuracy. Symmetric
and asymmetric groups are reported separately: the demo weights come from a Q4_1 GGUF (asymmetric, block 32),
a grid that asymmetric RTN at block 32 reproduces almost exactly. CPU budget: about 10 minutes on 2 cores.
Peers (the onnxruntime-genai builder, onnxruntime's dynamic int8) are not part of this script yet.
"""

from __future__ import annotations

import argparse
import copy
import time

VARIANTS = [  # (label, QuantizeConfig fields)
    ("RTN", {"method": "rtn"}),
    ("GPTQ", {"method": "gptq"}),
    ("AWQ + RTN", {"method": "rtn", "awq": True}),
    ("AWQ + GPTQ", {"method": "gptq", "awq": True}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--symmetric", choices=["yes", "no", "both"], default="both")
    args = parser.parse_args()

    import torch

    from llmopt.evaluation.calibration import calibration_batches
    from llmopt.evaluation.quality import compare_quality, token_windows
    from llmopt.evaluation.runners import CachedRunner, TorchRunner
    from llmopt.evaluation.text import builtin_text
    from llmopt.model import load_model, resolve_model
    from llmopt.passes.quantize import QuantizeConfig, QuantizePass
    from llmopt.state import ModelState, PassContext

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base, tokenizer = load_model(resolve_model(args.model))
    evaluation = token_windows(tokenizer, builtin_text(), args.eval_tokens, 256)
    windows, description = calibration_batches(tokenizer, data="builtin", text_field="text", samples=args.samples,
                                               seq_len=args.seq_len, seed=0, skip_tokens=args.eval_tokens)
    reference = CachedRunner(TorchRunner(base))
    symmetric = {"yes": [True], "no": [False], "both": [True, False]}[args.symmetric]

    rows = []
    for sym in symmetric:
        for label, fields in VARIANTS:
            model = copy.deepcopy(base)
            config = QuantizeConfig(bits=4, group_size=args.group_size, symmetric=sym, exclude=["lm_head"], **fields)
            t0 = time.perf_counter()
            QuantizePass(config).run(ModelState(model, tokenizer), PassContext(calibration=lambda: windows))
            seconds = time.perf_counter() - t0
            q = compare_quality(reference, TorchRunner(model), evaluation)
            increase = q.perplexity / q.baseline_perplexity - 1
            low, high = (q.intervals or {}).get("perplexity_increase_pct", (float("nan"), float("nan")))
            rows.append((f"{label}, {'symmetric' if sym else 'asymmetric'}", f"{q.perplexity:.2f}",
                         f"{increase:+.1%} [{low:+.1f}%, {high:+.1f}%]", f"{q.kl_divergence:.4f}",
                         f"{q.top1_agreement:.1%}", f"{seconds:.0f}"))
            print(f"{rows[-1][0]}: perplexity {q.perplexity:.2f} ({increase:+.1%}), {seconds:.0f} s", flush=True)
            del model

    print(f"\nSmolLM2-135M-Instruct ({args.model}), int4 group {args.group_size}, lm_head and embedding in float, "
          f"{torch.get_num_threads()} threads; float perplexity {q.baseline_perplexity:.2f} on {q.tokens} held-out "
          f"tokens; calibration: {description}\n")
    header = ("method", "perplexity", "increase [95% CI]", "KL", "top-1", "quantize s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
