"""Peer tools for the benchmarks: onnxruntime-genai's model builder and onnxruntime's dynamic int8 quantization.

Imported by the benchmark scripts (not installed, not product code). What it offers, all stable:

* `ensure_peer_venv()`: a separate virtual environment for the builder (it needs transformers >= 5 and the CPU
  `onnxruntime`, which clash with llmopt's pins), created once under the cache folder.
* `demo_hf_folder()`: the demo model (SmolLM2-135M-Instruct, dequantized from its GGUF) as a Hugging Face
  folder (safetensors + tokenizer) that the builder, and llmopt, can read.
* `export_optimum_fp32()`: optimum's fp32 ONNX export of a model folder (the format llmopt's ONNX exporter writes).
* `build_with_genai_builder()`: run the builder in the peer venv; returns the wall time.
* `genai_decode()`: greedy tokens and decode speed of folders with a genai_config.json in onnxruntime-genai's
  own Generator (the peer venv): the runtime those folders are written for.
* `ort_dynamic_int8()`: onnxruntime.quantization.quantize_dynamic on an optimum fp32 export; returns the wall time.
* `GenaiRunner`: llmopt's runner interface (`logits`, `generate`) over a folder with a genai_config.json (the
  builder's, or llmopt's GroupQueryAttention graphs'), driven with onnxruntime.InferenceSession in llmopt's
  own venv, so builder artifacts are measured by llmopt's metric code on the same onnxruntime as every other
  row; the KV cache is updated in place where the config says so, as onnxruntime-genai does.
* `OptimumPlainRunner`: the same plain loop over an optimum-format folder (the graph timed without
  transformers' generate() around it); `plain_onnx_runner()` picks one of the two by the folder's format.
* `load_onnx_runner()`: GenaiRunner for a builder folder, llmopt's OrtRunner for an optimum-format folder.
* `folder_mb()`: bytes on disk of an artifact folder's weights.

The cache folder is ~/.cache/llmopt-bench (LLMOPT_BENCH_CACHE overrides it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from llmopt.evaluation.runners import PlainOnnxLoop
from llmopt.exporters.onnx_genai import shares_kv_buffer

CACHE = Path(os.environ.get("LLMOPT_BENCH_CACHE", "~/.cache/llmopt-bench")).expanduser()

# Pinned to the versions this benchmark was run with, so a figure can be reproduced. torch first, on its own:
# the CPU wheel of exactly this version is served locally; a bare `torch` would pull the CUDA build (GBs).
PEER_TORCH = "torch==2.13.0"
PEER_PACKAGES = (
    "onnxruntime-genai==0.18.0",
    "onnxruntime==1.32.0",
    "transformers==5.23.0",
    # what the builder imports beyond its declared dependencies (found by running it)
    "onnx==1.23.2",
    "onnx-ir==1.1.0",
)
BUILDER_PRECISIONS = ("int4", "int8", "fp32")


def ensure_peer_venv() -> Path:
    """The builder's venv's python (created and filled once)."""
    return ensure_venv("peer-venv", PEER_PACKAGES)


def ensure_venv(name: str, packages: tuple[str, ...]) -> Path:
    """The python of CACHE/name, a venv with torch (PEER_TORCH, first, on its own) and `packages`, created and
    filled once; a marker file records what was installed, and a different list rebuilds it."""
    venv = CACHE / name
    python = venv / "bin" / "python"
    marker = venv / "llmopt-bench-packages.txt"
    wanted = "\n".join((PEER_TORCH, *packages))
    if python.is_file() and marker.is_file() and marker.read_text() == wanted:
        return python
    shutil.rmtree(venv, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    # sys._base_executable: the interpreter behind llmopt's venv, so the new venv does not nest in it.
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, PEER_TORCH], check=True)
    subprocess.run([*pip, *packages], check=True)
    marker.write_text(wanted)
    return python


def peer_versions() -> dict[str, str]:
    """Installed versions of the peer venv's main packages."""
    python = ensure_peer_venv()
    code = ("import importlib.metadata as m, json; print(json.dumps({n: m.version(n) for n in "
            "('onnxruntime-genai', 'onnxruntime', 'transformers', 'torch')}))")
    return json.loads(subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout)


def demo_hf_folder(spec: str = "demo") -> Path:
    """The model `spec` resolves to, saved once as a Hugging Face folder (float32 safetensors + tokenizer).

    For `demo` that is the GGUF dequantized by transformers, exactly what llmopt loads; saving it once also
    spares every later load the GGUF dequantization (about 40 s on 2 cores).
    """
    from llmopt.model import load_model, resolve_model

    source = resolve_model(spec)
    name = Path(source.gguf_file or source.path).name
    folder = CACHE / "hf" / name.replace(".", "_")
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    model, tokenizer = load_model(source)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)  # complete or absent: an interrupted save is never mistaken for a cached one
    return folder


# optimum-onnx pins transformers < 4.58 while llmopt is on 5: laid over llmopt's environment in their own folder
# (PYTHONPATH), as .ci/run does for the tests, rather than a third venv with its own torch.
OPTIMUM_OVERLAY_PACKAGES = ("transformers==4.57.6", "optimum==2.1.0", "optimum-onnx==0.1.0", "huggingface_hub==0.36.0",
                            "tokenizers==0.22.1")


