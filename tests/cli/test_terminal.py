"""What a person sees in a terminal: the README's first command's path (`llmopt optimize int4-onnx --model M
--output DIR`) on a tiny model, run in a pseudo-terminal (util-linux `script`), shows llmopt's progress, table
and verdict only (no library's warning or progress bar), and ends with the verdict and the report's path."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏✓"
TABLE = "┏┃┡│└"


def in_a_terminal(*args: str, env: dict | None = None) -> tuple[int, list[str], float]:
    """(exit code, the screen's lines without colour codes, seconds to the first byte on screen)."""
    command = " ".join([sys.executable, "-m", "llmopt", *args])
    from llmopt.cli.render import QUIET_ENVIRONMENT

    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160", **(env or {})}
    # What an in-process CLI test of this session left in the environment is not the user's.
    for name in ("LLMOPT_DEBUG", *QUIET_ENVIRONMENT):
        full_env.pop(name, None)
    started = time.perf_counter()
    proc = subprocess.Popen(["script", "-qfec", command, "/dev/null"], stdout=subprocess.PIPE, env=full_env)
    first = proc.stdout.read(1)
    first_byte = time.perf_counter() - started
    raw = (first + proc.stdout.read()).decode("utf-8", "replace")
    code = proc.wait(timeout=600)
    lines = [line.strip() for line in re.split(r"[\r\n]+", ANSI.sub("", raw)) if line.strip()]
    return code, lines, first_byte


def llmopt_line(line: str) -> bool:
    return (line[0] in SPINNER or line[0] in TABLE or line.startswith(("llmopt — ", "note: ", "DONE", "PASSED",
                                                                        "FAILED", "Quality checks failed"))
            # A finished step's bar, its spinner gone (rich's ━, not tqdm's █), e.g. "quality (perplexity, KL, top-1) ━━"
            or re.match(r"^[a-z][\w ()\-,./]* +━", line) is not None)


@pytest.fixture()
def chatty_model(tiny_model_dir, tmp_path):
    """The tiny model with a generation config that makes transformers talk (sampling settings without
    do_sample, as many checkpoints ship them): what a user's real model brings to the terminal."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "generation_config.json").write_text('{"do_sample": false, "temperature": 0.6, "top_p": 0.9, '
                                                    '"bos_token_id": 1, "eos_token_id": 2}')
    return folder


@pytest.mark.skipif(shutil.which("script") is None, reason="needs util-linux `script` for a pseudo-terminal")
@pytest.mark.slow
def test_the_first_command_shows_only_llmopt_and_ends_with_the_verdict(chatty_model, tmp_path):
    out = tmp_path / "out"
    code, lines, first_byte = in_a_terminal("optimize", "int4-onnx", "--model", str(chatty_model), "--output",
                                            str(out))
    print("\n".join(lines[-20:]), f"\nfirst byte after {first_byte:.2f} s")
    assert code in (0, 1), lines[-5:]  # 1: a random model may fail the recipe's quality gates
    strangers = [line for line in lines if not llmopt_line(line)]
    assert not strangers, strangers[:5]
    assert re.match(r"^(PASSED|FAILED) \(\d+ (of \d+ checks|of \d+ checks failed)\): perplexity .* report: "
                    + re.escape(str(out / "report.html")) + "$", lines[-1]), lines[-1]
    # What the terminal did not show is kept in the artifact's log (listed in its manifest).
    assert "generation" in (out / "llmopt.log").read_text()
    assert "llmopt.log" in json.loads((out / "manifest.json").read_text())["files"]

    # Run again: the existing output is refused at once, before anything loads.
    started = time.perf_counter()
    code, lines, _ = in_a_terminal("optimize", "int4-onnx", "--model", str(chatty_model), "--output", str(out))
    seconds = time.perf_counter() - started
    print(lines, f"{seconds:.2f} s")
    assert code == 2 and lines[0].startswith("Recipe error (exit 2): Output") and "--force" in lines[1]


@pytest.mark.skipif(shutil.which("script") is None, reason="needs util-linux `script` for a pseudo-terminal")
@pytest.mark.slow
def test_quiet_prints_the_verdict_only(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    code, lines, _ = in_a_terminal("-q", "optimize", "int4-onnx", "--model", str(tiny_model_dir), "--output", str(out))
    print(lines)
    assert code in (0, 1)
    assert [line for line in lines if not line.startswith("Quality checks failed")] == [lines[-1]]
    assert lines[-1].endswith(f"report: {out / 'report.html'}")


def test_version():
    proc = subprocess.run([sys.executable, "-m", "llmopt", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and re.fullmatch(r"llmopt \d+\.\d+\.\d+\n", proc.stdout), proc.stdout


@pytest.mark.skipif(shutil.which("script") is None, reason="needs util-linux `script` for a pseudo-terminal")
@pytest.mark.slow
def test_verbose_shows_the_libraries_messages(chatty_model, tmp_path):
    """-v lets the libraries speak (and shows the check above can see them)."""
    code, lines, _ = in_a_terminal("-v", "optimize", "int4-onnx", "--model", str(chatty_model), "--output",
                                   str(tmp_path / "out"))
    strangers = [line for line in lines if not llmopt_line(line)]
    print(strangers[:3])
    assert code in (0, 1) and any("generation" in line for line in strangers)
