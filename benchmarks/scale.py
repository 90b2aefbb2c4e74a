"""Benchmark: int4 RTN, GPTQ, SignRound or AWQ of a checkpoint bigger than this machine's memory, streamed layer
by layer.

    python benchmarks/scale.py [--dir ~/.cache/llmopt-bench/scale] [--kv-heads 32] [--group-size 32]
                               [--layers 32] [--keep] [--skip-7b] [--skip-smollm2] [--skip-onnx-check]
                               [--formats onnx safetensors] [--method rtn|gptq|signround] [--iters 200] [--awq]
                               [--families llama qwen3 ... | all]
                               [--calibration-samples 32] [--calibration-len 256] [--no-validate]
                               [--evaluate] [--markdown]

1. Writes a random-weight, 7B-shaped checkpoint in float32 (hidden 4096, 32 layers, 32 heads, intermediate
   11008, vocab 32000: ~27 GB for Llama) of each family in `--families` (Llama by default; `all` for every
   described family, each with its own layout: FAMILY_7B) as one safetensors shard per layer, generated a layer
   at a time with numpy (never the whole model in memory). Free disk is checked first; the folder is deleted at the end
   unless --keep.
2. Streams it through `llmopt.streaming.quantize_checkpoint` to ONNX (MatMulNBits + GroupQueryAttention) and to
   safetensors (compressed-tensors pack-quantized), each in a fresh child process, and prints each run's peak
   resident memory (the child's own VmHWM), wall time and output size. The stream checks its
   artifact as it does for users (a reference computed layer by layer, then the artifact loaded by its runtime
   and compared), so the peak and the time include the check; `--no-validate` leaves it out. The ONNX artifact is
   then loaded by onnxruntime and run for a prefill and two decode steps (finite logits of the right shape),
   in its own child, whose peak is printed apart: it is the runtime's, holding the whole int4 model.
3. The same streaming runs for the real SmolLM2-135M (`demo`, converted to float32 safetensors first), with its
   size on disk next to the peaks. With `--evaluate`, SmolLM2 also goes through `llmopt.optimize` with the same
   quantize pass, streamed and in memory, both evaluated on the default 4096 tokens (speed off): the streamed
   run's quality figures come from its layer-by-layer walk, the in-memory run's from the artifact loaded whole.

With `--method gptq` or `signround` and/or `--awq` the runs calibrate on random token ids (`--calibration-samples`
windows of `--calibration-len`): peak memory then adds the activations and each layer's Hessians (SignRound: its
tunables), and the wall time grows with the calibration tokens (on 2 cores, minutes per 7B-shaped layer: use
`--layers 2` and `--layers 4` to show that the peak does not grow with depth). SignRound's peak does not depend on `--iters` (its tunables and one
batch's activations are held whatever the count), its time does: a few iterations show the peak.

A child that only imports what the streaming run imports is measured too: its peak is the fixed cost
(Python, torch, transformers, onnx) that every row includes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

GB = 1e9
SHAPE_7B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 11008,
            "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


# ---- children: each step runs in its own process so that its peak is its own ----

def _peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM, which belongs to the memory map exec made, so only this
    interpreter's own. (getrusage's ru_maxrss keeps the forking parent's peak across exec.)"""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: the best there is


def _child_report(started: float, **extra) -> None:
    print(json.dumps({"peak_rss_bytes": _peak_rss_bytes(), "wall_s": time.perf_counter() - started, **extra}))


# What a 7B-shaped model of each described family sets beyond SHAPE_7B (the family's own layout: head width,
# windows, multipliers, experts); everything else is the config class's default.
FAMILY_7B = {
    "llama": {}, "qwen2": {}, "olmo2": {}, "cohere": {},
    "mistral": {"sliding_window": 4096},
    "qwen3": {"head_dim": 128},
    "qwen3_moe": {"head_dim": 128, "num_experts": 16, "num_experts_per_tok": 2, "moe_intermediate_size": 1408,
                  "norm_topk_prob": True},
    "smollm3": {"no_rope_layer_interval": 4},
    "granite": {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.0078125,
                "logits_scaling": 16.0},
    "gemma": {"head_dim": 128},
    "gemma2": {"head_dim": 128, "sliding_window": 4096},
    "gemma3_text": {"head_dim": 128, "sliding_window": 1024},
    "phi3": {"partial_rotary_factor": 0.75},  # Phi-4-mini's partial rotary
}


