"""Operator fusion on the demo model: optimum's fp32 export vs llmopt's fused fp32 and int4, and
onnxruntime-genai's model builder fp32 and int4, side by side in one run.

    python benchmarks/fusion.py [--threads 2] [--rounds 5] [--prompt-tokens 64] [--new-tokens 32] [--profile]
                                [--growing-cache] [--genai] [--reuse [--add LABEL=FOLDER ...] [--versus LABEL ...]]

Every artifact is driven by the same plain onnxruntime loop (peers.plain_onnx_runner: InferenceSession and
numpy, CPU EP; not transformers' generate(), whose per-step cost would hide the graphs' differences) and
timed by llmopt's own measure_speed (prefill of one prompt at batch 1, greedy decode with the KV cache).
Graphs whose genai_config.json says past_present_share_buffer (the builder's, llmopt's fused ones) get one
KV buffer per layer that GroupQueryAttention updates in place, as onnxruntime-genai runs them; optimum's graph
takes the cache one step longer each time, the only way it can run. `--growing-cache` times the in-place rows
that way too, and `--genai` runs them in onnxruntime-genai's own Generator (the peer venv) as well;
`--reuse` measures the folders of an earlier run without building them again, and `--add LABEL=FOLDER` more
folders beside them. The models take turns, one
measurement each per round, and the median over rounds is printed, so load from other processes on the
machine falls on all rows alike. int4 on both sides: symmetric RTN, blocks of 32, accuracy_level 4
(the builder's CPU default); the "unpacked" row is llmopt's int4 graph with Q/K/V and gate/up left as
separate matmuls (`fuse: {pack_projections: false}`), to show what packing adds. The last column is each artifact's largest logit difference from optimum's
fp32 export on the validation prompts (same weights for the fp32 rows, quantization error for int4).
After the table: each int4 row's prefill time against the builder int4's, paired round by round; the
machine's read bandwidth; and "fp32 matmuls alone", a graph of nothing but the model's matmuls, timed with each
fp32 kernel onnxruntime has for them, which bounds how fast any fp32 graph of it can decode in onnxruntime here.
"""

from __future__ import annotations

import argparse
import copy
import gc
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import (  # noqa: E402  (the benchmarks folder is not a package)
    CACHE,
    build_with_genai_builder,
    demo_hf_folder,
    export_optimum_fp32,
    folder_mb,
    genai_decode,
    peer_versions,
    plain_onnx_runner,
)


def llmopt_export(model, tokenizer, out: Path, *, int4: bool, pack: bool = True) -> tuple[float, dict]:
    """llmopt's ONNX exporter with the fuse pass (and RTN int4 first when asked); returns time and info.
    ``pack``: Q/K/V and gate/up packed into one matmul each (the fuse pass's default)."""
    from llmopt.exporters.onnx import OnnxExporter
    from llmopt.passes.fuse import FuseConfig, FusePass
    from llmopt.passes.quantize import QuantizeConfig, QuantizePass
    from llmopt.recipe import ExportConfig
    from llmopt.state import ModelState, PassContext

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    state = ModelState(model, tokenizer)
    if int4:
        config = QuantizeConfig(bits=4, group_size=32, symmetric=True, embeddings=True)
        state = QuantizePass(config).run(state, PassContext())
    state = FusePass(FuseConfig(pack_projections=pack)).run(state, PassContext())
    result = OnnxExporter(ExportConfig(accuracy_level=4 if int4 else 0)).export(state, out)
    return time.perf_counter() - start, result.info


