"""Peer int4 weight quantizers for benchmarks/quantization.py: Intel AutoRound and llm-compressor (GPTQ, AWQ + GPTQ).

Imported by the benchmark scripts (not installed, not product code). Each peer lives in its own virtual environment
(their pins on transformers / compressed-tensors clash with llmopt's), runs there on llmopt's own calibration
windows, and hands back its integers in llmopt's layout, so the artifact is written by llmopt's exporter and the
rows differ only in the integers chosen:

* `ensure_venv(kind)`: ~/.cache/llmopt-bench/<kind>-venv, created once (kind: "autoround" or "llmcompressor").
* `quantize_with_peer(kind, hf_dir, windows, out_dir, **settings)`: run the peer in its venv; writes
  out_dir/codes.safetensors (NAME.codes uint8, NAME.scales float32, NAME.zero_points uint8 for every quantized
  Linear weight NAME), out_dir/floats.safetensors (float parameters the peer changed besides those: AWQ's
  smoothed norm weights), the peer's own packed checkpoint in out_dir/peer_packed, and out_dir/result.json.
* `load_peer_state(hf_dir, out_dir)`: llmopt's ModelState of the float model with the peer's dequantized weights
  and its QuantizedTensors (what llmopt's ONNX exporter stores as MatMulNBits).

The worker checks, per layer, that (codes - zero_points) * scales reproduces (1) the peer's fake-quantized weight
in memory and (2) the peer's own dequantization of its saved packed checkpoint (same codes, same scales), and
fails otherwise. The cache folder is peers.CACHE (LLMOPT_BENCH_CACHE overrides it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import peers

KINDS = ("autoround", "llmcompressor")

# Pinned to the versions this benchmark was run with; torch (peers.PEER_TORCH, the local CPU wheel) goes first, on
# its own. transformers is pinned as each tool's resolver picked it (llm-compressor 0.14 caps it at 5.17).
PACKAGES: dict[str, tuple[str, ...]] = {
    "autoround": ("auto-round==0.16.1", "transformers==5.25.0"),
    "llmcompressor": ("llmcompressor==0.14.0.1", "compressed-tensors==0.19.0", "transformers==5.17.0"),
}

# Each peer's settings with their defaults; quantize_with_peer refuses any other key.
DEFAULTS: dict[str, dict[str, Any]] = {
    "autoround": {
        "iters": 200,  # AutoRound's default; e.g. 1000 for its stronger setting
        "nsamples": None,  # None: all the windows given (AutoRound's own default is 128)
        "batch_size": 8,  # AutoRound's default
        "group_size": 32,
        "sym": True,
        "amp": True,  # AutoRound's default: tune in bfloat16 where the CPU has it (False: float32 throughout)
        "enable_torch_compile": None,  # AutoRound's default (it compiles the block on CPU)
        "seed": 42,  # AutoRound's default
        # The packed checkpoint saved for packed_mb and the cross-check; None: none saved, not checked (auto-round
        # 0.16.1 packs sym=False as auto_awq and fails: "WQLinear_GEMM.__init__() got an unexpected keyword
        # argument 'weight_dtype'").
        "format": "auto_round",
    },
    "llmcompressor": {
        "method": "gptq",  # or "awq+gptq": AWQModifier, then GPTQModifier
        "group_size": 32,
        "symmetric": True,
        "ignore": ["lm_head"],  # as llm-compressor's own W4A16 examples
        "dampening_frac": 0.01,  # GPTQModifier's default
        "gptq": {},  # further GPTQModifier arguments (block_size, actorder, ...)
        "awq": {},  # further AWQModifier arguments (n_grid, duo_scaling, ...)
        "batch_size": 1,  # oneshot's default
    },
}

TOLERANCE = 1e-6  # max |ours - peer's| / max |peer's| per layer


def ensure_venv(kind: str) -> Path:
    """The python of the peer's venv, CACHE/<kind>-venv (created and filled once)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return peers.ensure_venv(f"{kind}-venv", PACKAGES[kind])