def ensure_optimum_overlay() -> dict[str, str]:
    """The environment variables of a child process that imports optimum-onnx (installed once into the cache)."""
    overlay = CACHE / "optimum-overlay"
    marker = overlay / "llmopt-bench-packages.txt"
    wanted = "\n".join(OPTIMUM_OVERLAY_PACKAGES)
    if not (marker.is_file() and marker.read_text() == wanted):
        shutil.rmtree(overlay, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(overlay),
                        *OPTIMUM_OVERLAY_PACKAGES], check=True)
        marker.write_text(wanted)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(overlay), os.environ.get("PYTHONPATH", "")])}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def export_optimum_fp32(model_dir: Path, out_dir: Path) -> float:
    """optimum's fp32 ONNX export (KV cache) of a model folder, with its tokenizer, in the optimum overlay;
    returns the wall time of the child process."""
    # transformers 5 saves the rotary base as rope_parameters, which 4.57 does not read (it would take its default
    # base, 10,000 instead of SmolLM2's 100,000): handed over as 4.57's rope_theta / rope_scaling.
    code = ("import json, sys, torch\nfrom pathlib import Path\nfrom optimum.exporters.onnx import onnx_export_from_model\n"
            "from transformers import AutoConfig, AutoModelForCausalLM\n"
            "config = AutoConfig.from_pretrained(sys.argv[1])\n"
            "rope = json.load(open(Path(sys.argv[1]) / 'config.json')).get('rope_parameters')\n"
            "if rope:\n    config.rope_theta = rope['rope_theta']\n"
            "    config.rope_scaling = None if rope.get('rope_type', 'default') == 'default' else rope\n"
            "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], config=config, dtype=torch.float32, "
            "use_safetensors=True)\n"
            "onnx_export_from_model(model.eval(), output=Path(sys.argv[2]), task='text-generation-with-past', "
            "do_validation=False)\n")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(model_dir), str(out_dir)], check=True,
                   env=ensure_optimum_overlay())
    # The tokenizer files are copied, not re-saved: transformers 5 writes a tokenizer_config.json (class
    # "TokenizersBackend") that the overlay's transformers 4.57 cannot load.
    for name in TOKENIZER_FILES:
        if (Path(model_dir) / name).is_file():
            shutil.copy2(Path(model_dir) / name, Path(out_dir) / name)
    return time.perf_counter() - start


