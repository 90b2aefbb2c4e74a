"""Benchmark: weight quantization of SmolLM2-135M-Instruct to ONNX, llmopt against its peers, side by side.

    python benchmarks/quantization.py [--model demo] [--eval-tokens 4096] [--window 256] [--samples 32]
                                      [--qad-steps 200] [--qad-samples 128] [--threads 2] [--out DIR]
                                      [--peers] [--only LABEL ...]

Rows: llmopt's quantizers (RTN, GPTQ, AWQ + GPTQ; int4 and int8), each run through llmopt's Python API with
evaluation off, the fuse pass after it, and exported to ONNX (MatMulNBits, accuracy_level 4); onnxruntime-genai's model builder (its
own venv, see peers.py) at int4 (default symmetric RTN, asymmetric, k_quant) and int8; onnxruntime's dynamic
int8 quantization of optimum's fp32 export; and two fp32 references (optimum's export, the builder's fp32).
With --peers: llm-compressor (GPTQ, AWQ + GPTQ) and Intel's AutoRound (benchmarks/quant_peers.py), their integers
written by llmopt's exporter, and llmopt's quantizers with their coverage; AutoRound also at the builder's coverage
(lm_head and the tied embedding by llmopt's RTN, which AutoRound refuses to quantize when tied).

Every artifact is measured here by the same code, on the same onnxruntime, in this process: size on disk,
perplexity and KL / top-1 agreement against the float32 PyTorch model on the same evaluation windows (llmopt's
compare_quality), decode tokens/s and prefill latency at batch 1 (llmopt's measure_speed; speed rounds
alternate between the artifacts, so drift on a shared machine spreads over all rows). optimum-format folders
run in llmopt's own OrtRunner, builder folders in peers.GenaiRunner: both the same plain numpy loop over
InferenceSession (evaluation/runners.py PlainOnnxLoop), so the speed columns compare the graphs, not harnesses. The fp32 rows must
reproduce PyTorch in both runners (logits and greedy tokens; the script stops otherwise).

Calibration (GPTQ, AWQ) draws from the built-in text after the evaluation tokens, so the two never overlap.
Coverage is the builder's: every Linear including lm_head, and the token embedding (tied to lm_head). CPU
budget: about 25 minutes on 2 cores (AWQ + GPTQ is a third of it) plus the QAD row (about an hour at 200 steps),
and a one-time peer venv (~2 minutes).
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import peers
import quant_peers


def quantize(**fields) -> dict:
    """A `type: quantize` pass over the builder's coverage (all Linears + the tied embedding)."""
    return {"type": "quantize", "embeddings": True, **fields}


# The fuse pass after every llmopt quantizer, as the shipped int4-fused-onnx recipe: fused attention, norms and
# rotary, Q/K/V and gate/up packed into one MatMulNBits each — the graph the builder emits.
FUSE = {"type": "fuse"}

# llmopt rows: (label, the recipe's passes); each runs through llmopt.optimize with the export settings of
# `llmopt_recipe` below.
LLMOPT_ROWS: list[tuple[str, list[dict]]] = [
    ("llmopt int4 RTN, symmetric", [quantize(method="rtn", bits=4, symmetric=True), FUSE]),
    ("llmopt int4 RTN, asymmetric", [quantize(method="rtn", bits=4, symmetric=False), FUSE]),
    ("llmopt int4 GPTQ, symmetric", [quantize(method="gptq", bits=4, symmetric=True), FUSE]),
    ("llmopt int4 AWQ + GPTQ, symmetric", [quantize(method="gptq", awq=True, bits=4, symmetric=True), FUSE]),
    ("llmopt int4 AWQ + GPTQ, asymmetric", [quantize(method="gptq", awq=True, bits=4, symmetric=False), FUSE]),
    ("llmopt int4 SignRound, symmetric, 200 iterations", [quantize(method="signround", bits=4, symmetric=True), FUSE]),
    ("llmopt int8 RTN, symmetric", [quantize(method="rtn", bits=8, symmetric=True), FUSE]),
    ("llmopt W8A8, SmoothQuant (dynamic int8 activations)",
     [quantize(bits=8, activations="int8", smoothquant=True), FUSE]),
    ("llmopt int4/int8 mixed RTN, symmetric, 6.0 bits/weight",
     [quantize(method="rtn", bits=4, symmetric=True, target_bits_per_weight=6.0), FUSE]),
    # The int4-qad-onnx recipe: AWQ + GPTQ, then the group scales trained against the fp32 model (steps from
    # --qad-steps), on --qad-samples calibration windows (GPTQ's Hessians too).
    ("llmopt int4 AWQ + GPTQ + QAD scales, symmetric",
     [quantize(method="gptq", awq=True, bits=4, symmetric=True),
      {"type": "qad", "train": "scales", "batch_size": 4, "lr": 2e-3, "eval_every": 25}, FUSE]),
]

