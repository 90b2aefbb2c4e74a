"""One small interface over the runtimes an artifact can target, so every metric is runtime-agnostic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class Runner(Protocol):
    runtime: str

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Next-token logits for one sequence: ids (T,) int64 -> (T, vocab) float32."""

    def generate(self, ids: np.ndarray, new_tokens: int) -> np.ndarray:
        """Greedy decoding with the KV cache, exactly `new_tokens` tokens: (T,) -> (T + new_tokens,)."""


class TorchRunner:
    runtime = "pytorch"

    def __init__(self, model: Any, threads: int | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.model = model.eval()
        self.threads = torch.get_num_threads()

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    @property
    def provider(self) -> str:
        from llmopt.devices import CPU, CUDA

        return CUDA if self.device.type == "cuda" else CPU

    @classmethod
    def load(cls, folder: Path, threads: int | None = None, device: str = "cpu") -> "TorchRunner":
        import torch
        from transformers import AutoModelForCausalLM

        kwargs = {}
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        if config.get("quantization_config", {}).get("quant_method") == "compressed-tensors":
            from transformers import CompressedTensorsConfig

            # Unpacked once at load into plain Linears: run_compressed would unpack every weight on every
            # forward pass on a CPU, which no one serving the model would do.
            kwargs["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
        # A half-precision checkpoint is measured as it would run: in its own dtype.
        stored = config.get("dtype") or config.get("torch_dtype")
        dtype = getattr(torch, stored) if stored in ("float16", "bfloat16") else torch.float32
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True, **kwargs)
        for module in model.modules():
            if hasattr(module, "quantization_scheme"):
                # compressed-tensors wraps each unpacked Linear's forward to fake-quantize its weight on every
                # call; the weight is already on its grid, so the plain forward computes the same numbers
                # (checked against the in-memory model at export) 2.5x faster on a CPU.
                module.__dict__.pop("forward", None)
        return cls(model.to(device), threads)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(ids[None].astype(np.int64)).to(self.device), use_cache=False)
        return out.logits[0].float().cpu().numpy()  # (T, V)

    def generate(self, ids: np.ndarray, new_tokens: int) -> np.ndarray:
        import torch

        input_ids = torch.from_numpy(ids[None].astype(np.int64)).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
            )
        return out[0].cpu().numpy()


class CachedRunner:
    """Another runner's logits, computed once per window and reused: the reference when many variants are
    compared with one model (the benchmarks)."""

    def __init__(self, runner: Runner) -> None:
        self.runner, self.runtime, self.cache = runner, runner.runtime, {}

    def logits(self, ids: np.ndarray) -> np.ndarray:
        key = ids.tobytes()
        if key not in self.cache:
            self.cache[key] = self.runner.logits(ids)
        return self.cache[key]

    def generate(self, ids: np.ndarray, new_tokens: int) -> np.ndarray:
        return self.runner.generate(ids, new_tokens)


class OrtRunner:
    runtime = "onnxruntime"

    def __init__(self, folder: Path, threads: int | None = None, provider: str = "CPUExecutionProvider") -> None:
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.model = ORTModelForCausalLM.from_pretrained(folder, provider=provider, session_options=options)
        self.threads = threads or _cpu_count()
        # What the session runs on: onnxruntime falls back to the CPU when CUDA's libraries fail to load.
        self.provider = (getattr(self.model, "providers", None) or [provider])[0]

    def logits(self, ids: np.ndarray) -> np.ndarray:
        import torch

        # On the CUDA provider optimum binds inputs where they are: give them on the session's device.
        input_ids = torch.from_numpy(ids[None].astype(np.int64)).to(self.model.device)
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        return np.asarray(out.logits[0].float().cpu(), dtype=np.float32)

    def generate(self, ids: np.ndarray, new_tokens: int) -> np.ndarray:
        import torch

        input_ids = torch.from_numpy(ids[None].astype(np.int64)).to(self.model.device)
        out = self.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
        )
        return np.asarray(out[0].cpu())


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_runner(folder: Path, fmt: str, threads: int | None = None, provider: str = "CPUExecutionProvider") -> Runner:
    """A runner for an artifact folder written by one of the exporters, on the provider's device."""
    from llmopt.devices import torch_device

    if fmt == "onnx":
        return OrtRunner(folder, threads, provider)
    return TorchRunner.load(folder, threads, torch_device(provider))
