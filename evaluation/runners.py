"""One small interface over the runtimes an artifact can target, so every metric is runtime-agnostic."""

from __future__ import annotations

import inspect
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

    def decode_logits(self, ids: np.ndarray, prefill: int) -> np.ndarray:
        """Cached decoding of given tokens: ids[:prefill] in one prefill, then each later token fed alone through
        the KV cache, as generate() feeds it; the logits after each of those tokens, (T - prefill, vocab)."""


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
            kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
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
        """Greedy, with the KV cache, in a plain loop of forward passes: the same tokens as transformers'
        generate(), without its per-step logits processors and stopping checks, so the speed measured is
        the model's (and comparable with OrtRunner's loop)."""
        tokens, _ = self._decode(ids, new_tokens)
        return tokens

    def decode_logits(self, ids: np.ndarray, prefill: int) -> np.ndarray:
        _, logits = self._decode(ids[:prefill], len(ids) - prefill, forced=ids[prefill:])
        return logits

    def _decode(self, ids: np.ndarray, new_tokens: int, forced: np.ndarray | None = None) -> tuple[np.ndarray, Any]:
        """Prefill, then `new_tokens` steps of one token each: the greedy choice, or forced[step] when given.
        Returns the tokens and, when forced, the logits after each forced token (new_tokens, V)."""
        import torch
        from transformers import DynamicCache

        out = [int(t) for t in ids]
        # transformers 5 renames past_key_values to cache (the old name goes in 5.40)
        keyword = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        cache = {keyword: DynamicCache()}
        step_ids = torch.from_numpy(ids[None].astype(np.int64)).to(self.device)
        steps = []
        with torch.inference_mode():
            for step in range(new_tokens + (forced is not None)):
                logits = self.model(input_ids=step_ids, use_cache=True, **cache).logits
                if step and forced is not None:
                    steps.append(logits[0, -1].float().cpu().numpy())
                if step == new_tokens:
                    break
                token = int(forced[step]) if forced is not None else int(logits[0, -1].argmax())
                out.append(token)
                step_ids = torch.tensor([[token]], dtype=torch.int64, device=self.device)
        return np.asarray(out, dtype=np.int64), np.stack(steps) if steps else None


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

    def decode_logits(self, ids: np.ndarray, prefill: int) -> np.ndarray:
        return self.runner.decode_logits(ids, prefill)