# Peer quantizers (--peers; benchmarks/quant_peers.py, each in its own venv): (label, kind, settings, builder's
# coverage). They run on llmopt's own calibration windows (the same seed, text and tokenizer as the llmopt rows);
# their integers are written by llmopt's ONNX exporter with the fuse pass's packing, so these rows differ from
# llmopt's only in the integers chosen. Both leave lm_head and the tied embedding float (their own coverage;
# AutoRound refuses to quantize a tied lm_head), so they are larger than the rows above: the like-for-like llmopt
# rows are PEER_COVERAGE_ROWS. A row with the builder's coverage adds llmopt's RTN of lm_head and the tied
# embedding to the peer's integers (the same peer run as its peers'-coverage row, run once), to compare at the
# builder's size.
PEER_ROWS: list[tuple[str, str, dict, bool]] = [
    ("llm-compressor GPTQ W4A16, symmetric", "llmcompressor", {"method": "gptq"}, False),
    ("llm-compressor AWQ + GPTQ W4A16, symmetric", "llmcompressor", {"method": "awq+gptq"}, False),
    ("AutoRound W4, symmetric, 200 iterations (its default)", "autoround", {"iters": 200}, False),
    ("AutoRound W4, symmetric, 200 iterations, lm_head and embedding RTN (the builder's coverage)", "autoround",
     {"iters": 200}, True),
    ("AutoRound W4, symmetric, 1000 iterations", "autoround", {"iters": 1000}, False),
    ("AutoRound W4, symmetric, 1000 iterations, lm_head and embedding RTN (the builder's coverage)", "autoround",
     {"iters": 1000}, True),
]
PEERS_COVERAGE = {"embeddings": False, "exclude": ["lm_head"]}
PEER_COVERAGE_ROWS: list[tuple[str, list[dict]]] = [
    ("llmopt int4 GPTQ, symmetric, lm_head and embedding float (the peers' coverage)",
     [quantize(method="gptq", bits=4, symmetric=True, **PEERS_COVERAGE), FUSE]),
    ("llmopt int4 AWQ + GPTQ, symmetric, lm_head and embedding float (the peers' coverage)",
     [quantize(method="gptq", awq=True, bits=4, symmetric=True, **PEERS_COVERAGE), FUSE]),
    ("llmopt int4 SignRound, symmetric, 200 iterations, lm_head and embedding float (the peers' coverage)",
     [quantize(method="signround", bits=4, symmetric=True, **PEERS_COVERAGE), FUSE]),
]

# onnxruntime-genai builder rows: (label, precision, --extra_options, fallback options when the first build's
# model does not load). Block size comes from --group-size.
BUILDER_ROWS: list[tuple[str, str, dict, dict | None]] = [
    ("builder int4 RTN, symmetric (default)", "int4", {}, None),
    # Its asymmetric int4 with the embedding shared with lm_head writes a graph onnxruntime rejects (1.31, 1.32:
    # a uint8 Reshape feeding a float Gather); the fallback keeps the embedding in float.
    ("builder int4 RTN, asymmetric", "int4", {"is_symmetric": False}, {"shared_embeddings": False}),
    ("builder int4 k_quant", "int4", {"algo_config": "k_quant"}, None),
    ("builder int8, symmetric (default)", "int8", {}, None),
]