def family_config(family: str, kv_heads: int, layers: int):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **{**SHAPE_7B, "num_hidden_layers": layers, **FAMILY_7B[family]},
                                num_key_value_heads=kv_heads, tie_word_embeddings=False, bos_token_id=1,
                                eos_token_id=2, pad_token_id=0)


def checkpoint_shapes(config, scratch: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a checkpoint of `config`, from its module tree on the meta device."""
    from llmopt.streaming_calibrated import empty_model

    config.save_pretrained(scratch)
    try:
        return {name: tuple(t.shape) for name, t in empty_model(scratch).state_dict().items()}
    finally:
        shutil.rmtree(scratch)


def child_generate(folder: Path, kv_heads: int, seed: int, layers: int, family: str) -> None:
    """A random checkpoint of `family`, one layer per safetensors shard, each generated and written before the
    next. The tensor names and shapes are the family's own, read from its module tree on the meta device (no
    memory), with MoE experts one Linear each as checkpoints store them."""
    import numpy as np
    from safetensors.numpy import save_file

    started = time.perf_counter()
    config = family_config(family, kv_heads, layers)
    shapes = checkpoint_shapes(config, folder.with_name(folder.name + ".config"))
    rng = np.random.default_rng(seed)

    def make(name: str, shape: tuple[int, ...]):
        def tensor() -> np.ndarray:
            if len(shape) == 1:  # norms at 1 (Gemma's 1 + w: doubled, harmless), biases at 0
                return np.zeros(shape, np.float32) if name.endswith(".bias") else np.ones(shape, np.float32)
            out = rng.standard_normal(shape, dtype=np.float32)
            out *= 0.02  # in place: the std of the families' initializers
            return out
        return tensor

    def block(prefix: str) -> dict:
        return {n: make(n, shape) for n, shape in shapes.items() if n.startswith(prefix)}

    shards: list[dict] = [block("model.embed_tokens.")]
    shards += [block(f"model.layers.{i}.") for i in range(config.num_hidden_layers)]
    top = {n for n in shapes if not n.startswith(("model.embed_tokens.", "model.layers."))}
    shards.append({n: make(n, shapes[n]) for n in sorted(top)})
    final, folder = folder, folder.with_name(folder.name + ".partial")  # renamed when complete
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    weight_map, total = {}, 0
    for s, makers in enumerate(shards):
        name = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {key: make() for key, make in makers.items()}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(folder)
    folder.rename(final)
    _child_report(started, bytes=total)


def child_stream(model: Path, output: Path, fmt: str, group_size: int, method: str, awq: bool, samples: int,
                 seq_len: int, validate: bool, iters: int) -> None:
    import numpy as np

    from llmopt.passes.quantize import QuantizeConfig
    from llmopt.streaming import quantize_checkpoint

    started = time.perf_counter()
    tuning = {"iters": iters} if method == "signround" else {}
    config = QuantizeConfig(method=method, awq=awq, bits=4, group_size=group_size, **tuning)
    windows = None
    if method != "rtn" or awq:  # random token ids: memory and time depend on how many, not on the text
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        rng = np.random.default_rng(0)
        windows = [rng.integers(0, vocab, size=seq_len, dtype=np.int64) for _ in range(samples)]
    result = quantize_checkpoint(model, output, config, export_format=fmt, force=True, calibration=windows,
                                 validate=validate)
    weights = sum(size for name, size in result.files.items() if name.endswith((".onnx", ".data", ".safetensors")))
    v = result.validation
    checked = ({"validated": v.passed, "max_abs_logit_diff": round(v.max_abs_logit_diff, 5),
                "decode_top1": v.decode_top1_agreement} if v is not None else {"validated": None})
    _child_report(started, weights_bytes=weights, quantized_tensors=result.quantized_tensors, **checked)


def child_optimize(model: Path, output: Path, fmt: str, method: str, awq: bool, streaming: bool, iters: int) -> None:
    """`llmopt.optimize` of one int4 quantize pass, streamed or in memory, evaluated (speed off: a streamed run
    does not measure it), for the quality figures side by side."""
    import llmopt
    from llmopt.recipe import Recipe

    started = time.perf_counter()
    recipe = Recipe.model_validate({
        "model": str(model), "passes": [{"type": "quantize", "method": method, "awq": awq, "group_size": 32,
                                         **({"iters": iters} if method == "signround" else {})}],
        "export": {"format": fmt, "streaming": streaming}, "evaluation": {"speed": {"enabled": False}}})
    report = llmopt.optimize(recipe, output=output, force=True).report
    q = report.quality
    _child_report(started, weights_bytes=report.optimized.size_bytes, baseline_perplexity=report.baseline.perplexity,
                  perplexity=report.optimized.perplexity, increase_pct=round(q.perplexity_increase_pct, 3),
                  interval=[round(v, 2) for v in q.intervals["perplexity_increase_pct"]],
                  kl=round(q.kl_divergence, 4), top1=round(q.top1_agreement, 4))


def child_imports() -> None:
    started = time.perf_counter()
    import compressed_tensors  # noqa: F401
    import onnx  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import llmopt.exporters.onnx_stream
    import llmopt.streaming  # noqa: F401
    _child_report(started)


def child_run_onnx(folder: Path) -> None:
    """Load the artifact in onnxruntime, prefill 8 tokens then decode 2 with the KV cache."""
    import numpy as np
    import onnxruntime as ort

    started = time.perf_counter()
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    loaded = time.perf_counter() - started
    # The cache's heads and width as the graph declares them (batch, kv heads, past length, head width).
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
            for i in session.get_inputs() if i.name.startswith("past_key_values")}
    wanted = {i.name for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    ids = np.arange(100, 110, dtype=np.int64)
    start, finite, shapes = 0, True, []
    for end in (8, 9, 10):
        feeds = {"input_ids": ids[None, start:end], "attention_mask": np.ones((1, end), np.int64),
                 "position_ids": np.arange(start, end)[None], **past}
        outputs = session.run(None, {k: v for k, v in feeds.items() if k in wanted})
        past = {n.replace("present", "past_key_values"): v for n, v in zip(names[1:], outputs[1:], strict=True)}
        finite &= bool(np.isfinite(outputs[0]).all())
        shapes.append(list(outputs[0].shape))
        start = end
    _child_report(started, load_s=loaded, finite=finite, logits_shapes=shapes)


def child_convert_demo(folder: Path) -> None:
    from llmopt.model import load_model, resolve_model

    started = time.perf_counter()
    model, tokenizer = load_model(resolve_model("demo"))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    _child_report(started)


# ---- parent ----

def run_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"child {args} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def safetensors_bytes(model: Path) -> int:
    return sum(p.stat().st_size for p in model.glob("*.safetensors"))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


METHOD_NAMES = {"rtn": "RTN", "gptq": "GPTQ", "signround": "SignRound"}


def stream_rows(title: str, model: Path, work: Path, args: argparse.Namespace) -> None:
    """Stream `model` to each format in a child; each row is printed as soon as it is measured."""
    size = safetensors_bytes(model)
    print(f"\n{title}: input checkpoint {size / GB:.2f} GB on disk")
    print(f"{'step':58s} {'peak RSS GB':>11s} {'/ input':>8s} {'wall s':>8s} {'output GB':>10s}", flush=True)
    method = ("AWQ + " if args.awq else "") + METHOD_NAMES[args.method]
    calibrated = args.method != "rtn" or args.awq
    if args.method == "signround":
        method += f", {args.iters} iterations"
    if calibrated:
        method += f" ({args.calibration_samples} x {args.calibration_len} tokens)"
    for fmt in args.formats:
        out = work / f"out-{fmt}"
        streamed = run_child("stream", str(model), str(out), fmt, str(args.group_size), args.method, str(int(args.awq)),
                             str(args.calibration_samples), str(args.calibration_len), str(int(not args.no_validate)),
                             str(args.iters))
        print_row(f"stream int4 {method} g{args.group_size} -> {fmt}", size, streamed, title=title)
        if fmt == "onnx" and not args.skip_onnx_check:
            print_row("onnxruntime: load the ONNX artifact, prefill 8 + decode 2", size, run_child("run-onnx", str(out)),
                      title=title)
        shutil.rmtree(out)


MARKDOWN_ROWS: list[str] = []  # with --markdown, the rows again as one table for docs/benchmarks.md


def evaluated_rows(model: Path, args: argparse.Namespace) -> None:
    """The pipeline's run of the same quantize pass, streamed and in memory, both evaluated on the same windows."""
    size = safetensors_bytes(model)
    title = "SmolLM2-135M through llmopt.optimize, evaluated"
    print(f"\n{title}")
    method = ("AWQ + " if args.awq else "") + METHOD_NAMES[args.method]
    for fmt in args.formats:
        for streaming in (True, False):
            out = args.dir / f"optimized-{fmt}"
            result = run_child("optimize", str(model), str(out), fmt, args.method, str(int(args.awq)),
                               str(int(streaming)), str(args.iters))
            print_row(f"{'streamed' if streaming else 'in memory'}: int4 {method} g32 -> {fmt}, evaluated", size,
                      result, title=title)
            shutil.rmtree(out)


