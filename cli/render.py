"""Console output: errors as one paragraph, progress, tables. Plain text when not a terminal."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.table import Table

from llmopt.errors import LlmoptError

err_console = Console(stderr=True, highlight=False)
console = Console(highlight=False)
QUIET, NORMAL, VERBOSE = -1, 0, 1
QUIET_ENVIRONMENT = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1",
                     "ORT_LOG_SEVERITY_LEVEL": "3"}
_verbosity = [NORMAL]  # the command line's -q / -v, set once by the app's callback


def set_verbosity(level: int) -> None:
    """-q: errors, warnings of llmopt's own and the final verdict only. Default: llmopt's progress, without the
    libraries' warnings, notices and progress bars (transformers' tokenizer notes, the GGUF conversion bar,
    onnxruntime's messages), which say nothing a user can act on. -v: all of them, as they come."""
    import logging
    import os
    import warnings

    _verbosity[0] = level
    if level >= VERBOSE:
        # Values a quiet llmopt put in this environment earlier (an in-process caller, a parent llmopt) go.
        for name, value in QUIET_ENVIRONMENT.items():
            if os.environ.get(name) == value:
                del os.environ[name]
        return
    # Read by the libraries when they are imported (inside the commands), so set before any of them loads;
    # a value the user set stays.
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for name in ("transformers", "onnxruntime", "torch", "accelerate", "huggingface_hub", "compressed_tensors"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")  # the libraries' DeprecationWarning/UserWarning/TracerWarning lines


def quiet() -> bool:
    return _verbosity[0] <= QUIET


def verbose() -> bool:
    return _verbosity[0] >= VERBOSE


def print_error(exc: LlmoptError) -> None:
    text = exc.message + (f"\n{exc.hint}" if exc.hint else "")
    err_console.print(f"[bold red]{exc.title}[/] (exit {exc.exit_code}): {text}", soft_wrap=True)


class ConsoleProgress:
    """Pipeline progress: a rich spinner/bar on a terminal, one line per step elsewhere (CI logs)."""

    def __init__(self) -> None:
        self.interactive = err_console.is_terminal and not quiet()
        self._progress = None
        self._task = None
        self._started = 0.0

    def __enter__(self) -> "ConsoleProgress":
        if self.interactive:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            # The count only where a step has one ("0/None" says nothing).
            counts = TextColumn("{task.fields[count]}")
            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), counts,
                                      TimeElapsedColumn(), console=err_console, transient=False)
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def step(self, name: str, total: int | None = None) -> None:
        self._started = time.perf_counter()
        if self._progress is not None:
            self._task = self._progress.add_task(name, total=total, count=f"0/{total}" if total else "")
        elif not quiet():
            print(f"[llmopt] {name} ...", file=sys.stderr, flush=True)

    def advance(self, done: int, total: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=done, total=total, count=f"{done}/{total}")

    def done(self, name: str, seconds: float) -> None:
        if self._progress is not None and self._task is not None:
            task = self._progress.tasks[-1]
            self._progress.update(self._task, description=f"[green]✓[/] {name} ({seconds:.1f} s)",
                                  total=task.total or 1, completed=task.total or 1)
        elif not quiet():
            print(f"[llmopt] {name} done in {seconds:.1f} s", file=sys.stderr, flush=True)


def table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    t = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*row)
    return t