FP32_MAX_ABS_LOGIT_DIFF = 1e-2  # an fp32 artifact against PyTorch fp32; both measured at ~1e-4
FP32_MIN_TOP1 = 0.99


@dataclass
class Row:
    label: str
    folder: Path | None = None
    seconds: float | None = None  # time to produce the artifact
    size_mb: float | None = None
    quality: object = None  # llmopt.evaluation.quality.QualityScores
    prefill_ms: list[float] = field(default_factory=list)
    decode_tps: list[float] = field(default_factory=list)
    runner: object = None  # llmopt's OrtRunner (optimum format) or peers.GenaiRunner (builder format)
    note: str = ""


class StepTimes:
    """llmopt's Progress protocol, keeping each step's seconds (artifact time = load + passes + export)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def step(self, name: str, total: int | None = None) -> None: ...
    def advance(self, done: int, total: int) -> None: ...

    def done(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def artifact_seconds(self) -> float:
        # The pipeline also exports an fp32 baseline and validates the artifact; neither makes the artifact.
        return sum(s for name, s in self.seconds.items() if name in ("load model", "export onnx")
                   or name.startswith("pass "))


def llmopt_recipe(model_dir: Path, passes: list[dict], calibration_txt: Path, args) -> dict:
    samples = args.samples
    if any(p["type"] == "qad" for p in passes):
        passes = [{**p, "steps": args.qad_steps} if p["type"] == "qad" else p for p in passes]
        samples = args.qad_samples
    return {
        "model": str(model_dir),
        "seed": 0,
        "passes": passes,
        # accuracy_level 4 (int8 activations inside MatMulNBits) as the builder's CPU default, so kernels match.
        # It moves logits by 1-3 against the fp32-compute PyTorch model, and on 3 short prompts top-1 agreement
        # has fallen to 0.89 (AWQ + GPTQ symmetric) with no error in the weights; the export check here only
        # guards against gross mismatches (as the W8A8 / mixed recipes do): the quality columns are measured
        # on the artifact itself.
        "export": {"format": "onnx", "accuracy_level": 4,
                   "validate": {"prompts": 3, "min_top1_agreement": 0.8, "max_abs_logit_diff": 10.0}},
        "calibration": {"data": str(calibration_txt), "samples": samples, "seq_len": args.seq_len},
        "evaluation": {"enabled": False},  # measured by this script, the same way for every row
    }


def calibration_text(tokenizer, text: str, skip_tokens: int, path: Path) -> Path:
    """The text after its first `skip_tokens` tokens, as a .txt file a recipe's calibration.data can name."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text[offsets[skip_tokens - 1][1]:], encoding="utf-8")
    return path


