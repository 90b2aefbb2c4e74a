"""Benchmark: the `gqa` pass on SmolLM2-135M-Instruct (3 KV heads -> 1), mean-pooling vs PCA, each then distilled.

    python benchmarks/gqa.py [--model demo|PATH] [--kv-heads 1] [--eval-tokens 2048] [--samples 32] [--seq-len 256]
                             [--distill-steps 40] [--batch-size 4] [--train-seq-len 128] [--lr 2e-4] [--threads 2]

CPU budget: about 15 minutes on 2 cores at the defaults (an estimate from the step time of short runs,
~12 s per training step on one loaded core; the last line prints the real total), nearly all of it the two
distillation runs (--distill-steps x --batch-size windows of --train-seq-len tokens each; --distill-steps 0
skips them, leaving about a minute); the table states the seconds each rewrite and each training run took.
For a smoke run: --eval-tokens 512 --samples 4 --distill-steps 2 --threads 1.

Each method rewrites a copy of the model; perplexity, KL(original || rewritten) and top-1 agreement are
measured against the original on the first `--eval-tokens` tokens of the built-in text. Calibration
windows (for PCA) and training windows are drawn after them, so no number is measured on text that a
rewrite or a training run saw. Each rewritten model is then distilled, on a copy, against the original:
forward KL to its next-token distributions (the `distill` pass), training the attention projections only
(`train_only: ["*.self_attn.*"]`), with the same windows, steps, schedule and seed for every method.

Targets (issue 5): the activation-aware method's (PCA's) perplexity increase is at most 70% of
mean-pooling's before training; after the same short distillation, the gap to the original shrinks by at
least half ("gap closed" = (ppl_before - ppl_after) / (ppl_before - ppl_original)).
"""

from __future__ import annotations

import argparse
import copy
import time

from llmopt.evaluation.calibration import calibration_batches
from llmopt.evaluation.quality import compare_quality, token_windows
from llmopt.evaluation.runners import CachedRunner, TorchRunner
from llmopt.evaluation.text import builtin_text
from llmopt.model import ArchInfo, load_model, resolve_model
from llmopt.passes.distill import DistillConfig, DistillPass
from llmopt.passes.gqa import GqaConfig, GqaPass
from llmopt.state import ModelState, PassContext

