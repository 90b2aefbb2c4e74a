"""The same recipe, model and seed on the CPU give byte-identical artifacts, run after run.

Only the report files differ between runs (timings, memory, the creation time) and, through their hashes, the
manifest; everything else — weights, graph, config, tokenizer — must match to the byte, and so must every
measurement that does not depend on the clock.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import llmopt

# Files whose content includes timings: report.{json,md,html}, the model card, and the manifest that hashes them.
TIMED = {"report.json", "report.md", "report.html", "README.md", "manifest.json", "llmopt.log"}
# GPTQ draws its calibration windows with the seed: the seed reaches the weights.
GPTQ = ("seed: {seed}\npasses:\n  - type: quantize\n    method: gptq\n    group_size: 16\n"
        "export: {{format: {format}}}\ncalibration: {{samples: 4, seq_len: 32}}\n"
        "evaluation:\n  max_tokens: 256\n  window: 64\n  speed: {{prompt_tokens: 8, new_tokens: 4, runs: 1}}\n")


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in TIMED}


def clock_free(report: dict) -> dict:
    """The report's measurements that do not depend on the clock or the machine's memory."""
    keep = ("parameters", "size_bytes", "kv_cache_bytes_per_token", "perplexity")
    return {
        "baseline": {k: report["baseline"][k] for k in keep}, "optimized": {k: report["optimized"][k] for k in keep},
        "quality": report["quality"], "validation": report["validation"], "layer_errors": report["layer_errors"],
        "samples": report["samples"], "passes": [{k: v for k, v in p.items() if k != "seconds"} for p in report["passes"]],
        "export": report["export"], "recipe": report["recipe"],
    }


def run(tiny_model_dir: Path, folder: Path, name: str, fmt: str, seed: int = 0) -> Path:
    recipe = folder / f"{name}.yaml"
    recipe.write_text(GPTQ.format(seed=seed, format=fmt), encoding="utf-8")
    return llmopt.optimize(recipe, model=str(tiny_model_dir), output=folder / name).output


@pytest.mark.parametrize("fmt,weights", [("onnx", "model.onnx"), ("safetensors", "model.safetensors")])
@pytest.mark.slow
def test_same_seed_gives_byte_identical_artifacts(fmt, weights, tiny_model_dir, tmp_path):
    first, second = (run(tiny_model_dir, tmp_path, f"run{i}", fmt) for i in range(2))
    a, b = digests(first), digests(second)
    print(f"{fmt}: {len(a)} files compared: {sorted(a)}")
    assert weights in a and "config.json" in a and "tokenizer.json" in a
    assert a == b, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}

    manifests = [json.loads((f / "manifest.json").read_text()) for f in (first, second)]
    for m in manifests:
        m["files"] = {k: v for k, v in m["files"].items() if k not in TIMED}
    assert manifests[0] == manifests[1]  # the same files, recipe, versions and seed
    reports = [clock_free(json.loads((f / "report.json").read_text())) for f in (first, second)]
    assert reports[0] == reports[1]


@pytest.mark.slow
def test_another_seed_changes_the_weights(tiny_model_dir, tmp_path):
    """The comparison above can fail: a different seed draws other calibration windows, so other GPTQ codes."""
    seed0 = digests(run(tiny_model_dir, tmp_path, "seed0", "safetensors", seed=0))
    seed1 = digests(run(tiny_model_dir, tmp_path, "seed1", "safetensors", seed=1))
    assert seed0["model.safetensors"] != seed1["model.safetensors"]
    assert seed0["tokenizer.json"] == seed1["tokenizer.json"]