def check_fp32(row: Row, reference, window) -> None:
    """Stop when an fp32 artifact does not reproduce PyTorch in its runner: its figures would mean nothing.
    Logits over a window and greedy decoding with the KV cache are both checked."""
    import numpy as np

    theirs = reference.logits(window)
    prompt = window[:32]
    expected = reference.generate(prompt, 16)
    runner = row.runner
    ours = runner.logits(window)
    diff = float(np.abs(ours - theirs).max())
    top1 = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
    same = bool((runner.generate(prompt, 16) == expected).all())
    print(f"  {row.label} vs PyTorch fp32 on {len(window)} tokens: max |Δlogit| {diff:.2e}, "
          f"top-1 {top1:.1%}; 16 greedy tokens with the KV cache identical: {same}", flush=True)
    if diff > FP32_MAX_ABS_LOGIT_DIFF or top1 < FP32_MIN_TOP1 or not same:
        raise SystemExit(f"{row.label}: the fp32 artifact does not match PyTorch fp32 (max |Δlogit| "
                         f"{diff:.3g}, limit {FP32_MAX_ABS_LOGIT_DIFF}; top-1 {top1:.3f}, minimum "
                         f"{FP32_MIN_TOP1}; greedy tokens identical: {same}): the runner is wrong.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--samples", type=int, default=32, help="calibration windows (GPTQ, AWQ)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    parser.add_argument("--qad-steps", type=int, default=200, help="qad row: training steps of 4 windows")
    parser.add_argument("--qad-samples", type=int, default=128, help="qad row: calibration and training windows")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--speed-rounds", type=int, default=3)
    parser.add_argument("--out", default=str(peers.CACHE / "quantization"), help="artifacts (kept for inspection)")
    parser.add_argument("--peers", action="store_true",
                        help="add AutoRound and llm-compressor (own venvs; hours on a small CPU: AutoRound tunes every "
                             "layer by gradient descent) and llmopt's row with their coverage")
    parser.add_argument("--only", nargs="+", default=None,
                        help="run only rows whose label contains one of these strings, or ends with one ending "
                             "in $ (fp32 references always run)")
    args = parser.parse_args()

    import llmopt
    import torch
    from llmopt.evaluation.quality import compare_quality, token_windows
    from llmopt.evaluation.runners import CachedRunner, TorchRunner
    from llmopt.evaluation.speed import measure_speed
    from llmopt.evaluation.text import builtin_text
    from llmopt.recipe import parse_recipe
    from llmopt.model import load_tokenizer, resolve_model
    from transformers import AutoModelForCausalLM

    def wanted(label: str) -> bool:
        return args.only is None or any(label.endswith(s[:-1]) if s.endswith("$") else s in label for s in args.only)

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    versions = peers.peer_versions()  # creates the peer venv on first use (not counted in any row)
    hf_dir = peers.demo_hf_folder(args.model) if args.model == "demo" else Path(args.model)
    # llmopt's own tokenizer of the model, so the windows are those `llmopt optimize` evaluates: transformers 5.25
    # reloads the saved folder's tokenizer with a leading BOS that the GGUF's does not add (perplexity 20.14
    # instead of 18.96 for the same weights).
    tokenizer = load_tokenizer(resolve_model(args.model))
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, use_safetensors=True).eval()
    text = builtin_text()
    windows = token_windows(tokenizer, text, args.eval_tokens, args.window)
    calibration_txt = calibration_text(tokenizer, text, args.eval_tokens, out / "calibration.txt")
    prompt = windows[0][:args.prompt_tokens]
    reference = CachedRunner(TorchRunner(model, args.threads))
    print(f"setup {time.perf_counter() - started:.0f} s; reference logits on {len(windows)} windows ...", flush=True)
    for ids in windows:
        reference.logits(ids)

    rows: list[Row] = []

    def measure(row: Row) -> None:
        row.size_mb = peers.folder_mb(row.folder)
        row.runner = peers.load_onnx_runner(row.folder, args.threads)
        row.quality = compare_quality(reference, row.runner, windows)
        print(f"  {row.label}: {row.size_mb:.1f} MB, perplexity {row.quality.perplexity:.2f}, "
              f"top-1 {row.quality.top1_agreement:.1%}, made in {row.seconds:.0f} s", flush=True)

    def attempt(label: str, make, always: bool = False) -> None:
        """Build and measure one row; a failure is recorded in the table, the other rows go on."""
        if not (always or wanted(label)):
            return
        row = Row(label)
        print(f"{label} ...", flush=True)
        try:
            make(row)
            measure(row)
        except Exception as exc:  # noqa: BLE001  (a failing peer or recipe is a finding: the other rows go on)
            traceback.print_exc()
            row.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            row.runner = None
        rows.append(row)

    # fp32 references
    def optimum_fp32(row: Row) -> None:
        row.folder = out / slug(row.label)
        row.seconds = peers.export_optimum_fp32(hf_dir, row.folder)

    def builder_fp32(row: Row) -> None:
        row.folder = out / slug(row.label)
        row.seconds = peers.build_with_genai_builder(hf_dir, row.folder, "fp32")

    attempt("optimum fp32 (reference)", optimum_fp32, always=True)
    attempt("builder fp32", builder_fp32, always=True)
    for row in rows:
        if row.runner is None:
            raise SystemExit(f"{row.label} failed ({row.note}); the fp32 references are needed.")
        check_fp32(row, reference, windows[0])

    # llmopt
    for label, passes in LLMOPT_ROWS + (PEER_COVERAGE_ROWS if args.peers else []):
        def run_llmopt(row: Row, passes=passes) -> None:
            row.folder = out / slug(row.label)
            recipe = parse_recipe(_yaml(llmopt_recipe(hf_dir, passes, calibration_txt, args)), where=row.label)
            steps = StepTimes()
            llmopt.optimize(recipe, output=row.folder, force=True, progress=steps)
            row.seconds = steps.artifact_seconds()

        attempt(label, run_llmopt)

    # onnxruntime-genai's builder
    for label, precision, options, fallback in BUILDER_ROWS:
        def run_builder(row: Row, precision=precision, options=options, fallback=fallback) -> None:
            row.folder = out / slug(row.label)
            settings = {"block_size": args.group_size, **options}
            row.seconds = peers.build_with_genai_builder(hf_dir, row.folder, precision, settings)
            try:
                peers.GenaiRunner(row.folder, args.threads)
            except Exception as exc:
                if fallback is None:
                    raise
                problem = str(exc).splitlines()[0][:160]
                settings.update(fallback)
                row.seconds = peers.build_with_genai_builder(hf_dir, row.folder, precision, settings)
                extra = " ".join(f"{k}={v}" for k, v in fallback.items())
                row.note = f"with {extra}: the default build does not load ({problem})"
                row.label += f" [{extra}]"

        attempt(label, run_builder)

    # AutoRound and llm-compressor
    peer_runs: dict[str, tuple[Path, dict]] = {}  # one run per peer and settings, shared by its rows
    for label, kind, settings, builder_coverage in PEER_ROWS if args.peers else []:
        def run_peer(row: Row, kind=kind, settings=settings, builder_coverage=builder_coverage) -> None:
            row.folder = out / slug(row.label)
            key = f"{kind} {sorted(settings.items())}"
            if key not in peer_runs:
                work = out / (slug(row.label) + "-peer")
                windows_in = peer_calibration(hf_dir, calibration_txt, args)
                peer_runs[key] = work, quant_peers.quantize_with_peer(kind, hf_dir, windows_in, work,
                                                                      threads=args.threads, **settings)
            work, result = peer_runs[key]
            rtn_rest = args.group_size if builder_coverage else None
            row.seconds = result["seconds"] + export_peer(hf_dir, work, row.folder, rtn_rest)
            rest = "lm_head and the tied embedding by llmopt's RTN" if builder_coverage else (
                f"float: {', '.join(result['float_linears']) or 'none'} and the embedding")
            row.note = (f"{kind} {result['version']}, {len(result['quantized'])} Linears quantized, {rest}; "
                        f"artifact s: its quantization on the loaded model + llmopt's ONNX export")

        attempt(label, run_peer)

    # onnxruntime's dynamic int8 of optimum's fp32 export: its defaults, and reduce_range (see peers.py)
    for label, reduce_range in (("ORT dynamic int8, per channel, reduce_range", True),
                                ("ORT dynamic int8, per channel, defaults", False)):
        def ort_dynamic(row: Row, reduce_range=reduce_range) -> None:
            row.folder = out / slug(row.label)
            row.seconds = peers.ort_dynamic_int8(out / slug("optimum fp32 (reference)"), row.folder,
                                                 reduce_range=reduce_range)
            row.note = "artifact s: quantize_dynamic of the optimum fp32 export (export time not included)"

        attempt(label, ort_dynamic)

    # Speed: rounds alternate between all artifacts, one run each per round.
    measured = [row for row in rows if row.runner is not None]
    for round_index in range(args.speed_rounds):
        print(f"speed round {round_index + 1}/{args.speed_rounds} ...", flush=True)
        for row in measured:
            s = measure_speed(row.runner, prompt, args.new_tokens, runs=1)
            row.prefill_ms.append(s.prefill_ms)
            row.decode_tps.append(s.decode_tokens_per_s)

    print_table(rows, args, versions, time.perf_counter() - started)