def logit_gap(reference, runner, tokenizer) -> float:
    from llmopt.evaluation.validate import PROMPTS

    worst = 0.0
    for prompt in PROMPTS[:3]:
        ids = np.asarray(tokenizer(prompt)["input_ids"], dtype=np.int64)
        worst = max(worst, float(np.abs(reference.logits(ids) - runner.logits(ids)).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--work", type=Path, default=CACHE / "fusion")
    parser.add_argument("--reuse", action="store_true", help="measure the artifacts of an earlier run as they are")
    parser.add_argument("--add", nargs="+", default=[], metavar="LABEL=FOLDER",
                        help="with --reuse: more ONNX folders to time in the same rounds (e.g. the quantization "
                             "benchmark's artifacts)")
    parser.add_argument("--versus", nargs="+", default=[], metavar="LABEL",
                        help="more rows to pair every row's decode speed with, each in a column of its own "
                             "(e.g. an --add label)")
    parser.add_argument("--growing-cache", action="store_true",
                        help="time every row whose KV cache is updated in place (a genai_config.json says so) a "
                             "second time with the cache that grows a step at a time, as ORTModelForCausalLM feeds it")
    parser.add_argument("--genai", action="store_true",
                        help="after the rounds, run every row that has a genai_config.json in onnxruntime-genai's own "
                             "Generator (the peer venv): its greedy tokens against this loop's, and its decode speed")
    parser.add_argument("--profile", action="store_true",
                        help="after the rounds, onnxruntime's profile of the fp32 rows' decode steps, by op type")
    args = parser.parse_args()
    bad = [item for item in args.add if "=" not in item]
    if bad:
        parser.error(f"--add takes LABEL=FOLDER, got {bad[0]!r}")
    labels = {*FOLDERS, *(item.split("=", 1)[0] for item in args.add)}
    unknown = [label for label in args.versus if label not in labels]
    if unknown:
        parser.error(f"--versus {unknown[0]!r} is not a row; rows: {', '.join(sorted(labels))}")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = demo_hf_folder()
    work = args.work
    folders: dict[str, Path] = {}
    build_s: dict[str, float] = {}
    notes: list[str] = []

    if args.reuse:
        extra = dict(item.split("=", 1) for item in args.add)
        return measure(args, {**{name: work / sub for name, sub in FOLDERS.items()},
                              **{label: Path(folder).expanduser() for label, folder in extra.items()}}, {}, [])
    folders["optimum fp32 (unfused)"] = work / "optimum-fp32"
    shutil.rmtree(folders["optimum fp32 (unfused)"], ignore_errors=True)
    build_s["optimum fp32 (unfused)"] = export_optimum_fp32(hf, folders["optimum fp32 (unfused)"])

    tokenizer = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, use_safetensors=True).eval()
    for name, int4, pack in (("llmopt fp32 fused", False, True), ("llmopt int4 fused", True, True),
                             ("llmopt int4 fused, unpacked", True, False)):
        folders[name] = work / FOLDERS[name]
        seconds, info = llmopt_export(copy.deepcopy(model) if int4 else model, tokenizer, folders[name], int4=int4,
                                      pack=pack)
        build_s[name] = seconds
        notes.append(f"{name}: fused ops {info.get('fused_ops')}, graph nodes {info.get('graph_nodes')}"
                     + (f", MatMulNBits {info['matmul_nbits']}, GatherBlockQuantized {info['gather_block_quantized']}"
                        if int4 else "") + f", packed {info.get('packed_projections')}")
    del model
    gc.collect()

    for name, precision in (("genai builder fp32", "fp32"), ("genai builder int4", "int4")):
        folders[name] = work / f"builder-{precision}"
        build_s[name] = build_with_genai_builder(hf, folders[name], precision)

    measure(args, folders, build_s, notes)


FOLDERS = {"optimum fp32 (unfused)": "optimum-fp32", "llmopt fp32 fused": "llmopt-fp32-fused",
           "llmopt int4 fused": "llmopt-int4-fused", "llmopt int4 fused, unpacked": "llmopt-int4-fused-unpacked",
           "genai builder fp32": "builder-fp32",
           "genai builder int4": "builder-int4"}


def measure(args, folders: dict[str, Path], build_s: dict[str, float], notes: list[str]) -> None:
    from transformers import AutoTokenizer

    from llmopt.evaluation.speed import measure_speed
    from llmopt.measure import speed_prompt

    tokenizer = AutoTokenizer.from_pretrained(folders["optimum fp32 (unfused)"])
    runners = {name: plain_onnx_runner(folder, threads=args.threads) for name, folder in folders.items()}
    if args.growing_cache:  # the same graphs with the cache as ORTModelForCausalLM feeds it
        for name in [name for name, runner in runners.items() if runner.share_buffer]:
            folders[f"{name}, growing cache"] = folders[name]
            runners[f"{name}, growing cache"] = plain_onnx_runner(folders[name], args.threads, share_buffer=False)
    reference = runners["optimum fp32 (unfused)"]
    gaps = {name: logit_gap(reference, runner, tokenizer) for name, runner in runners.items()}
    prompt = speed_prompt(tokenizer, args.prompt_tokens)
    decode: dict[str, list[float]] = {name: [] for name in runners}
    prefill: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            scores = measure_speed(runner, prompt, args.new_tokens, runs=1)
            decode[name].append(scores.decode_tokens_per_s)
            prefill[name].append(scores.prefill_ms)

    def paired(name: str, reference: str, series: dict[str, list[float]] = decode) -> str:
        """Median over rounds of this row's decode speed (or prefill ms) / the reference row's in the same round
        (load that drifts between rounds cancels out, unlike a ratio of medians), with a 95% bootstrap interval
        over rounds: an interval that holds 1.000× means the two rows are level within this machine's noise."""
        if reference not in series or name == reference:
            return "–"
        ratios = np.array([a / b for a, b in zip(series[name], series[reference])])
        resampled = np.random.default_rng(0).choice(ratios, (2000, len(ratios)))
        low, high = np.percentile(np.median(resampled, axis=1), [2.5, 97.5])
        return f"{np.median(ratios):.3f}× [{low:.3f}, {high:.3f}]"

    print(f"\nSmolLM2-135M-Instruct, onnxruntime CPU EP, {args.threads} threads, batch 1, prompt {len(prompt)} tokens, "
          f"{args.new_tokens} new tokens, median of {args.rounds} alternating rounds; ratios paired round by round\n")
    references = ["optimum fp32 (unfused)", "genai builder int4", *args.versus]
    print("| artifact | decode tok/s | " + " | ".join(f"vs {ref}" for ref in references) + " | prefill ms | size MB "
          "| weights read GB/s | max abs logit diff vs optimum fp32 | build s |")
    print("|---" * (len(references) + 7) + "|")
    for name in runners:
        d, p = statistics.median(decode[name]), statistics.median(prefill[name])
        spread = f"{min(decode[name]):.1f}–{max(decode[name]):.1f}"
        size = folder_mb(folders[name])
        print(f"| {name} | {d:.1f} ({spread}) | " + " | ".join(paired(name, ref) for ref in references)
              + f" | {p:.0f} | {size:.1f} | {size * d / 1000:.1f} "
              f"| {gaps[name]:.3g} | {build_s.get(name, float('nan')):.0f} |")
    int4_rows = [name for name in runners if "int4" in name and name != "genai builder int4"]
    if "genai builder int4" in prefill and int4_rows:
        print("\nPrefill time ÷ genai builder int4's, paired round by round (below 1.000× is faster): "
              + "; ".join(f"{name} {paired(name, 'genai builder int4', prefill)}" for name in int4_rows) + ".")
    bandwidth, gemv = read_bandwidth_gbs(args.threads)
    print(f"\nMemory read bandwidth of this machine, {args.threads} threads, 512 MB of float32, best of 5: "
          f"{bandwidth:.1f} GB/s for a plain sum, {gemv:.1f} GB/s for torch's fp32 matrix-vector product (a "
          "decode step's matmuls). Each decoded token reads every weight once (the tied embedding is the "
          "lm_head's matrix), so 'weights read GB/s' = size × decode tok/s, and no graph of a given size "
          "decodes faster than bandwidth / size.")
    if "optimum fp32 (unfused)" in folders:
        size, base = folder_mb(folders["optimum fp32 (unfused)"]), statistics.median(decode["optimum fp32 (unfused)"])
        print(f"fp32 ceilings here: {bandwidth * 1000 / size:.1f} tok/s ({bandwidth * 1000 / size / base:.2f}× optimum's "
              f"unfused fp32) at the sum's rate, {gemv * 1000 / size:.1f} tok/s ({gemv * 1000 / size / base:.2f}×) at "
              "the matrix-vector product's.")
        alone = matmuls_alone_ms(folders["optimum fp32 (unfused)"], args.threads)
        best_kernel, alone_ms = min(alone.items(), key=lambda item: item[1])
        print(f"fp32 matmuls alone (a graph of nothing but the model's matmuls, same shapes, one decode step), "
              "median ms by kernel: " + ", ".join(f"{kernel} {ms:.1f}" for kernel, ms in alone.items())
              + f". At the fastest, no fp32 graph of this model decodes faster than {1000 / alone_ms:.1f} tok/s "
              f"({1000 / alone_ms / base:.2f}× optimum's unfused fp32) in this runtime ({best_kernel}).")
    if args.genai:
        print_genai_rows(args, folders, runners, prompt)
    if args.profile:
        for name in runners:
            if "fp32" in name:
                print_decode_profile(name, folders[name], prompt, args.new_tokens, args.threads,
                                     runners[name].share_buffer)
    print()
    for note in notes:
        print(note)


def print_genai_rows(args, folders: dict[str, Path], runners: dict, prompt) -> None:
    """The rows with a genai_config.json, in onnxruntime-genai's Generator: the same greedy tokens as in this
    loop, and decode tok/s paired round by round with the first row (another onnxruntime build underneath,
    so its figures are compared with each other only)."""
    genai_rows = {name: folders[name] for name in runners
                  if (folders[name] / "genai_config.json").is_file() and not name.endswith("growing cache")}
    if not genai_rows:
        return
    results = genai_decode(genai_rows, prompt, args.new_tokens, args.threads, args.rounds)
    first, versions = next(iter(results)), peer_versions()
    print(f"\nIn onnxruntime-genai {versions['onnxruntime-genai']} (onnxruntime {versions['onnxruntime']}), "
          f"{args.rounds} alternating rounds:")
    print(f"| artifact | same {args.new_tokens} greedy tokens as this loop | decode tok/s | vs {first} |")
    print("|---|---|---|---|")
    for name, result in results.items():
        ours = [int(t) for t in runners[name].generate(prompt, args.new_tokens)]
        ratios = [a / b for a, b in zip(result["decode"], results[first]["decode"])]
        print(f"| {name} | {'yes' if result['tokens'] == ours else 'NO'} | {statistics.median(result['decode']):.1f} "
              f"| {statistics.median(ratios):.3f}× |")


def print_decode_profile(name: str, folder: Path, prompt, new_tokens: int, threads: int, share_buffer: bool) -> None:
    """onnxruntime's own profile of one generate() over the plain loop, decode steps only (the prefill run is
    left out): kernel ms per decoded token by op type, and the session's whole run time per token."""
    import json

    import onnxruntime as ort

    runner = plain_onnx_runner(folder, threads, share_buffer)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    runner.session = ort.InferenceSession(str(runner.model_path), options, providers=["CPUExecutionProvider"])
    runner.generate(prompt, new_tokens)
    trace = Path(runner.session.end_profiling())
    events = json.loads(trace.read_text(encoding="utf-8"))
    trace.unlink()
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    prefill_end = runs[0]["ts"] + runs[0]["dur"]
    steps = len(runs) - 1
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > prefill_end:
            by_op[e["args"]["op_name"]] = by_op.get(e["args"]["op_name"], 0.0) + e["dur"] / 1000 / steps
    top = sorted(by_op.items(), key=lambda item: -item[1])[:6]
    print(f"{name}, decode profile (ms per token over {steps} steps, profiler on): session run "
          f"{sum(r['dur'] for r in runs[1:]) / 1000 / steps:.2f}, kernels {sum(by_op.values()):.2f}: "
          + ", ".join(f"{op} {ms:.2f}" for op, ms in top))


def read_bandwidth_gbs(threads: int) -> tuple[float, float]:
    """GB/s at which `threads` threads read 512 MB of float32 weights, summing them and as a (1, 576) x
    (576, N) matrix-vector product: the roofline of a decode step, which reads every weight once and does
    little arithmetic per byte in fp32."""
    import torch

    def best_gbs(work, nbytes: int) -> float:
        work()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            work()
            best = min(best, time.perf_counter() - start)
        return nbytes / best / 1e9

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        weights = torch.ones(576, 128 * 1024 * 1024 // 576)
        vector = torch.ones(1, 576)
        nbytes = weights.numel() * 4
        return best_gbs(weights.sum, nbytes), best_gbs(lambda: vector @ weights, nbytes)
    finally:
        torch.set_num_threads(previous)


def matmuls_alone_ms(folder: Path, threads: int, runs: int = 20) -> dict[str, float]:
    """Median ms of one decode step's fp32 matmuls alone (Q/K/V packed, o, gate/up packed and down per layer,
    then lm_head; shapes from the folder's config.json), with no other op between them: the floor under any
    fused fp32 graph in onnxruntime, with its own kernels, on this machine. Measured for each way onnxruntime
    can multiply by an fp32 weight: MatMul with (in, out) weights, Gemm with transB and (out, in) weights (what
    torch's Linear stores), each with the weights prepacked at load (the default) and not (MLAS then reads them
    as stored). The variants take turns, one timed run each per round. The weights are random: pages of equal
    values can be merged by the host and read from cache, which would flatter the floor."""
    import json

    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    hidden, inter, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    inputs = {"hidden": hidden, "attention": heads * head_dim, "mlp": inter}
    shapes = [(f"{name}{layer}", source, n) for layer in range(config["num_hidden_layers"])
              for name, source, n in (("qkv", "hidden", (heads + 2 * kv_heads) * head_dim), ("o", "attention", hidden),
                                      ("gate_up", "hidden", 2 * inter), ("down", "mlp", hidden))]
    shapes.append(("lm_head", "hidden", config["vocab_size"]))
    rng = np.random.default_rng(0)
    matrices = [rng.random((inputs[source], n), dtype=np.float32) for _, source, n in shapes]

    def model_bytes(op: str) -> bytes:
        if op == "MatMul":
            nodes = [helper.make_node("MatMul", [source, f"{name}_w"], [name]) for name, source, _ in shapes]
            weights = [numpy_helper.from_array(m, f"{name}_w") for (name, _, _), m in zip(shapes, matrices)]
        else:
            nodes = [helper.make_node("Gemm", [source, f"{name}_w"], [name], transB=1) for name, source, _ in shapes]
            weights = [numpy_helper.from_array(np.ascontiguousarray(m.T), f"{name}_w")
                       for (name, _, _), m in zip(shapes, matrices)]
        graph = helper.make_graph(  # (1, k) inputs, as Gemm takes 2-D only: one decode token
            nodes, "matmuls_alone",
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, k]) for name, k in inputs.items()],
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name, _, _ in shapes], weights)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()

    sessions = {}
    for op in ("MatMul", "Gemm transB"):
        serialized = model_bytes(op)
        for prepacked in (True, False):
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.add_session_config_entry("session.disable_prepacking", "0" if prepacked else "1")
            label = f"{op}{'' if prepacked else ' not prepacked'}"
            sessions[label] = ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
    feeds = {name: np.ones((1, k), np.float32) for name, k in inputs.items()}
    for session in sessions.values():
        for _ in range(3):
            session.run(None, feeds)
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(runs):
        for label, session in sessions.items():
            # Two untimed runs first: here the first two runs after another session's take about 2× and 1.3×
            # the steady time (measured: 39 and 26 ms against 20), as measure_speed's warm-up absorbs them for
            # the decode rows.
            for _ in range(2):
                session.run(None, feeds)
            start = time.perf_counter()
            session.run(None, feeds)
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) * 1000 for label, t in times.items()}


if __name__ == "__main__":
    main()