def quantize_with_peer(kind: str, hf_dir: Path, windows: list[np.ndarray], out_dir: Path, *,
                       threads: int | None = None, **settings) -> dict:
    """Quantize `hf_dir` with the peer on `windows` (equal-length int64 token-id arrays) and write its integers in
    llmopt's layout to out_dir (see the module's docstring); `threads`: torch's threads in the peer (its default:
    all cores). Returns {"seconds": the peer's wall time from its entry call (AutoRound(...).quantize(), oneshot) on
    the loaded model to its end (saving not counted), "packed_mb": MB of its packed checkpoint's safetensors
    (None if none saved), "version", "settings" (all, defaults included), "quantized": [weight names],
    "float_linears": [Linear weights it left float], "float_changed": [other parameters it changed],
    "max_rel_diff": {"fake_quant": against its in-memory fake-quantized weight, in "fake_quant_dtype" (bfloat16
    under AutoRound's amp: ~2e-3 there, and exact once ours is rounded to bfloat16, which the worker requires),
    "packed": against its own dequantization of its packed checkpoint (<= 1e-6 required)}, "notes"}."""
    python = ensure_venv(kind)
    unknown = set(settings) - set(DEFAULTS[kind])
    if unknown:
        raise ValueError(f"{kind} takes no setting(s) {sorted(unknown)}; it takes {sorted(DEFAULTS[kind])}")
    resolved = {**DEFAULTS[kind], **settings}
    lengths = {len(w) for w in windows}
    if len(lengths) != 1:
        raise ValueError(f"the windows must all have one length (both peers batch them), got lengths {sorted(lengths)}")
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    np.save(out_dir / "windows.npy", np.stack([np.asarray(w, dtype=np.int64) for w in windows]))
    spec = {"kind": kind, "hf_dir": str(Path(hf_dir).resolve()), "out_dir": str(out_dir.resolve()),
            "settings": resolved, "threads": threads, "tolerance": TOLERANCE}
    # Offline: both tools reach for the hub by default (datasets, configs); everything they need is local here.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # nothing of llmopt's environment leaks into the peer's
    log = out_dir / "peer.log"
    with log.open("w") as sink:  # the tools' progress bars and logs, kept for inspection
        done = subprocess.run([str(python), "-c", WORKER, json.dumps(spec)], cwd=out_dir, env=env, stdout=sink,
                              stderr=subprocess.STDOUT, check=False)
    result_file = out_dir / "result.json"
    if done.returncode != 0 or not result_file.is_file():
        tail = log.read_text(errors="replace").replace("\r", "\n")[-4000:]  # progress bars redraw with \r
        raise RuntimeError(f"{kind} failed ({done.returncode}); log {log}:\n{tail}")
    return json.loads(result_file.read_text())


def load_peer_state(hf_dir: Path, out_dir: Path):
    """llmopt's ModelState: the float32 model of `hf_dir` holding the peer's dequantized weights (and any other
    parameter it changed), with state.quantized[NAME] = the peer's integers as llmopt's QuantizedTensor."""
    import torch
    from llmopt.quantized import QuantizedTensor
    from llmopt.state import ModelState
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    tensors = load_file(out_dir / "codes.safetensors")
    result = json.loads((out_dir / "result.json").read_text())
    quantized: dict[str, QuantizedTensor] = {}
    with torch.no_grad():
        floats = out_dir / "floats.safetensors"
        for name, value in (load_file(floats) if floats.is_file() else {}).items():
            model.get_parameter(name).copy_(torch.from_numpy(value))
        for name in sorted(k[: -len(".codes")] for k in tensors if k.endswith(".codes")):
            codes, scales, zeros = (tensors[f"{name}.{part}"] for part in ("codes", "scales", "zero_points"))
            qt = QuantizedTensor(name=name, kind="linear", bits=4, group_size=codes.shape[1] // scales.shape[1],
                                 symmetric=bool((zeros == 8).all()), codes=codes, scales=scales, zero_points=zeros)
            model.get_parameter(name).copy_(torch.from_numpy(qt.dequantized()))
            quantized[name] = qt
    state = ModelState(model=model, tokenizer=tokenizer, quantized=quantized)
    state.pass_info["peer"] = {k: result[k] for k in ("kind", "version", "settings", "quantized", "float_linears",
                                                      "float_changed")}
    return state