def peer_calibration(hf_dir: Path, calibration_txt: Path, args) -> list:
    """The calibration windows the llmopt rows get (llmopt.optimize with the model's folder, seed 0)."""
    from llmopt.evaluation.calibration import calibration_batches
    from llmopt.model import load_tokenizer, resolve_model

    windows, _ = calibration_batches(load_tokenizer(resolve_model(str(hf_dir))), data=str(calibration_txt),
                                     text_field="text", samples=args.samples, seq_len=args.seq_len, seed=0)
    return windows


def export_peer(hf_dir: Path, work: Path, folder: Path, rtn_rest: int | None = None) -> float:
    """Write a peer's integers as llmopt's fused ONNX (the llmopt rows' export settings); returns the seconds.
    `rtn_rest`: a group size to quantize lm_head and the tied embedding with llmopt's symmetric RTN first (the
    builder's coverage), else they stay float."""
    import shutil

    from llmopt.architectures import LAYERS
    from llmopt.exporters.onnx import OnnxExporter
    from llmopt.passes.quantize import QuantizeConfig, QuantizePass
    from llmopt.recipe import ExportConfig
    from llmopt.state import PassContext

    started = time.perf_counter()
    state = quant_peers.load_peer_state(hf_dir, work)
    if rtn_rest is not None:
        config = QuantizeConfig(method="rtn", bits=4, group_size=rtn_rest, symmetric=True, embeddings=True,
                                exclude=[f"{LAYERS}.*"])
        state = QuantizePass(config).run(state, PassContext())
    state.graph_fusions = {"pack_projections": True}  # what the fuse pass sets
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    OnnxExporter(ExportConfig(format="onnx", accuracy_level=4)).export(state, folder)
    return time.perf_counter() - started