def print_row(label: str, model_bytes: int, r: dict, title: str = "") -> None:
    """One measured step, printed at once (and kept for --markdown)."""
    out = r.get("weights_bytes")
    quality = (f"{r['baseline_perplexity']:.2f} → {r['perplexity']:.2f} ({r['increase_pct']:+.1f}% "
               f"[{r['interval'][0]:.1f}, {r['interval'][1]:.1f}]), KL {r['kl']}, top-1 {r['top1']:.1%}"
               if "perplexity" in r else "")
    MARKDOWN_ROWS.append(f"| {title} | {label} | {model_bytes / GB:.2f} | {r['peak_rss_bytes'] / GB:.2f} | "
                         f"{r['wall_s']:.0f} | {f'{out / GB:.2f}' if out else ''} | "
                         f"{'yes' if r.get('validated') else 'no' if r.get('validated') is False else ''} | {quality} |")
    print(f"{label:58s} {r['peak_rss_bytes'] / GB:11.2f} {r['peak_rss_bytes'] / model_bytes:8.3f} "
          f"{r['wall_s']:8.1f} {(f'{out / GB:.2f}' if out else ''):>10s}")
    extra = {k: v for k, v in r.items() if k not in ("peak_rss_bytes", "wall_s", "weights_bytes")}
    if extra:
        print(f"{'':58s} {extra}")
    print(f"{'':58s} load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, args = sys.argv[2], sys.argv[3:]
        if kind == "generate":
            child_generate(Path(args[0]), int(args[1]), int(args[2]), int(args[3]), args[4])
        elif kind == "stream":
            child_stream(Path(args[0]), Path(args[1]), args[2], int(args[3]), args[4], args[5] == "1", int(args[6]),
                         int(args[7]), args[8] == "1", int(args[9]))
        elif kind == "optimize":
            child_optimize(Path(args[0]), Path(args[1]), args[2], args[3], args[4] == "1", args[5] == "1", int(args[6]))
        elif kind == "imports":
            child_imports()
        elif kind == "run-onnx":
            child_run_onnx(Path(args[0]))
        elif kind == "convert-demo":
            child_convert_demo(Path(args[0]))
        return

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path.home() / ".cache/llmopt-bench/scale")
    parser.add_argument("--kv-heads", type=int, default=32, help="32: Llama-2-7B; 8: grouped-query attention")
    parser.add_argument("--layers", type=int, default=32, help="fewer: the same layer shapes, to show the peak does "
                                                                "not grow with depth")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--method", choices=["rtn", "gptq", "signround"], default="rtn")
    parser.add_argument("--iters", type=int, default=200, help="signround: tuning steps per layer and for lm_head "
                        "(the peak does not depend on them; the time is about proportional)")
    parser.add_argument("--awq", action="store_true", help="AWQ scaling first (calibrated, as gptq)")
    parser.add_argument("--calibration-samples", type=int, default=32, help="gptq / awq: windows (random token ids)")
    parser.add_argument("--calibration-len", type=int, default=256, help="gptq / awq: tokens per window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    parser.add_argument("--skip-7b", action="store_true")
    parser.add_argument("--families", nargs="+", default=["llama"], metavar="MODEL_TYPE",
                        help="the 7B-shaped checkpoints' families (llmopt's described model types), or 'all'")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--skip-onnx-check", action="store_true")
    parser.add_argument("--no-validate", action="store_true", help="stream without the artifact check (its "
                                                                    "reference layer by layer, then the artifact "
                                                                    "loaded), to see what the check costs")
    parser.add_argument("--evaluate", action="store_true", help="also run SmolLM2 through llmopt.optimize, streamed "
                                                                  "and in memory, evaluated (perplexity side by side)")
    parser.add_argument("--markdown", action="store_true", help="at the end, every row again as one markdown table "
                                                                  "(what docs/benchmarks.md holds)")
    parser.add_argument("--formats", nargs="+", choices=["onnx", "safetensors"], default=["onnx", "safetensors"])
    args = parser.parse_args()
    if args.families == ["all"]:
        from llmopt.architectures import ARCHITECTURES

        args.families = sorted(ARCHITECTURES)

    import psutil

    memory = psutil.virtual_memory().total
    print(f"machine: {memory / GB:.1f} GB RAM, {os.cpu_count()} CPUs; work folder {args.dir}")
    args.dir.mkdir(parents=True, exist_ok=True)
    imports = run_child("imports")
    print(f"fixed cost (a child importing python, torch, transformers, onnx, llmopt): "
          f"peak RSS {imports['peak_rss_bytes'] / GB:.2f} GB", flush=True)

    if not args.skip_smollm2:
        demo = args.dir / "smollm2-f32"
        if not demo.exists():
            run_child("convert-demo", str(demo))
        stream_rows("SmolLM2-135M (demo, float32 safetensors)", demo, args.dir, args)
        if args.evaluate:
            evaluated_rows(demo, args)
        shutil.rmtree(demo)

    try:
        stream_7b(args, memory)
    finally:
        if args.markdown and MARKDOWN_ROWS:
            print("\n| input | step | input GB | peak RSS GB | wall s | output GB | validated | quality |\n"
                  "|---|---|---|---|---|---|---|---|")
            print("\n".join(MARKDOWN_ROWS))


def stream_7b(args: argparse.Namespace, memory: int) -> None:
    if args.skip_7b:
        return
    for family in args.families:
        model = args.dir / f"{family}-7b-shaped-kv{args.kv_heads}-{args.layers}layers"
        shapes = checkpoint_shapes(family_config(family, args.kv_heads, args.layers), args.dir / f"{family}.config")
        planned = 4 * sum(math.prod(shape) for shape in shapes.values())
        outputs = planned // 5  # int4 + scales + the float embedding: under a fifth of float32
        free = shutil.disk_usage(args.dir).free
        if not model.exists() and free < planned + outputs + 5 * GB:
            sys.exit(f"not enough disk in {args.dir}: {free / GB:.1f} GB free, {(planned + outputs) / GB:.1f} GB "
                     "needed (checkpoint + one artifact at a time) plus 5 GB to spare")
        try:
            if not model.exists():
                gen = run_child("generate", str(model), str(args.kv_heads), str(args.seed), str(args.layers), family)
                print(f"\ngenerated {model.name}: {gen['bytes'] / GB:.2f} GB in {gen['wall_s']:.0f} s, "
                      f"peak RSS {gen['peak_rss_bytes'] / GB:.2f} GB", flush=True)
            size = folder_bytes(model)
            print(f"checkpoint {size / GB:.2f} GB vs {memory / GB:.1f} GB RAM: "
                  f"{'larger' if size > memory else 'NOT larger'} than memory", flush=True)
            stream_rows(f"7B-shaped {family} ({args.layers} layers, kv heads {args.kv_heads}, float32, random)", model,
                        args.dir, args)
        finally:
            for folder in (model, model.with_name(model.name + ".partial")):
                if folder.exists() and (not args.keep or folder != model):
                    shutil.rmtree(folder)
                    print(f"deleted {folder}")

if __name__ == "__main__":
    main()
