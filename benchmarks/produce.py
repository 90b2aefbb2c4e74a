"""Time to produce an int4 ONNX model of the demo model, whole processes side by side: llmopt's CLI (the direct
writer, `int4-fused-onnx` with evaluation off) against onnxruntime-genai's model builder (int4, its CPU defaults),
from the same Hugging Face folder. (The optimum path this was once compared with is gone: docs/benchmarks.md keeps
its figure.)

    python benchmarks/produce.py [--rounds 3]

Each round runs every tool once, in turns, so load from other processes falls on all alike; the median wall time
and peak RSS (the child's own ru_maxrss, from wait4) over rounds are printed. llmopt's runs include what the
builder does not do: the plan-time checks, and the artifact check against the in-memory model over a 256-token
sequence and cached decoding.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import CACHE, demo_hf_folder, ensure_peer_venv, folder_mb, peer_versions  # noqa: E402

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def run_child(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one child process; raises if it fails."""
    import tempfile

    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a chatty child never blocks on a full pipe
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed ({code}):\n{log.read().decode(errors='replace')[-3000:]}")
    return seconds, usage.ru_maxrss / 1e6  # kB -> GB


def recipe_without_evaluation(name: str, folder: Path) -> Path:
    """The shipped recipe with `evaluation: {enabled: false}`, in a copy we write."""
    import yaml

    data = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    data["evaluation"] = {"enabled": False}
    data.pop("checks", None)  # quality gates need the evaluation
    path = folder / f"{name}-no-eval.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=CACHE / "produce")
    args = parser.parse_args()

    hf = demo_hf_folder()
    args.work.mkdir(parents=True, exist_ok=True)
    llmopt = [sys.executable, "-m", "llmopt"]
    rows = {
        "llmopt int4-fused-onnx (direct writer)": ("llmopt", recipe_without_evaluation("int4-fused-onnx", args.work)),
        "genai builder int4": ("builder", None),
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    rss: dict[str, list[float]] = {name: [] for name in rows}
    sizes: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, (tool, recipe) in rows.items():
            out = args.work / "-".join(name.split(" ")[:2])
            shutil.rmtree(out, ignore_errors=True)
            if tool == "llmopt":
                seconds, peak = run_child([*llmopt, "-q", "optimize", str(recipe), "--model", str(hf), "--output",
                                           str(out)])
            else:  # as peers.build_with_genai_builder runs it, here for the child's peak RSS
                seconds, peak = run_child([str(ensure_peer_venv()), "-m", "onnxruntime_genai.models.builder", "-i",
                                           str(hf), "-o", str(out), "-p", "int4", "-e", "cpu", "-c",
                                           str(CACHE / "builder-cache")])
            times[name].append(seconds)
            rss[name].append(peak)
            sizes[name] = folder_mb(out)
    builder = statistics.median(times["genai builder int4"])
    versions = peer_versions()
    print(f"SmolLM2-135M-Instruct (float32 safetensors, {folder_mb(hf):.1f} MB) -> int4 ONNX, median of {args.rounds} "
          f"alternating rounds; builder: onnxruntime-genai {versions['onnxruntime-genai']}, transformers "
          f"{versions['transformers']} (its own venv)\n")
    print("| tool | wall s | ÷ builder | peak RSS GB | output MB |")
    print("|---|---|---|---|---|")
    for name in rows:
        wall = statistics.median(times[name])
        peak = statistics.median(rss[name])
        print(f"| {name} | {wall:.1f} ({min(times[name]):.1f}–{max(times[name]):.1f}) | {wall / builder:.2f}× "
              f"| {peak:.2f} | {sizes[name]:.1f} |")


if __name__ == "__main__":
    main()