def build_with_genai_builder(hf_dir: Path, out_dir: Path, precision: str,
                             extra_options: dict[str, object] | None = None) -> float:
    """Build `out_dir` from `hf_dir` with onnxruntime-genai's builder for the CPU; returns the wall time.

    extra_options are the builder's `--extra_options k=v` (e.g. {"block_size": 32}, {"is_symmetric": False},
    {"algo_config": "k_quant"}); its int4/int8 default is symmetric RTN in blocks of 32 with accuracy_level 4
    (int8 activations inside MatMulNBits) on the CPU.
    """
    if precision not in BUILDER_PRECISIONS:
        raise ValueError(f"precision must be one of {BUILDER_PRECISIONS}, got {precision!r}")
    python = ensure_peer_venv()
    out_dir = Path(out_dir).resolve()  # absolute: the builder runs in another folder (below)
    shutil.rmtree(out_dir, ignore_errors=True)
    command = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(Path(hf_dir).resolve()),
               "-o", str(out_dir), "-p", precision, "-e", "cpu", "-c", str(CACHE / "builder-cache")]
    if extra_options:
        command += ["--extra_options", *(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                         for k, v in extra_options.items())]
    start = time.perf_counter()
    # cwd: the builder imports its own `quantization` module by bare name, which `python -m` would resolve to
    # benchmarks/quantization.py when run from this folder.
    done = subprocess.run(command, check=False, capture_output=True, text=True, cwd=CACHE)
    seconds = time.perf_counter() - start
    if done.returncode != 0 or not (out_dir / "model.onnx").is_file():
        raise RuntimeError(f"the genai builder failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    return seconds


def ort_dynamic_int8(fp32_onnx_dir: Path, out_dir: Path, *, reduce_range: bool = True) -> float:
    """onnxruntime's dynamic quantization of an optimum fp32 export: int8 weights per output channel,
    activations quantized at run time (MatMulInteger / DynamicQuantizeLinear). Returns the wall time.

    reduce_range=True (7-bit weights) is onnxruntime's documented remedy for x86 CPUs with AVX2 but no VNNI,
    where its u8 x s8 kernel (VPMADDUBSW) saturates int16 pair sums: with full-range per-channel weights the
    demo model's output is unusable there (top-1 agreement ~0). The other files of the export (config,
    tokenizer) are copied so that the folder loads like the original.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32_onnx_dir, out_dir = Path(fp32_onnx_dir), Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    for item in fp32_onnx_dir.iterdir():
        if item.is_file() and not item.name.startswith("model.onnx"):
            shutil.copy2(item, out_dir / item.name)
    start = time.perf_counter()
    quantize_dynamic(fp32_onnx_dir / "model.onnx", out_dir / "model.onnx", per_channel=True,
                     reduce_range=reduce_range, weight_type=QuantType.QInt8)
    return time.perf_counter() - start


def genai_decode(folders: dict[str, Path], prompt: list[int], new_tokens: int, threads: int,
                 rounds: int) -> dict[str, dict[str, list]]:
    """Greedy tokens and per-round decode tok/s of each folder in onnxruntime-genai's own Generator (the peer
    venv, the CPU EP), the rows taking turns within each round and timed as measure_speed times them
    (generate with 1 and with `new_tokens` new tokens, the difference). Returns {label: {"tokens", "decode"}}."""
    python = ensure_peer_venv()
    spec = {"folders": {label: str(folder) for label, folder in folders.items()}, "prompt": [int(t) for t in prompt],
            "new_tokens": new_tokens, "threads": threads, "rounds": rounds}
    script = Path(__file__).resolve().parent / "genai_timing.py"
    done = subprocess.run([str(python), str(script), json.dumps(spec)], check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"onnxruntime-genai failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {label: {"tokens": result["tokens"][label], "decode": result["decode"][label]} for label in folders}


def folder_mb(folder: Path) -> float:
    """MB (1e6 bytes) of the ONNX graph and weight files in `folder` (tokenizer and configs not counted)."""
    from llmopt.exporters.base import weight_bytes

    return weight_bytes(Path(folder)) / 1e6


class PlainOnnxRunner(PlainOnnxLoop):
    """llmopt's plain onnxruntime loop (evaluation/runners.py PlainOnnxLoop) over a graph file, on the CPU EP:
    the same loop for optimum's format and the builder's, so it times the graphs and not the harnesses
    (onnxruntime-genai's own Generator would put a second runtime, another onnxruntime build, under them)."""

    def __init__(self, model_path: Path, threads: int | None, **layout) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.model_path = Path(model_path)
        self.threads = threads or len(os.sched_getaffinity(0))
        try:
            super().__init__(session, **layout)
        except ValueError as why:
            raise ValueError(f"{model_path}: {why}") from None


class GenaiRunner(PlainOnnxRunner):
    """A folder with a genai_config.json (the builder's, or llmopt's fused graphs'): names, shapes and whether
    the KV cache is updated in place from it, unless `share_buffer` says otherwise. The builder's
    GroupQueryAttention derives the positions from the attention mask, so its graphs take no position_ids."""

    def __init__(self, folder: Path, threads: int | None = None, share_buffer: bool | None = None) -> None:
        decoder = json.loads((Path(folder) / "genai_config.json").read_text(encoding="utf-8"))["model"]["decoder"]
        names_in, names_out = decoder["inputs"], decoder["outputs"]
        if share_buffer is None:
            share_buffer = shares_kv_buffer(folder)
        super().__init__(
            Path(folder) / decoder["filename"], threads, layers=decoder["num_hidden_layers"],
            kv_heads=decoder["num_key_value_heads"], head_dim=decoder["head_size"],
            ids_name=names_in["input_ids"], mask_name=names_in["attention_mask"],
            position_name=names_in.get("position_ids"), logits_name=names_out["logits"],
            past_formats=(names_in["past_key_names"], names_in["past_value_names"]),
            present_formats=(names_out["present_key_names"], names_out["present_value_names"]),
            share_buffer=share_buffer,
        )


class OptimumPlainRunner(PlainOnnxRunner):
    """An optimum-format folder (what llmopt's ONNX exporter writes) in the same plain loop as GenaiRunner:
    shapes from config.json, optimum's input and output names."""

    def __init__(self, folder: Path, threads: int | None = None) -> None:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        heads = config["num_attention_heads"]
        super().__init__(
            Path(folder) / "model.onnx", threads, layers=config["num_hidden_layers"],
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            ids_name="input_ids", mask_name="attention_mask", position_name="position_ids", logits_name="logits",
            past_formats=("past_key_values.%d.key", "past_key_values.%d.value"),
            present_formats=("present.%d.key", "present.%d.value"),
        )


def plain_onnx_runner(folder: Path, threads: int | None = None, share_buffer: bool | None = None) -> PlainOnnxRunner:
    """The same plain onnxruntime loop for either format (builder or optimum): times the graph alone. A graph
    whose genai_config.json says so updates its KV cache in place, as onnxruntime-genai runs it, unless
    share_buffer=False."""
    if (Path(folder) / "genai_config.json").is_file():
        return GenaiRunner(folder, threads, share_buffer)
    return OptimumPlainRunner(folder, threads)


def load_onnx_runner(folder: Path, threads: int | None = None):
    """A runner for an ONNX folder: GenaiRunner for the builder's format, llmopt's own for optimum's."""
    if (Path(folder) / "genai_config.json").is_file():
        return GenaiRunner(folder, threads)
    from llmopt.evaluation.runners import load_runner

    return load_runner(Path(folder), "onnx", threads)
