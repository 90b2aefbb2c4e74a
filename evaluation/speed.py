"""Speed and memory at batch 1 with the KV cache: prefill latency, decode tokens/s, peak RSS."""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass

import numpy as np

from llmopt.evaluation.runners import Runner


@dataclass
class SpeedScores:
    prefill_ms: float  # median time to the first new token for a prompt of `prompt_tokens`
    prefill_ms_spread: float  # max - min over runs
    decode_tokens_per_s: float  # median of (new_tokens - 1) / (t(new_tokens) - t(1))
    decode_tokens_per_s_spread: float
    prompt_tokens: int
    new_tokens: int
    runs: int
    threads: int


def measure_speed(runner: Runner, prompt: np.ndarray, new_tokens: int, runs: int) -> SpeedScores:
    # Timing generate() with 1 and with N new tokens and taking the difference isolates decode
    # steps from prefill on any runtime, without reaching into its internals.
    runner.generate(prompt, 2)  # warm-up: first-call allocations and kernel selection
    prefill, decode = [], []
    for _ in range(runs):
        start = time.perf_counter()
        runner.generate(prompt, 1)
        t_one = time.perf_counter() - start
        start = time.perf_counter()
        runner.generate(prompt, new_tokens)
        t_all = time.perf_counter() - start
        prefill.append(t_one * 1000)
        decode.append((new_tokens - 1) / max(t_all - t_one, 1e-9))
    return SpeedScores(
        prefill_ms=statistics.median(prefill),
        prefill_ms_spread=max(prefill) - min(prefill),
        decode_tokens_per_s=statistics.median(decode),
        decode_tokens_per_s_spread=max(decode) - min(decode),
        prompt_tokens=len(prompt),
        new_tokens=new_tokens,
        runs=runs,
        threads=getattr(runner, "threads", 0),
    )


class PeakRss:
    """Peak resident memory above the level at entry, sampled every few milliseconds.

    In-process, so it counts what loading and running one model adds (freed memory the allocator
    reuses makes it a slight under-estimate; a separate process would cost a second torch import).
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.start_bytes = self.peak_bytes = 0

    def __enter__(self) -> "PeakRss":
        # Re-entering keeps counting from the first entry: load and later runs share one peak.
        if not self.start_bytes:
            self.start_bytes = self.peak_bytes = self._process.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    @property
    def added_mb(self) -> float:
        return (self.peak_bytes - self.start_bytes) / 2**20