def slug(label: str) -> str:
    """A folder name for a row's artifact."""
    return "-".join("".join(c if c.isalnum() else " " for c in label.replace("+", " plus ")).split()).lower()


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def print_table(rows: list[Row], args, versions: dict[str, str], total_s: float) -> None:
    import onnxruntime
    from llmopt.devices import cpu_name

    done = [r for r in rows if r.quality is not None]
    q0 = done[0].quality if done else None
    print(f"\nSmolLM2-135M-Instruct ({args.model}) on {cpu_name()}, onnxruntime {onnxruntime.__version__} CPU, "
          f"{args.threads} threads, batch 1. Quality: {q0.tokens if q0 else '?'} tokens of the built-in text in "
          f"windows of {args.window}, against PyTorch fp32 (perplexity "
          f"{q0.baseline_perplexity:.2f}); speed: prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
          f"median of {args.speed_rounds} alternating rounds, in one plain numpy + InferenceSession loop for every "
          f"row (llmopt's OrtRunner for optimum-format rows, peers.GenaiRunner for the builder's). int4/int8 groups of {args.group_size}; llmopt "
          f"calibration {args.samples} × {args.seq_len} tokens after the evaluation text. Builder: onnxruntime-genai "
          f"{versions['onnxruntime-genai']} (transformers {versions['transformers']}).\n")
    header = ("artifact", "size MB", "perplexity", "vs fp32 [95% CI]", "KL", "top-1", "decode tok/s", "prefill ms",
              "artifact s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        if r.quality is None:
            print(f"| {r.label} |" + " |" * (len(header) - 1) + f" ({r.note})")
            continue
        q = r.quality
        low, high = (q.intervals or {}).get("perplexity_increase_pct", (float("nan"), float("nan")))
        increase = (q.perplexity / q.baseline_perplexity - 1) * 100
        speed = [f"{statistics.median(values):.{digits}f}" if values else ""
                 for values, digits in ((r.decode_tps, 1), (r.prefill_ms, 0))]
        print(f"| {r.label} | {r.size_mb:.1f} | {q.perplexity:.2f} | {increase:+.1f}% [{low:+.1f}, {high:+.1f}] | "
              f"{q.kl_divergence:.3f} | {q.top1_agreement:.1%} | {' | '.join(speed)} | {r.seconds:.0f} |")
    notes = [f"{r.label}: {r.note}" for r in rows if r.note]
    if notes:
        print("\n" + "\n".join(f"- {n}" for n in notes))
    print(f"\ntotal {total_s:.0f} s")


if __name__ == "__main__":
    main()
