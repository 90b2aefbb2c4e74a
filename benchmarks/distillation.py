"""Benchmark: distillation vs plain fine-tuning at equal steps, recovering a damaged SmolLM2-135M-Instruct on a CPU.

    python benchmarks/distillation.py [--model demo] [--steps 16] [--threads 2]

CPU budget: about 10 minutes on 2 cores (the two training runs take 4-6 minutes of it), set by --steps,
--batch-size and --seq-len; the printed table states the time each part took.

The damage, by hand: decoder layers 20-23 of 30 are dropped (a contiguous block in the upper middle,
where depth pruning finds the least useful layers; perplexity goes from ~17 to ~85). int4 RTN weights
would not do: they are not trainable. Both recoveries then train the same parameters (the decoder layers
from 16 on and the final norm: the layers around the gap; the tied embedding, the largest and most
costly matrix, stays fixed) with the same optimizer, schedule, windows and number of steps. One minimizes
the forward KL to the original model's next-token distributions (the `distill` pass), the other the
next-token cross-entropy on the same text (the same pass with kl_weight 0, lm_weight 1).

Training windows come from the built-in text after the first --eval-tokens tokens, which are the
evaluation windows: perplexity, KL(original ‖ model) and top-1 agreement are measured on text no run
trained on. "gap recovered" is (ppl_damaged - ppl) / (ppl_damaged - ppl_original).
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

DROPPED = (20, 21, 22, 23)
TRAIN_ONLY = ["model.layers.1[6-9].*", "model.layers.2?.*", "model.norm.*"]  # after the drop: layers 16-25
# Student layer outputs (1-based) -> the original's: the layer before the gap must now produce what the
# dropped layers produced, and every later layer what its original produced.
GAP_MAP = {i: i + len(DROPPED) for i in range(DROPPED[0], 31 - len(DROPPED))}


def drop_layers(model: Any, layers: tuple[int, ...]) -> Any:
    """A copy of `model` without the given decoder layers (the rest renumbered, config updated)."""
    import torch

    model = copy.deepcopy(model)
    kept = [layer for i, layer in enumerate(model.model.layers) if i not in layers]
    for i, layer in enumerate(kept):
        layer.self_attn.layer_idx = i  # the KV cache is indexed by it
    model.model.layers = torch.nn.ModuleList(kept)
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if i not in layers]
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="demo, or a local SmolLM2 folder")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--methods", nargs="+", default=["distill", "lm"],
                        choices=["distill", "distill-hidden", "distill-lm", "lm"])
    args = parser.parse_args()

    import torch

    from llmopt.evaluation.calibration import calibration_batches
    from llmopt.evaluation.quality import compare_quality, token_windows
    from llmopt.evaluation.runners import CachedRunner, TorchRunner
    from llmopt.evaluation.text import builtin_text
    from llmopt.model import load_model, resolve_model
    from llmopt.passes.distill import DistillConfig, DistillPass
    from llmopt.state import ModelState, PassContext

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    original, tokenizer = load_model(resolve_model(args.model))
    evaluation = token_windows(tokenizer, builtin_text(), args.eval_tokens, 256)
    # Enough windows that no training window is seen twice; disjoint from the evaluation tokens.
    samples = args.steps * args.batch_size + max(4, args.steps * args.batch_size // 10)
    windows, _ = calibration_batches(tokenizer, data="builtin", text_field="text", samples=samples,
                                     seq_len=args.seq_len, seed=0, skip_tokens=args.eval_tokens)
    reference = CachedRunner(TorchRunner(original))
    damaged = drop_layers(original, DROPPED)

    rows = []

    def measure(name: str, model: Any, seconds: float | None, info: dict | None) -> None:
        t0 = time.perf_counter()
        q = compare_quality(reference, TorchRunner(model), evaluation)
        rows.append({"name": name, "ppl": q.perplexity, "base": q.baseline_perplexity, "kl": q.kl_divergence,
                     "top1": q.top1_agreement, "train_s": seconds, "eval_s": time.perf_counter() - t0, "info": info})

    measure(f"damaged (layers {DROPPED[0]}-{DROPPED[-1]} dropped)", damaged, None, None)
    common = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": max(1, args.steps // 8),
              "eval_every": max(1, args.steps // 2), "eval_fraction": 0.05, "train_only": TRAIN_ONLY,
              "precision": "fp32"}
    configs = {
        "distill": ("distill (forward KL)", DistillConfig(**common)),  # T = 1
        "distill-hidden": ("distill (forward KL + hidden MSE)",
                           DistillConfig(**common, hidden_weight=1.0, layer_map=GAP_MAP)),
        "distill-lm": ("distill (forward KL + 0.5 LM)", DistillConfig(**common, lm_weight=0.5)),
        "lm": ("LM fine-tuning (cross-entropy)", DistillConfig(**common, kl_weight=0.0, lm_weight=1.0)),
    }
    for method in args.methods:
        student = copy.deepcopy(damaged)
        ctx = PassContext(seed=0, calibration=lambda: windows, teacher=lambda: original)
        t0 = time.perf_counter()
        label, config = configs[method]
        info = DistillPass(config).run(ModelState(student, tokenizer), ctx).pass_info["distill"]
        measure(f"{label}, {args.steps} steps", student, time.perf_counter() - t0, info)

    base = rows[0]["base"]
    gap = rows[0]["ppl"] - base
    info = next((r["info"] for r in rows if r["info"]), None)
    print(f"\nSmolLM2-135M-Instruct ({args.model}), {torch.get_num_threads()} torch threads; original perplexity "
          f"{base:.2f} on {len(evaluation)} x 256 held-out tokens")
    if info:
        print(f"training: {args.steps} steps x {args.batch_size} windows x {args.seq_len} tokens "
              f"({info['tokens_seen']} tokens), AdamW lr {args.lr} warm-up + cosine, trainable "
              f"{info['trainable_parameters'] / 1e6:.1f}M of {(info['trainable_parameters'] + info['frozen_parameters']) / 1e6:.1f}M "
              f"parameters (layers 16-25 and the final norm)\n")
    header = ("model", "perplexity", "KL vs original", "top-1 agreement", "gap recovered", "best held-out loss (step)",
              "train s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        recovered = "" if r["info"] is None else f"{(rows[0]['ppl'] - r['ppl']) / gap:.0%}"
        best = "" if r["info"] is None else f"{r['info']['best_eval_loss']:.3f} ({r['info']['best_step']})"
        train = "" if r["train_s"] is None else f"{r['train_s']:.0f}"
        print(f"| {r['name']} | {r['ppl']:.2f} | {r['kl']:.3f} | {r['top1']:.1%} | {recovered} | {best} | {train} |")
    print(f"\ntotal {time.perf_counter() - started:.0f} s (evaluation {sum(r['eval_s'] for r in rows):.0f} s)")


if __name__ == "__main__":
    main()
