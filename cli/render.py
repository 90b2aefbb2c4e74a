"""Console output: errors as one paragraph, progress, tables. Plain text when not a terminal."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.table import Table

from llmopt.errors import LlmoptError

err_console = Console(stderr=True, highlight=False)
console = Console(highlight=False)


def print_error(exc: LlmoptError) -> None:
    text = exc.message + (f"\n{exc.hint}" if exc.hint else "")
    err_console.print(f"[bold red]{exc.title}[/] (exit {exc.exit_code}): {text}", soft_wrap=True)


class ConsoleProgress:
    """Pipeline progress: a rich spinner/bar on a terminal, one line per step elsewhere (CI logs)."""

    def __init__(self) -> None:
        self.interactive = err_console.is_terminal
        self._progress = None
        self._task = None
        self._started = 0.0

    def __enter__(self) -> "ConsoleProgress":
        if self.interactive:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                      TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                                      console=err_console, transient=False)
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def step(self, name: str, total: int | None = None) -> None:
        self._started = time.perf_counter()
        if self._progress is not None:
            self._task = self._progress.add_task(name, total=total)
        else:
            print(f"[llmopt] {name} ...", file=sys.stderr, flush=True)

    def advance(self, done: int, total: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=done, total=total)

    def done(self, name: str, seconds: float) -> None:
        if self._progress is not None and self._task is not None:
            task = self._progress.tasks[-1]
            self._progress.update(self._task, description=f"[green]✓[/] {name} ({seconds:.1f} s)",
                                  total=task.total or 1, completed=task.total or 1)
        else:
            print(f"[llmopt] {name} done in {seconds:.1f} s", file=sys.stderr, flush=True)


def table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    t = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*row)
    return t
