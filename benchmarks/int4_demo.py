"""Benchmark: the shipped int4 recipes on the demo model (SmolLM2-135M-Instruct), figures for the README.

    python benchmarks/int4_demo.py [--model demo] [--out bench-out]

Runs `int4-onnx` and `int4-safetensors` through the Python API (the same path as `llmopt optimize`),
then prints baseline vs optimized side by side as measured in the same run, plus CLI start-up time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import llmopt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--recipes", nargs="+", default=["int4-onnx", "int4-safetensors"])
    args = parser.parse_args()

    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llmopt", "--help"], capture_output=True, check=True)
    print(f"llmopt --help: {time.perf_counter() - start:.2f} s (torch is not imported)")

    rows = []
    for name in args.recipes:
        result = llmopt.optimize(name, model=args.model, output=Path(args.out) / name, force=True)
        r = result.report
        b, o, q = r.baseline, r.optimized, r.quality
        rows.append((name, f"{b.size_bytes / 1e6:.1f} → {o.size_bytes / 1e6:.1f} ({o.size_bytes / b.size_bytes:.1%})",
                     f"{b.perplexity:.2f} → {o.perplexity:.2f} ({q.perplexity_increase_pct:+.1f}%)",
                     f"{q.kl_divergence:.3f}", f"{q.top1_agreement:.1%}",
                     f"{b.decode_tokens_per_s:.1f} → {o.decode_tokens_per_s:.1f} ({o.decode_tokens_per_s / b.decode_tokens_per_s:.2f}x)",
                     f"{b.prefill_ms:.0f} → {o.prefill_ms:.0f}",
                     f"{b.peak_memory_mb:.0f} → {o.peak_memory_mb:.0f}", f"{r.total_seconds:.0f}"))
        threads, cpu = r.environment.get("threads"), r.environment.get("cpu")
    header = ("recipe", "size MB (fp32 → opt)", "perplexity", "KL", "top-1", "decode tok/s", "prefill ms",
              "peak MB", "run s")
    print(f"\nSmolLM2-135M-Instruct, {threads} threads on {cpu}; evaluation: the recipes' own settings\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
