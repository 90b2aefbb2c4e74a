"""Benchmark: the prune pass on SmolLM2-135M-Instruct, informed choices vs naive baselines, side by side.

    python benchmarks/pruning.py [--model demo] [--samples 16] [--eval-tokens 4096] [--rounds 5]
                                 [--distill-steps 40] [--batch-size 4] [--train-seq-len 128] [--lr 2e-4]
                                 [--threads N] [--variants SUBSTRING ...] [--no-speed]

CPU budget: about 20 minutes on 2 cores at the defaults (an estimate from the step time of short runs,
~12 s per training step on one loaded core; the last line prints the real total): about 5 for the seven
variants, their evaluation, two ONNX exports and the speed rounds, the rest for two distillation runs
(--distill-steps x --batch-size windows of --train-seq-len tokens, the whole model but the embedding
trained; --distill-steps 0 skips them). For a smoke run:
--variants width depth --no-speed --eval-tokens 512 --samples 4 --distill-steps 2 --threads 1.

One run, one process: every variant starts from a copy of the same model, is calibrated on the same
seeded windows and evaluated (PyTorch, float32) on the same tokens, which are disjoint from the
calibration tokens. Decode speed and prefill are measured on ONNX exports (ONNX Runtime, CPU) for the
baseline and 25% MLP width pruning only: a ~45 s export each, and the masks of unstructured/2:4
sparsity change no shape, so dense kernels run them at the baseline's speed. The rounds alternate
between the two models so that load from other processes hits both alike.

Then the best width variant and the best depth variant (by perplexity) are each distilled, on a copy,
against the original model: forward KL to its next-token distributions (the `distill` pass), every
parameter trained except the token embedding (tied to the output head), with the same windows, steps,
schedule and seed for both. The training windows are drawn after the evaluation tokens. "gap recovered"
is (ppl_pruned - ppl_distilled) / (ppl_pruned - ppl_original). Distillation changes no shape, so a
distilled model decodes at its pruned variant's speed.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("width mlp 25%, activation", {"method": "width", "mlp": 0.25, "importance": "activation"}),
    ("width mlp 25%, magnitude", {"method": "width", "mlp": 0.25, "importance": "magnitude"}),
    ("depth -4 layers, block influence", {"method": "depth", "num_layers": 4, "layer_choice": "block_influence"}),
    ("depth -4 layers, last 4", {"method": "depth", "num_layers": 4, "layer_choice": "last"}),
    ("unstructured 50%, wanda", {"method": "unstructured", "sparsity": 0.5, "criterion": "wanda"}),
    ("unstructured 50%, magnitude", {"method": "unstructured", "sparsity": 0.5, "criterion": "magnitude"}),
    ("2:4, wanda", {"method": "2:4", "criterion": "wanda"}),
]
SPEED_VARIANT = "width mlp 25%, activation"
BASELINE = "baseline (fp32)"
FREEZE = ["model.embed_tokens.*"]  # tied to lm_head: the largest matrix stays fixed


def export_onnx(model: Any, tokenizer: Any, folder: Path) -> Path:
    """llmopt's fp32 ONNX graph of the (pruned) model, as its ONNX exporter writes it."""
    from llmopt.blocks import model_blocks
    from llmopt.exporters.onnx_writer import write_decoder

    folder.mkdir(parents=True, exist_ok=True)
    write_decoder(model, model_blocks(model, {}), folder)
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def alternating_speed(folders: dict[str, Path], prompt: np.ndarray, new_tokens: int, rounds: int,
                      threads: int | None) -> dict[str, tuple[float, float]]:
    """(median decode tokens/s, median prefill ms) per model, one run of each per round, interleaved."""
    from llmopt.evaluation.runners import OrtRunner
    from llmopt.evaluation.speed import measure_speed

    runners = {name: OrtRunner(folder, threads) for name, folder in folders.items()}
    decode: dict[str, list[float]] = {name: [] for name in runners}
    prefill: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            s = measure_speed(runner, prompt, new_tokens, runs=1)
            decode[name].append(s.decode_tokens_per_s)
            prefill[name].append(s.prefill_ms)
    return {name: (statistics.median(decode[name]), statistics.median(prefill[name])) for name in runners}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="'demo' or a local checkpoint folder")
    parser.add_argument("--samples", type=int, default=16, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="evaluation tokens (perplexity, KL, top-1)")
    parser.add_argument("--window", type=int, default=256, help="tokens per evaluation window")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="speed measurements per model (median)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and ONNX Runtime threads (default: their own choice, all cores)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="SUBSTRING",
                        help="run only the variants whose label contains one of these (e.g. width depth)")
    parser.add_argument("--no-speed", action="store_true", help="skip the ONNX exports and speed rounds")
    parser.add_argument("--distill-steps", type=int, default=40, help="optimizer steps per distillation run (0: none)")
    parser.add_argument("--batch-size", type=int, default=4, help="training windows per step")
    parser.add_argument("--train-seq-len", type=int, default=128, help="tokens per training window")
    parser.add_argument("--lr", type=float, default=2e-4, help="peak AdamW learning rate")
    args = parser.parse_args()
    variants = [(label, config) for label, config in VARIANTS
                if args.variants is None or any(v.lower() in label.lower() for v in args.variants)]
    if not variants:
        parser.error(f"--variants {' '.join(args.variants)} matches none of: {', '.join(name for name, _ in VARIANTS)}")
    do_speed = not args.no_speed and any(label == SPEED_VARIANT for label, _ in variants)

    import torch

    from llmopt.evaluation.calibration import calibration_batches
    from llmopt.evaluation.quality import compare_quality, token_windows
    from llmopt.evaluation.runners import CachedRunner, TorchRunner
    from llmopt.evaluation.text import builtin_text
    from llmopt.exporters.base import weight_bytes
    from llmopt.model import load_model, resolve_model
    from llmopt.passes.distill import DistillConfig, DistillPass
    from llmopt.passes.prune import SPARSITY_NOTE, PruneConfig, PrunePass
    from llmopt.state import ModelState, PassContext

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    torch.manual_seed(0)
    base, tokenizer = load_model(resolve_model(args.model))
    text = builtin_text()
    windows = token_windows(tokenizer, text, args.eval_tokens, args.window)
    batches, described = calibration_batches(tokenizer, data="builtin", text_field="text", samples=args.samples,
                                             seq_len=args.seq_len, seed=0, skip_tokens=args.eval_tokens)
    reference = CachedRunner(TorchRunner(base))

    def parameters(model: Any) -> int:
        return sum(p.numel() for p in model.parameters())

    rows: dict[str, dict[str, Any]] = {BASELINE: {"params": parameters(base)}}
    speed_model = None
    best: dict[str, tuple[str, Any]] = {}  # "width" / "depth" -> (label, model) of the lowest perplexity so far
    for label, config in variants:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        state = PrunePass(PruneConfig(**config)).run(ModelState(model, tokenizer),
                                                     PassContext(seed=0, calibration=lambda: batches))
        seconds = time.perf_counter() - t0
        q = compare_quality(reference, TorchRunner(model), windows)
        info = state.pass_info["prune"]
        rows[label] = {"params": parameters(model), "ppl": q.perplexity, "kl": q.kl_divergence,
                       "top1": q.top1_agreement, "seconds": seconds, "info": info}
        rows[BASELINE]["ppl"] = q.baseline_perplexity
        print(f"{label}: perplexity {q.perplexity:.2f} (baseline {q.baseline_perplexity:.2f}), "
              f"{seconds:.0f} s to prune; " + _what_went(info), flush=True)
        kind = info["method"]
        keep = kind in ("width", "depth") and (kind not in best or q.perplexity < rows[best[kind][0]]["ppl"])
        if keep:
            best[kind] = (label, model)
        if label == SPEED_VARIANT:
            speed_model = model
        del state
        if not keep and label != SPEED_VARIANT:
            del model
        gc.collect()

    if do_speed:
        with tempfile.TemporaryDirectory(prefix="prune-bench-") as scratch:
            folders = {BASELINE: export_onnx(base, tokenizer, Path(scratch) / "base"),
                       SPEED_VARIANT: export_onnx(speed_model, tokenizer, Path(scratch) / "width")}
            ids = tokenizer(text[:20000], add_special_tokens=False)["input_ids"][: args.prompt_tokens]
            speeds = alternating_speed(folders, np.asarray(ids, dtype=np.int64), args.new_tokens, args.rounds,
                                       args.threads)
            for name, (decode, prefill) in speeds.items():
                rows[name].update(decode=decode, prefill=prefill, onnx_mb=weight_bytes(folders[name]) / 1e6)
    speed_model = None
    gc.collect()

    steps, distill_info, train_described = args.distill_steps, None, ""
    if steps > 0 and best:
        # Enough windows that no training window is seen twice, plus the held-out split; all after the
        # evaluation tokens.
        n_train = steps * args.batch_size + max(4, steps * args.batch_size // 10)
        training, train_described = calibration_batches(
            tokenizer, data="builtin", text_field="text", samples=n_train, seq_len=args.train_seq_len, seed=0,
            skip_tokens=args.eval_tokens)
        distill_config = DistillConfig(
            steps=steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=min(max(1, steps // 8), steps - 1),
            eval_every=max(1, steps // 2), eval_fraction=0.05, loss="forward_kl", freeze=FREEZE, precision="fp32")
        for kind in ("width", "depth"):
            if kind not in best:
                continue
            label, pruned = best.pop(kind)
            student = copy.deepcopy(pruned)
            del pruned
            t0 = time.perf_counter()
            state = DistillPass(distill_config).run(
                ModelState(student, tokenizer), PassContext(seed=0, calibration=lambda: training, teacher=lambda: base))
            seconds = time.perf_counter() - t0
            distill_info = state.pass_info["distill"]
            q = compare_quality(reference, TorchRunner(student), windows)
            name = f"{label} + distill {steps} steps"
            gap = rows[label]["ppl"] - rows[BASELINE]["ppl"]
            rows[name] = {"params": parameters(student), "ppl": q.perplexity, "kl": q.kl_divergence,
                          "top1": q.top1_agreement, "train_seconds": seconds, "distilled_from": label,
                          "recovered": (rows[label]["ppl"] - q.perplexity) / gap if gap > 0 else float("nan")}
            print(f"{name}: perplexity {q.perplexity:.2f} (pruned {rows[label]['ppl']:.2f}), {seconds:.0f} s to train "
                  f"(best held-out loss {distill_info['best_eval_loss']:.4f} at step {distill_info['best_step']}; "
                  f"{distill_info['seconds'] / steps:.1f} s/step)",
                  flush=True)
            del student, state
            gc.collect()
    best.clear()

    base_row = rows[BASELINE]
    header = ("variant", "params (M)", "size MB", "perplexity", "KL", "top-1", "gap recovered", "decode tok/s (ONNX)",
              "prefill ms (ONNX)", "prune / train s")
    speed_note = (f"speed: {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, median of {args.rounds} "
                  f"interleaved rounds" if do_speed else "speed: not measured in this run")
    print(f"\nSmolLM2-135M-Instruct (PyTorch fp32 for quality, ONNX Runtime CPU for speed); calibration: {described}; "
          f"evaluation: first {len(windows) * args.window} tokens of the built-in text, windows of {args.window}; "
          f"{speed_note}; {torch.get_num_threads()} threads")
    if distill_info is not None:
        print(f"distillation: {train_described}, after the evaluation tokens ({distill_info['held_out_windows']} held "
              f"out); forward KL to the original, {steps} steps x {args.batch_size} windows "
              f"({distill_info['tokens_seen']:,} tokens), AdamW lr {args.lr} warm-up + cosine, fp32, "
              f"everything trained but {FREEZE} (the tied embedding), best held-out checkpoint kept. "
              "gap recovered = (ppl_pruned - ppl_distilled) / (ppl_pruned - ppl_original)")
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, r in rows.items():
        size = f"{r['onnx_mb']:.0f} (onnx)" if "onnx_mb" in r else f"{r['params'] * 4 / 1e6:.0f} (fp32)"
        ppl = f"{r['ppl']:.2f}" + ("" if r is base_row else f" ({(r['ppl'] / base_row['ppl'] - 1) * 100:+.0f}%)")
        sparse = "info" in r and r["info"]["method"] in ("unstructured", "2:4")
        decode = (f"{r['decode']:.1f}" + ("" if r is base_row else f" ({r['decode'] / base_row['decode']:.2f}x)")
                  if "decode" in r else "= baseline (dense kernels)" if sparse
                  else "= pruned variant (same shapes)" if "distilled_from" in r else "not measured")
        prefill = f"{r['prefill']:.0f}" if "prefill" in r else "-"
        seconds = (f"{r['seconds']:.0f}" if "seconds" in r else f"{r['train_seconds']:.0f} (train)"
                   if "train_seconds" in r else "-")
        print("| " + " | ".join([
            name, f"{r['params'] / 1e6:.1f}", size, ppl, f"{r['kl']:.3f}" if "kl" in r else "-",
            f"{r['top1']:.1%}" if "top1" in r else "-", f"{r['recovered']:.0%}" if "recovered" in r else "",
            decode, prefill, seconds]) + " |")

    def ppl(label: str) -> float:
        return rows[label]["ppl"]

    def versus(name: str, a: str, b: str) -> tuple[str, bool, str] | None:
        if a not in rows or b not in rows:
            return None
        return name, ppl(a) < ppl(b), f"{ppl(a):.2f} vs {ppl(b):.2f}"

    speedup = rows[SPEED_VARIANT]["decode"] / base_row["decode"] if do_speed else None
    targets = [
        versus("width: activation importance beats weight magnitude on perplexity",
               "width mlp 25%, activation", "width mlp 25%, magnitude"),
        versus("depth: block influence beats removing the last 4 layers on perplexity",
               "depth -4 layers, block influence", "depth -4 layers, last 4"),
        ("25% MLP width pruning: >= 1.15x decode speed in ONNX", speedup >= 1.15, f"{speedup:.2f}x")
        if speedup is not None else None,
        versus("unstructured 50%: Wanda beats magnitude on perplexity",
               "unstructured 50%, wanda", "unstructured 50%, magnitude"),
    ]
    print("\nTargets:")
    for target in targets:
        if target is not None:
            name, ok, figures = target
            print(f"- [{'PASS' if ok else 'FAIL'}] {name}: {figures}")
    skipped = sum(t is None for t in targets)
    if skipped:
        print(f"- {skipped} not evaluated: their variants or the speed measurement were not run "
              "(--variants/--no-speed)")
    distilled = [(name, r) for name, r in rows.items() if "distilled_from" in r]
    if distilled:
        print(f"\nAfter distillation ({steps} steps, same windows for both):")
        for name, r in distilled:
            src = r["distilled_from"]
            print(f"- {src}: perplexity {ppl(src):.2f} -> {r['ppl']:.2f} (original {base_row['ppl']:.2f}), "
                  f"{r['recovered']:.0%} of the gap recovered; KL {rows[src]['kl']:.3f} -> {r['kl']:.3f}")
    print(f"Sparsity: {SPARSITY_NOTE}")
    print(f"Total {time.perf_counter() - started:.0f} s.")


def _what_went(info: dict[str, Any]) -> str:
    if info["method"] == "width":
        return f"{info['before']['intermediate_size']} -> {info['after']['intermediate_size']} MLP channels per layer"
    if info["method"] == "depth":
        return f"removed layers {info['removed_layers']}"
    return f"sparsity {info['achieved_sparsity']:.1%}"


if __name__ == "__main__":
    main()