class PlainOnnxLoop:
    """Greedy decoding over an ONNX decoder with an explicit KV cache, driven by an InferenceSession and numpy
    alone: logits and generate as the Runner interface has them.

    Written by hand because optimum's ORTModelForCausalLM.generate() goes through transformers' generate()
    and torch tensors on every step, which cost more than a small quantized graph itself (3.2 against 7.7
    tok/s for SmolLM2 fp32 in one run), and pins transformers < 4.58; the benchmarks drive onnxruntime-genai's
    builder graphs with the same loop, so the figures compare graphs, not harnesses. The cache of each layer is
    (B, kv_heads, past, head_dim) in and (B, kv_heads, past + T, head_dim) out; the mask covers past + T.

    With `share_buffer` (graphs whose genai_config.json says past_present_share_buffer: every layer's cache goes
    through GroupQueryAttention), generate() runs them as onnxruntime-genai does: one buffer per layer, sized for
    the whole sequence, bound as both the past input and the present output, which GroupQueryAttention updates
    in place, so no step copies the cache.

    With `prefill_chunk`, a longer sequence goes in as chunks of that many tokens, each after the cache of the ones
    before (as a chat continues a conversation): the same logits (onnxruntime's GroupQueryAttention computes them
    identically, local windows included; tested), with attention scratch for `prefill_chunk` queries instead of
    the whole sequence's.
    """

    runtime = "onnxruntime"

    def __init__(self, session: Any, *, layers: int, kv_heads: int, head_dim: int, ids_name: str, mask_name: str,
                 position_name: str | None, logits_name: str, past_formats: tuple[str, str],
                 present_formats: tuple[str, str], share_buffer: bool = False, device: str = "cpu",
                 prefill_chunk: int | None = None) -> None:
        self.session = session
        self.prefill_chunk = prefill_chunk
        self.device = device  # where generate()'s shared cache buffers live: "cpu", or "cuda" for the CUDA EP
        self.share_buffer = share_buffer
        self.logits_name = logits_name
        self.ids_name, self.mask_name, self.position_name = ids_name, mask_name, position_name
        self.past_names = [f % i for i in range(layers) for f in past_formats]
        self.output_names = [logits_name, *(f % i for i in range(layers) for f in present_formats)]
        expected = {ids_name, mask_name, *self.past_names} | ({position_name} if position_name else set())
        declared = {i.name for i in session.get_inputs()}
        if declared != expected:
            raise ValueError(f"inputs {sorted(declared - expected)} unexpected, {sorted(expected - declared)} "
                             "missing (this loop drives a plain KV-cache layout)")
        cache_type = next(i.type for i in session.get_inputs() if i.name == self.past_names[0])
        self.cache_dtype = np.float16 if "float16" in cache_type else np.float32
        self.empty_cache_shape = (1, kv_heads, 0, head_dim)
        self.present_names = self.output_names[1:]

    @classmethod
    def optimum_layout(cls, session: Any, share_buffer: bool = False, device: str = "cpu") -> "PlainOnnxLoop | None":
        """The loop for a graph with optimum's input and output names (what llmopt's ONNX exporter writes), its
        layer count and cache shape read from the graph's own inputs; None when the session's inputs are another
        layout (e.g. a merged decoder with use_cache_branch, or a cache without fixed head sizes)."""
        inputs = {i.name: i for i in session.get_inputs()}
        layers = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
        first = inputs.get("past_key_values.0.key")
        if first is None or len(first.shape) != 4 or not all(isinstance(d, int) for d in first.shape[1::2]):
            return None
        try:
            return cls(session, layers=layers, kv_heads=first.shape[1], head_dim=first.shape[3],
                       ids_name="input_ids", mask_name="attention_mask",
                       position_name="position_ids" if "position_ids" in inputs else None,
                       logits_name="logits", past_formats=("past_key_values.%d.key", "past_key_values.%d.value"),
                       present_formats=("present.%d.key", "present.%d.value"), share_buffer=share_buffer,
                       device=device)
        except ValueError:
            return None

    def _token_feeds(self, ids: np.ndarray, past: int) -> dict[str, np.ndarray]:
        """ids (1, T) after `past` tokens: the ids, the mask over past + T and, where the graph takes them, the
        positions."""
        feeds = {self.ids_name: ids, self.mask_name: np.ones((1, past + ids.shape[1]), dtype=np.int64)}
        if self.position_name:
            feeds[self.position_name] = np.arange(past, past + ids.shape[1], dtype=np.int64)[None]
        return feeds

    def _forward(self, ids: np.ndarray, cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """ids (1, T) after `cache` (past tokens) -> logits (1, T, V) float32 and the new cache."""
        feeds = {**self._token_feeds(ids, cache[0].shape[2]), **dict(zip(self.past_names, cache))}
        logits, *present = self.session.run(self.output_names, feeds)
        return logits.astype(np.float32, copy=False), present

    def _empty_cache(self) -> list[np.ndarray]:
        return [np.zeros(self.empty_cache_shape, dtype=self.cache_dtype) for _ in self.past_names]

    def _chunks(self, length: int) -> list[tuple[int, int]]:
        """(start, end) of the prefill's pieces: one unless prefill_chunk is set and shorter."""
        step = self.prefill_chunk or length
        return [(start, min(start + step, length)) for start in range(0, length, max(step, 1))] or [(0, 0)]

    def _prefill(self, ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """ids (T,) -> logits (T, V) and the cache after them, a chunk at a time (prefill_chunk)."""
        ids = ids[None].astype(np.int64)
        cache, parts = self._empty_cache(), []
        for start, end in self._chunks(ids.shape[1]):
            logits, cache = self._forward(ids[:, start:end], cache)
            parts.append(logits[0])
        return (parts[0] if len(parts) == 1 else np.concatenate(parts)), cache

    def logits(self, ids: np.ndarray) -> np.ndarray:
        return self._prefill(ids)[0]  # (T, V)

    def generate(self, ids: np.ndarray, new_tokens: int) -> np.ndarray:
        """Greedy, with the KV cache, exactly `new_tokens` tokens (no stop at end-of-sequence, as TorchRunner)."""
        if self.share_buffer:
            return self._generate_in_place(ids, new_tokens)[0]
        out = [int(t) for t in ids]
        prefill, cache = self._prefill(ids)
        logits = prefill[None]
        for step in range(new_tokens):
            token = int(logits[0, -1].argmax())
            out.append(token)
            if step + 1 < new_tokens:
                logits, cache = self._forward(np.array([[token]], dtype=np.int64), cache)
        return np.asarray(out, dtype=np.int64)

    def decode_logits(self, ids: np.ndarray, prefill: int) -> np.ndarray:
        """As generate() decodes, through the same cache handling, with the tokens given instead of chosen."""
        ids = ids.astype(np.int64)
        if self.share_buffer:
            return self._generate_in_place(ids[:prefill], len(ids) - prefill, forced=ids[prefill:])[1]
        _, cache = self._prefill(ids[:prefill])
        steps = []
        for t in range(prefill, len(ids)):
            logits, cache = self._forward(ids[None, t:t + 1], cache)
            steps.append(logits[0, -1])
        return np.stack(steps)

    def _generate_in_place(self, ids: np.ndarray, new_tokens: int,
                           forced: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """generate() with each layer's cache in one buffer that the graph updates in place (share_buffer).

        A decode step binds only its attention mask (the one input whose shape grows). The token and its
        position live in arrays bound once and written in place, and the logits, (1, 1, vocab) at every step,
        in one bound buffer that is read directly. So no step allocates its output or wraps the cache outputs
        again (get_outputs): 0.35 -> 0.11 ms of Python between two SmolLM2 fp32 runs of 20.8 ms here.

        With `forced`, token i fed is forced[i] instead of the greedy choice, and the logits after each forced
        token come back too, (len(forced), V): cached decoding checked against a reference on known tokens."""
        import onnxruntime as ort

        if new_tokens < 1:
            return ids.astype(np.int64), None
        batch, heads, _, head_dim = self.empty_cache_shape
        capacity = len(ids) + new_tokens  # room for every position this call feeds
        shape = (batch, heads, capacity, head_dim)
        if self.device == "cpu":
            buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=self.cache_dtype))
                       for _ in self.past_names]
        else:  # on the GPU, so that no step copies the cache (GroupQueryAttention reads the filled positions only)
            buffers = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.cache_dtype, self.device, 0)
                       for _ in self.past_names]
        binding = self.session.io_binding()
        for past, present, buffer in zip(self.past_names, self.present_names, buffers):
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)
        for start, end in self._chunks(len(ids)):  # each chunk after the cache the ones before it left in place
            for name, value in self._token_feeds(ids[None, start:end].astype(np.int64), start).items():
                binding.bind_cpu_input(name, value)
            binding.bind_output(self.logits_name, "cpu")  # the chunk's logits: (1, end - start, vocab)
            self.session.run_with_iobinding(binding)
            prefill_logits = binding.get_outputs()[-1].numpy()  # bound last, so listed last
        first = int(forced[0]) if forced is not None else int(prefill_logits[0, -1].argmax())
        out = [*(int(t) for t in ids), first]
        steps = []

        # An OrtValue made from a numpy array shares its memory: writing the array changes what is bound.
        token, position = np.zeros((1, 1), dtype=np.int64), np.zeros((1, 1), dtype=np.int64)
        step_logits = np.empty((1, 1, prefill_logits.shape[-1]), dtype=prefill_logits.dtype)
        mask = np.ones((1, capacity), dtype=np.int64)
        binding.bind_ortvalue_input(self.ids_name, ort.OrtValue.ortvalue_from_numpy(token))
        if self.position_name:
            binding.bind_ortvalue_input(self.position_name, ort.OrtValue.ortvalue_from_numpy(position))
        binding.bind_ortvalue_output(self.logits_name, ort.OrtValue.ortvalue_from_numpy(step_logits))
        # Forced: one more step, for the logits after the last forced token.
        for seen in range(len(ids), capacity - (forced is None)):
            token[0, 0], position[0, 0] = out[-1], seen
            binding.bind_cpu_input(self.mask_name, mask[:, :seen + 1])
            self.session.run_with_iobinding(binding)
            if forced is not None:
                steps.append(step_logits[0, -1].astype(np.float32))
                if seen + 1 < capacity:
                    out.append(int(forced[seen + 1 - len(ids)]))
            else:
                out.append(int(step_logits[0, -1].argmax()))
        return np.asarray(out, dtype=np.int64), np.stack(steps) if steps else None


