"""llmopt.run_log: the libraries' warnings and notices go to the artifact's log, and to the terminal only on -v."""

from __future__ import annotations

import logging
import warnings

import pytest

from llmopt.run_log import library_log


@pytest.mark.parametrize("echo", [False, True])
def test_library_records_and_python_warnings_are_kept_and_shown_only_when_echoed(echo, tmp_path, capsys):
    transformers_log = logging.getLogger("transformers.tokenization_utils")
    console = logging.StreamHandler()  # transformers' own handler sits on "transformers", at ERROR in llmopt's CLI
    root = logging.getLogger("transformers")
    level, root_level = console.level, root.level
    root.addHandler(console)
    root.setLevel(logging.ERROR)
    warnings.simplefilter("ignore")  # what llmopt's CLI sets outside a run
    shown_warnings = []
    warnings.showwarning = lambda message, *rest: shown_warnings.append(str(message))  # where they go without llmopt
    try:
        with library_log(tmp_path / "llmopt.log", echo=echo):
            transformers_log.warning("legacy behaviour of the tokenizer")
            transformers_log.info("loading file tokenizer.json")  # below WARNING: not kept
            for _ in range(2):  # the same place twice: kept once
                warnings.warn("a tracer warning", UserWarning, stacklevel=1)
        transformers_log.warning("after the run")  # the log is closed: nothing more is written to it
    finally:
        root.removeHandler(console)
        warnings.resetwarnings()
    log = (tmp_path / "llmopt.log").read_text()
    assert "WARNING transformers.tokenization_utils: legacy behaviour of the tokenizer" in log
    assert log.count("UserWarning: a tracer warning") == 1
    assert "loading file" not in log and "after the run" not in log
    shown = capsys.readouterr().err
    assert ("legacy behaviour" in shown) is echo and shown_warnings == (["a tracer warning"] if echo else [])
    # Everything is as it was: levels, handlers, filters.
    assert root.level == logging.ERROR and console.level == level and root.handlers.count(console) == 0
    ours = str(tmp_path / "llmopt.log")
    assert all(getattr(h, "baseFilename", None) != ours for name in ("transformers", "llmopt.library_warnings")
               for h in logging.getLogger(name).handlers)
    logging.getLogger("transformers").setLevel(root_level)


def test_an_empty_log_is_written_when_the_libraries_say_nothing(tmp_path):
    with library_log(tmp_path / "llmopt.log", echo=False):
        pass
    assert (tmp_path / "llmopt.log").read_text() == ""
