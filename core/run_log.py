"""The run's log of what the libraries said: their warnings and notices go to `llmopt.log` in the artifact.

The terminal shows llmopt's own progress; transformers' tokenizer notes, torch's tracer warnings or
accelerate's messages say nothing a user can act on there, but they are kept, so that a surprising result
can be traced to them. `llmopt -v` (echo) shows them on the terminal as well.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOG_FILE = "llmopt.log"
# The loggers of the libraries a run drives (transformers' own handler is on "transformers").
LIBRARIES = ("transformers", "torch", "onnxruntime", "onnx", "onnx_ir", "onnxscript", "accelerate",
             "huggingface_hub", "compressed_tensors", "safetensors", "optimum")


@contextmanager
def library_log(path: Path, echo: bool) -> Iterator[None]:
    """Inside: the libraries' log records of WARNING and above, and Python warnings (each once per place), are
    appended to `path`; with `echo` they also reach the terminal as they would without this, otherwise not."""
    handler = logging.FileHandler(path, encoding="utf-8")  # created even when empty: every artifact has one
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.WARNING)
    warning_log = logging.getLogger("llmopt.library_warnings")
    saved = []  # (logger, level, propagate, [(console handler, level)])
    for logger in [warning_log, *map(logging.getLogger, LIBRARIES)]:
        saved.append((logger, logger.level, logger.propagate, [(h, h.level) for h in logger.handlers]))
        logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > logging.WARNING:
            logger.setLevel(logging.WARNING)  # e.g. TRANSFORMERS_VERBOSITY=error: record, then decide below
        if not echo:
            logger.propagate = False
            for console, _ in saved[-1][3]:
                console.setLevel(max(console.level, logging.ERROR))  # errors still show
    warning_log.propagate = False
    try:
        with warnings.catch_warnings():  # restores the filters and showwarning afterwards
            warnings.simplefilter("default")
            shown = warnings.showwarning

            def keep(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 (warnings' API)
                text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
                warning_log.warning("%s", text)
                if echo:
                    shown(message, category, filename, lineno, file, line)

            warnings.showwarning = keep
            yield
    finally:
        for logger, level, propagate, consoles in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
            for console, console_level in consoles:
                console.setLevel(console_level)
        handler.close()