# Runs in the peer's venv (python -c WORKER '<json spec>'): no llmopt there, only torch, numpy, safetensors and the
# tool. Writes codes.safetensors, floats.safetensors, peer_packed/ and result.json into out_dir.
WORKER = r'''
import glob, json, os, sys, time
import numpy as np
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

spec = json.loads(sys.argv[1])
kind, settings, out_dir = spec["kind"], spec["settings"], spec["out_dir"]
if spec["threads"]:
    torch.set_num_threads(spec["threads"])
TOL = spec["tolerance"]
windows = np.load(os.path.join(out_dir, "windows.npy"))
model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(spec["hf_dir"])
original = {k: v.detach().clone() for k, v in model.state_dict().items()}
notes = []


def rel_diff(ours, theirs):
    theirs = theirs.float()
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1e-30))


def to_codes(name, weight, scale, zero, offset):
    """llmopt's unsigned codes and zero points of a fake-quantized weight (the peer's W = scale * (q - zero),
    q and zero in the peer's range; offset shifts that range to [0, 15])."""
    w, scale = weight.float(), scale.float()
    rows, cols = w.shape
    groups = scale.shape[1]
    zero = torch.as_tensor(zero, dtype=torch.float32).expand(rows, groups)
    s = scale.repeat_interleave(cols // groups, 1)
    q = torch.where(s != 0, torch.round(w / torch.where(s != 0, s, 1)), 0) + zero.repeat_interleave(cols // groups, 1)
    codes, zeros = q + offset, zero + offset
    if codes.min() < 0 or codes.max() > 15 or zeros.min() < 0 or zeros.max() > 15:
        raise SystemExit(f"{name}: codes or zero points outside [0, 15] (the peer's range is not int4 as assumed)")
    deq = (codes - zeros.repeat_interleave(cols // groups, 1)) * s
    # The peer's fake-quantized weight, in the dtype it computed in: exact after rounding ours to that dtype
    # (AutoRound tunes in bfloat16 by default: its in-memory weight is bf16(scale * q)).
    if not torch.equal(deq.to(weight.dtype), weight):
        raise SystemExit(f"{name}: (codes - zero) * scale does not reproduce the peer's fake-quantized weight "
                         f"(max rel diff {rel_diff(deq, weight):.2e})")
    return codes.to(torch.uint8), scale.contiguous(), zeros.to(torch.uint8), deq, rel_diff(deq, weight)


def check_packed(name, deq, codes, theirs_deq, their_codes):
    if not torch.equal(codes.to(torch.int32), their_codes.to(torch.int32)):
        raise SystemExit(f"{name}: the peer's packed codes differ from the extracted ones "
                         f"({int((codes.to(torch.int32) != their_codes.to(torch.int32)).sum())} elements)")
    diff = rel_diff(deq, theirs_deq)
    if diff > TOL:
        raise SystemExit(f"{name}: the peer's own dequantization of its checkpoint differs by {diff:.2e} (relative)")
    return diff


def float_changes(model, extracted):
    """Float parameters the peer changed besides the quantized weights (AWQ scales the norms in front of the layers
    it smooths), and the Linears it left float; read before the peer packs its layers. A cast to the peer's working
    dtype and back is not a change: llmopt keeps its float32 originals."""
    changed = {}
    for key, value in model.state_dict().items():
        if key in extracted or key not in original or not value.is_floating_point():
            continue
        value = value.detach()
        if not torch.equal(original[key].to(value.dtype), value):
            changed[key] = value.float().contiguous().numpy()
    linears = {n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return changed, sorted(linears - set(extracted))


def folder_mb(folder):
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(folder, "*.safetensors"))) / 1e6


def unpack_gptq(packed, rows_first):
    """Nibbles of a GPTQ-packed int32 tensor: 8 values per word, value j in bits 4j..4j+3, along dim 0
    (rows_first: qweight (in/8, out)) or dim 1 (qzeros (groups, out/8))."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    if rows_first:
        return ((words[:, None, :] >> shifts[None, :, None]) & 15).reshape(-1, words.shape[1])
    return ((words[:, :, None] >> shifts[None, None, :]) & 15).reshape(words.shape[0], -1)


packed_dir = os.path.join(out_dir, "peer_packed")
extracted = {}  # weight name -> (codes, scales, zeros, deq)
max_fake, fake_dtype = 0.0, None
if kind == "autoround":
    import auto_round
    from auto_round import AutoRound

    version = auto_round.__version__
    s = settings
    nsamples = s["nsamples"] or len(windows)
    # Token ids go in as dicts with an all-ones mask: AutoRound feeds them to the model unchanged (strings would be
    # re-tokenized, a plain tensor would get a mask guessed from the pad token).
    data = [{"input_ids": torch.from_numpy(w)[None], "attention_mask": torch.ones(1, len(w), dtype=torch.long)}
            for w in windows]
    start = time.perf_counter()
    ar = AutoRound(model, tokenizer=tokenizer, scheme="W4A16", bits=4, group_size=s["group_size"], sym=s["sym"],
                   dataset=data, iters=s["iters"], nsamples=nsamples, seqlen=windows.shape[1],
                   batch_size=s["batch_size"], amp=s["amp"], enable_torch_compile=s["enable_torch_compile"],
                   seed=s["seed"], device_map="cpu")
    model, _ = ar.quantize()
    seconds = time.perf_counter() - start
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and getattr(module, "scale", None) is not None:
            if module.scale.dim() != 2 or module.scale.shape[1] * s["group_size"] != module.weight.shape[1]:
                raise SystemExit(f"{name}: scale of shape {tuple(module.scale.shape)} is not one per group")
            # sym: W = scale * q, q in [-8, 7], zp reported as 8; asym: W = scale * (q - zp), q in [0, 15]
            zero = module.zp if s["sym"] else module.zp.float()
            codes, scales, zeros, deq, fake = to_codes(name + ".weight", module.weight.detach(), module.scale, zero,
                                                       offset=0)
            extracted[name + ".weight"] = (codes, scales, zeros, deq)
            max_fake, fake_dtype = max(max_fake, fake), str(module.weight.dtype)
    if settings["amp"] and model.dtype != torch.float32:
        notes.append(f"AutoRound tuned in {model.dtype} (its default amp on this CPU); its scales are float16.")
    changed, float_linears = float_changes(model, extracted)
    max_packed = None
    if s["format"] is None:
        notes.append("format=None: no packed checkpoint saved; codes checked against the fake-quantized weights only.")
    else:
        ar.save_quantized(packed_dir, format=s["format"], inplace=True)
        packed = {}
        for f in glob.glob(os.path.join(packed_dir, "*.safetensors")):
            packed.update(load_file(f))
        packing = json.load(open(os.path.join(packed_dir, "config.json")))["quantization_config"].get("packing_format")
        if packing != "auto_round:auto_gptq":
            raise SystemExit(f"AutoRound packed as {packing!r}; this script unpacks auto_round:auto_gptq only")
        max_packed = 0.0
        for weight_name, (codes, scales, zeros, deq) in extracted.items():
            prefix = weight_name[: -len(".weight")]
            their_codes = unpack_gptq(packed[prefix + ".qweight"], rows_first=True).t()  # (out, in)
            # GPTQ v1 stores zero - 1 (auto_gptq's convention): its kernel adds the 1 back.
            their_zeros = unpack_gptq(packed[prefix + ".qzeros"], rows_first=False).t() + 1  # (out, groups)
            their_scales = packed[prefix + ".scales"].float().t()
            group = codes.shape[1] // their_scales.shape[1]
            theirs = ((their_codes.float() - their_zeros.float().repeat_interleave(group, 1))
                      * their_scales.repeat_interleave(group, 1))
            if not torch.equal(their_zeros.to(torch.uint8), zeros):
                raise SystemExit(f"{weight_name}: packed zero points differ from the extracted ones")
            max_packed = max(max_packed, check_packed(weight_name, deq, codes, theirs, their_codes))
else:
    import llmcompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    version = llmcompressor.__version__
    s = settings
    if s["method"] not in ("gptq", "awq+gptq"):
        raise SystemExit(f"method must be 'gptq' or 'awq+gptq', got {s['method']!r}")
    if s["method"] == "awq+gptq" and not torch.accelerator.is_available():
        # llm-compressor 0.14.0.1's AWQModifier pins its cached activations unconditionally
        # (IntermediatesCache.pin_memory), which raises "RuntimeError: Cannot access accelerator device when none is
        # available." on a CPU-only machine. Pinning only speeds host-to-device copies: skipped here, as
        # llm-compressor's own dataloader does when there is no accelerator. Numerics unchanged.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
        notes.append("AWQ on CPU: IntermediatesCache.pin_memory patched to a no-op (it raises without an "
                     "accelerator in llm-compressor 0.14.0.1).")
    weights = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=s["group_size"],
                               symmetric=s["symmetric"], dynamic=False)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    gptq = GPTQModifier(config_groups={"group_0": scheme}, ignore=s["ignore"], dampening_frac=s["dampening_frac"],
                        **s["gptq"])
    recipe = [AWQModifier(**s["awq"]), gptq] if s["method"] == "awq+gptq" else [gptq]
    dataset = Dataset.from_dict({"input_ids": windows.tolist(),
                                 "attention_mask": np.ones_like(windows).tolist()})
    start = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=len(windows),
            max_seq_length=windows.shape[1], batch_size=s["batch_size"], output_dir=None)
    seconds = time.perf_counter() - start
    args = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and hasattr(module, "weight_scale"):
            scheme_args = module.quantization_scheme.weights
            if getattr(module, "weight_g_idx", None) is not None:
                raise SystemExit(f"{name}: activation-ordered groups (g_idx); llmopt's groups are contiguous")
            zero = module.weight_zero_point.detach()
            # compressed-tensors: W = scale * (q - zp), q and zp in [-8, 7] (zp 0 when symmetric): llmopt's = +8
            codes, scales, zeros, deq, fake = to_codes(name + ".weight", module.weight.detach(),
                                                       module.weight_scale.detach(), zero.float(), offset=8)
            extracted[name + ".weight"] = (codes, scales, zeros, deq)
            args[name] = scheme_args
            max_fake, fake_dtype = max(max_fake, fake), str(module.weight.dtype)
    changed, float_linears = float_changes(model, extracted)
    model.save_pretrained(packed_dir, save_compressed=True)
    tokenizer.save_pretrained(packed_dir)
    packed = {}
    for f in glob.glob(os.path.join(packed_dir, "*.safetensors")):
        packed.update(load_file(f))
    max_packed = 0.0
    for weight_name, (codes, scales, zeros, deq) in extracted.items():
        prefix = weight_name[: -len(".weight")]
        shape = torch.Size(packed[prefix + ".weight_shape"].tolist())
        q = unpack_from_int32(packed[prefix + ".weight_packed"], 4, shape)
        scale = packed[prefix + ".weight_scale"]
        zp = packed.get(prefix + ".weight_zero_point")
        if zp is None:
            zp = torch.zeros_like(scale, dtype=torch.int8)
        else:  # asymmetric: zero points packed along the output axis
            zp = unpack_from_int32(zp, 4, scale.shape, packed_dim=0)
        theirs = dequantize(q, scale, zp, args[prefix], dtype=torch.float32)  # compressed-tensors' own
        if not torch.equal((zp.to(torch.int32) + 8).to(torch.uint8), zeros):
            raise SystemExit(f"{weight_name}: packed zero points differ from the extracted ones")
        max_packed = max(max_packed, check_packed(weight_name, deq, codes, theirs, q.to(torch.int32) + 8))

tensors = {}
for weight_name, (codes, scales, zeros, deq) in extracted.items():
    tensors[weight_name + ".codes"] = codes.contiguous().numpy()
    tensors[weight_name + ".scales"] = scales.float().contiguous().numpy()
    tensors[weight_name + ".zero_points"] = zeros.contiguous().numpy()
save_file(tensors, os.path.join(out_dir, "codes.safetensors"))
if changed:
    save_file(changed, os.path.join(out_dir, "floats.safetensors"))
result = {"kind": kind, "version": version, "settings": settings, "seconds": seconds,
          "packed_mb": folder_mb(packed_dir) if os.path.isdir(packed_dir) else None, "windows": list(windows.shape),
          "quantized": sorted(extracted), "float_linears": float_linears, "float_changed": sorted(changed),
          "max_rel_diff": {"fake_quant": max_fake, "fake_quant_dtype": fake_dtype, "packed": max_packed},
          "notes": notes}
with open(os.path.join(out_dir, "result.json"), "w") as f:
    json.dump(result, f, indent=1)
'''