TARGET = 0.70  # activation-aware increase / mean-pooling increase, before training
GAP_TARGET = 0.50  # share of the perplexity gap to the original that distillation closes
TRAIN_ONLY = ["*.self_attn.*"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="'demo' (SmolLM2-135M-Instruct) or a checkpoint folder")
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=["mean", "pca"], choices=["mean", "pca"])
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--samples", type=int, default=32, help="calibration windows (PCA)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--distill-steps", type=int, default=40, help="optimizer steps per distillation run (0: none)")
    parser.add_argument("--batch-size", type=int, default=4, help="training windows per step")
    parser.add_argument("--train-seq-len", type=int, default=128, help="tokens per training window")
    parser.add_argument("--lr", type=float, default=2e-4, help="peak AdamW learning rate")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base, tokenizer = load_model(resolve_model(args.model))
    arch = ArchInfo.from_config(base.config)
    windows = token_windows(tokenizer, builtin_text(), args.eval_tokens, args.window)
    calibration, description = calibration_batches(
        tokenizer, data="builtin", text_field="text", samples=args.samples, seq_len=args.seq_len, seed=args.seed,
        skip_tokens=args.eval_tokens)
    steps = args.distill_steps
    if steps > 0:
        # Enough windows that no training window is seen twice, plus the held-out split; all after the
        # evaluation tokens.
        n_train = steps * args.batch_size + max(4, steps * args.batch_size // 10)
        training, train_description = calibration_batches(
            tokenizer, data="builtin", text_field="text", samples=n_train, seq_len=args.train_seq_len,
            seed=args.seed, skip_tokens=args.eval_tokens)
        distill_config = DistillConfig(
            steps=steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=min(max(1, steps // 8), steps - 1),
            eval_every=max(1, steps // 2), eval_fraction=0.05, loss="forward_kl", train_only=TRAIN_ONLY,
            precision="fp32")
    original = CachedRunner(TorchRunner(base))
    base_bytes = arch.kv_cache_bytes_per_token()

    rows, ppl, trained_ppl, increases, closed, info = [], {}, {}, {}, {}, None
    baseline = None

    def row(name: str, kv_heads: int, kv_bytes: int, scores, seconds: float, gap_closed: str) -> None:
        increase = scores.perplexity / scores.baseline_perplexity - 1
        rows.append((name, str(kv_heads), f"{kv_bytes:,} ({kv_bytes / base_bytes - 1:+.0%})",
                     f"{scores.perplexity:.3f}", f"{increase:+.1%}", f"{scores.kl_divergence:.4f}",
                     f"{scores.top1_agreement:.1%}", gap_closed, f"{seconds:.0f}"))

    for method in args.methods:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        GqaPass(GqaConfig(num_key_value_heads=args.kv_heads, method=method)).run(
            ModelState(model, tokenizer), PassContext(seed=args.seed, calibration=lambda: calibration))
        seconds = time.perf_counter() - t0
        scores = compare_quality(original, TorchRunner(model), windows)
        after = ArchInfo.from_config(model.config)
        if baseline is None:
            baseline = scores.baseline_perplexity
            rows.append(("original", str(arch.num_kv_heads), f"{base_bytes:,}", f"{baseline:.3f}", "", "", "", "",
                         ""))
        ppl[method] = scores.perplexity
        increases[method] = scores.perplexity / baseline - 1
        row(method, after.num_kv_heads, after.kv_cache_bytes_per_token(), scores, seconds, "")
        print(f"{method}: perplexity {scores.perplexity:.3f} (original {baseline:.3f}), {seconds:.0f} s", flush=True)

        if steps > 0:
            student = copy.deepcopy(model)
            del model
            t0 = time.perf_counter()
            state = DistillPass(distill_config).run(
                ModelState(student, tokenizer),
                PassContext(seed=args.seed, calibration=lambda: training, teacher=lambda: base))
            seconds = time.perf_counter() - t0
            info = state.pass_info["distill"]
            trained = compare_quality(original, TorchRunner(student), windows)
            gap = ppl[method] - baseline
            trained_ppl[method] = trained.perplexity
            closed[method] = (ppl[method] - trained.perplexity) / gap if gap > 0 else float("nan")
            row(f"{method} + distill {steps} steps", after.num_kv_heads, after.kv_cache_bytes_per_token(), trained,
                seconds, f"{closed[method]:.0%}")
            print(f"{method} + distill {steps} steps: perplexity {trained.perplexity:.3f}, {seconds:.0f} s "
                  f"(best held-out loss {info['best_eval_loss']:.4f} at step {info['best_step']}; "
                  f"{info['seconds'] / steps:.1f} s/step)", flush=True)
            del student, state
        else:
            del model

    print(f"\n{args.model}: {arch.model_type}, {arch.num_layers} layers, {arch.num_heads} query heads, "
          f"{arch.num_kv_heads} -> {args.kv_heads} KV heads (head_dim {arch.head_dim}); "
          f"{torch.get_num_threads()} torch threads")
    print(f"evaluation: {scores.tokens} tokens of the built-in text ({scores.windows} windows of {args.window}); "
          f"calibration: {description}, after them")
    if info is not None:
        print(f"distillation: {train_description}, after the evaluation tokens "
              f"({info['held_out_windows']} held out); forward KL to the original, {steps} steps x "
              f"{args.batch_size} windows ({info['tokens_seen']:,} tokens), "
              f"AdamW lr {args.lr} warm-up + cosine, fp32, trainable {info['trainable_parameters'] / 1e6:.1f}M of "
              f"{(info['trainable_parameters'] + info['frozen_parameters']) / 1e6:.1f}M parameters "
              f"(train_only {TRAIN_ONLY}), best held-out checkpoint kept")
    else:
        print("distillation: skipped (--distill-steps 0)")
    print("KV bytes/token: float32 cache, all layers, keys + values. gap closed = (ppl_before - ppl_after) / "
          "(ppl_before - ppl_original). s: seconds of the rewrite, or of the training run.\n")
    header = ("method", "KV heads", "KV bytes/token", "perplexity", "vs original", "KL", "top-1", "gap closed", "s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")

    print()
    if "mean" in increases:
        for method in (m for m in increases if m != "mean"):
            ratio = increases[method] / increases["mean"] if increases["mean"] > 0 else float("nan")
            print(f"- [{'PASS' if ratio <= TARGET else 'FAIL'}] before training, perplexity increase {method} / mean: "
                  f"{increases[method]:+.1%} / {increases['mean']:+.1%} = {ratio:.3f} (target <= {TARGET:.2f})")
    for method, share in closed.items():
        print(f"- [{'PASS' if share >= GAP_TARGET else 'FAIL'}] {method} + distill {steps} steps closes {share:.0%} of "
              f"its perplexity gap ({ppl[method]:.3f} -> {trained_ppl[method]:.3f}, "
              f"original {baseline:.3f}; target >= {GAP_TARGET:.0%})")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