class OrtRunner:
    """An ONNX artifact folder (model.onnx in optimum's layout, as llmopt writes it) in PlainOnnxLoop, on the asked
    provider (the CPU when it is not available, and said so through `provider`)."""

    runtime = "onnxruntime"

    def __init__(self, folder: Path, threads: int | None = None, provider: str = "CPUExecutionProvider", *,
                 memory_arena: bool = True, prefill_chunk: int | None = None) -> None:
        import onnxruntime as ort

        from llmopt.exporters.onnx_genai import shares_kv_buffer

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # Off for a check of long sequences beside a model that is never whole (a streamed run): the CPU arena keeps
        # each run's peak scratch, so a long prefill and then the cached decode's prefill stacked 3.8 GB twice at
        # 7B shapes (4080 tokens, 32 heads); without it they take turns. On for speed measurements.
        options.enable_cpu_mem_arena = memory_arena
        if provider not in ort.get_available_providers():  # e.g. CUDA asked of the CPU package: run, and say so
            provider = "CPUExecutionProvider"
        providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(Path(folder) / "model.onnx"), options, providers=providers)
        self.threads = threads or _cpu_count()
        # What the session runs on: onnxruntime falls back to the CPU when CUDA's libraries fail to load.
        self.provider = self.session.get_providers()[0]
        device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        loop = PlainOnnxLoop.optimum_layout(self.session, shares_kv_buffer(folder), device)
        if loop is None:
            raise ValueError(f"{folder}: model.onnx does not take input_ids, attention_mask and "
                             "past_key_values.<i>.key/.value of fixed head sizes")
        loop.prefill_chunk = prefill_chunk
        self.loop = loop

    def logits(self, ids: np.ndarray) -> np.ndarray:
        return self.loop.logits(ids)

    def generate(self, ids: np.ndarray, new_tokens: int) -> np.ndarray:
        return self.loop.generate(ids, new_tokens)

    def decode_logits(self, ids: np.ndarray, prefill: int) -> np.ndarray:
        return self.loop.decode_logits(ids, prefill)


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_runner(folder: Path, fmt: str, threads: int | None = None, provider: str = "CPUExecutionProvider", *,
                memory_arena: bool = True, prefill_chunk: int | None = None) -> Runner:
    """A runner for an artifact folder written by one of the exporters, on the provider's device (`memory_arena`:
    onnxruntime's CPU arena, see OrtRunner; `prefill_chunk`: ONNX only, see PlainOnnxLoop)."""
    from llmopt.devices import torch_device

    if fmt == "onnx":
        return OrtRunner(folder, threads, provider, memory_arena=memory_arena, prefill_chunk=prefill_chunk)
    return TorchRunner.load(folder, threads, torch_device(provider))
