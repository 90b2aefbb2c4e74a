"""A newcomer's path through the README's "Two commands" section, run as written on the real demo model.

The commands are read from README.md itself, so this test fails when the README drifts from what works. The
`pip install` parts are not run here: .ci/run runs them (checked below) before it runs this test.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Two commands"


def two_commands_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return text[start:end]


def bash_blocks(section: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)


def readme_commands() -> tuple[list[str], list[str], list[str]]:
    """(the install + first-run command split at &&, the test command split at &&, the newcomer's next lines)."""
    blocks = bash_blocks(two_commands_section())
    assert len(blocks) == 3, f"expected install+run, tests, and the change-and-compare blocks; found {len(blocks)}"
    first, tests, path = blocks
    lines = [line for line in path.splitlines() if line.strip()]
    return [c.strip() for c in first.split("&&")], [c.strip() for c in tests.split("&&")], lines


def pip_args(command: str) -> list[str] | None:
    """The arguments of a `pip install` or `python -m pip install` command, without --quiet; None for others."""
    words = shlex.split(command)
    if words[:3] == ["python", "-m", "pip"]:
        words = words[2:]
    if words[:2] != ["pip", "install"]:
        return None
    return [w for w in words[2:] if w not in ("--quiet", "-q")]


def ci_pip_installs() -> list[list[str]]:
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    found = [pip_args(line) for line in lines if not line.lstrip().startswith("#")]
    return [args for args in found if args is not None and args != ["--upgrade", "pip"]]


def installs_the_project(args: list[str]) -> bool:
    return any(a == "." or a.startswith(".[") for a in args)


def test_every_pip_install_of_the_readme_is_run_by_ci():
    first, tests, _ = readme_commands()
    readme = [args for c in first + tests if (args := pip_args(c)) is not None]
    ci = ci_pip_installs()
    print(f"README: {readme}\nCI: {ci}")
    assert len(readme) == 6, readme  # torch, the project, the demo model: in each of the two commands
    for args in readme:
        if installs_the_project(args) and "-e" not in args:
            # `pip install .`: CI installs the same project editable with its test extra (`-e .[test]`), so
            # the project is installed, but from the source tree rather than a built wheel.
            assert any(installs_the_project(c) for c in ci), f"CI does not install the project: {ci}"
        else:
            assert args in ci, f"the README runs `pip install {' '.join(args)}`, .ci/run does not: {ci}"


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """A README line in bash, with the `llmopt` installed beside this Python first on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    return subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], cwd=cwd, env=env, capture_output=True, check=False,
                          text=True, timeout=1800)


def output_of(command: str) -> str:
    words = shlex.split(command)
    return words[words.index("--output") + 1]


def markdown_rows(text: str) -> dict[str, list[str]]:
    """First cell -> the other cells of every Markdown table row."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows.setdefault(cells[0], cells[1:])
    return rows


def assert_report_md_carries_the_headline_numbers(folder: Path) -> dict:
    report = json.loads((folder / "report.json").read_text())
    rows = markdown_rows((folder / "report.md").read_text())
    headline = {"parameters": "parameters", "size on disk (MB)": "size_bytes", "perplexity": "perplexity",
                "decode (tokens/s)": "decode_tokens_per_s"}
    for label, key in headline.items():
        for side, cell in zip(("baseline", "optimized"), rows[label][:2]):
            expected = report[side][key] / (1e6 if key == "size_bytes" else 1)
            value, *spread = cell.split(" ±")  # timed figures carry their spread over runs
            # report.md rounds to 3 decimals, the spread to 3 significant digits
            assert float(value) == pytest.approx(expected, abs=6e-4), f"{folder.name} {label} {side}: {cell} vs {expected}"
            if key == "decode_tokens_per_s" and report[side].get(f"{key}_spread") is not None:
                assert float(spread[0]) == pytest.approx(report[side][f"{key}_spread"], rel=6e-3, abs=1e-9), cell
    md = (folder / "report.md").read_text()
    assert f"{report['quality']['kl_divergence']:.4f} nats/token" in md
    assert f"top-1 next-token agreement: {report['quality']['top1_agreement'] * 100:.2f}%" in md
    return report


@pytest.mark.slow
def test_the_newcomer_path_runs_as_written(tmp_path):
    first, _, path = readme_commands()
    runs = [c for c in first if c.startswith("llmopt ")]
    assert len(runs) == 1, first
    show, optimize, compare = path
    assert show.startswith("llmopt recipes show ") and optimize.startswith("llmopt optimize ")
    assert compare.startswith("llmopt compare ") and compare.endswith("--format md")

    for command in (runs[0], show, optimize):
        proc = run(command, tmp_path)
        print(f"$ {command}\n{proc.stdout[-1500:]}")
        assert proc.returncode == 0, f"`{command}` exited {proc.returncode}:\n{proc.stderr[-3000:]}"

    # "read out/int4-onnx/report.md": it is there and says what report.json says.
    report_md = re.search(r"read `([^`]+/report\.md)`", two_commands_section()).group(1)
    first_out, mine_out = Path(output_of(runs[0])), Path(output_of(optimize))
    assert Path(report_md).parent == first_out, (report_md, runs[0])
    first_report = assert_report_md_carries_the_headline_numbers(tmp_path / first_out)
    mine = assert_report_md_carries_the_headline_numbers(tmp_path / mine_out)

    # The changed recipe differs from the shipped one in the line the README's sed rewrites, and only there.
    shipped_name = shlex.split(show.split("|")[0])[-1]
    old, new = re.search(r"sed 's/([^/]+)/([^/]*)/'", show).groups()
    recipe_file = tmp_path / shlex.split(optimize)[2]
    shipped = subprocess.run([Path(sys.executable).parent / "llmopt", "recipes", "show", shipped_name],
                             capture_output=True, text=True, check=True).stdout.splitlines()
    changed = [line for line in difflib.ndiff(shipped, recipe_file.read_text().splitlines()) if line[:2] in ("- ", "+ ")]
    assert len(changed) == 2 and old in changed[0] and new in changed[1], changed
    key, old_value = (s.strip() for s in old.split(":"))
    new_value = new.split(":")[1].strip()

    # The second report shows the change: in its recipe, in the pass details of report.md, and in the numbers.
    assert str(first_report["recipe"]["passes"][0][key]) == old_value
    assert str(mine["recipe"]["passes"][0][key]) == new_value
    assert f"{key}={new_value}" in (tmp_path / mine_out / "report.md").read_text()
    size = (first_report["optimized"]["size_bytes"], mine["optimized"]["size_bytes"])
    kl = (first_report["quality"]["kl_divergence"], mine["quality"]["kl_divergence"])
    print(f"{key} {old_value} -> {new_value}: size {size[0] / 1e6:.1f} -> {size[1] / 1e6:.1f} MB, KL {kl[0]:.3f} -> "
          f"{kl[1]:.3f}, run {first_report['total_seconds']:.0f} -> {mine['total_seconds']:.0f} s")
    assert size[1] > size[0] and kl[1] < kl[0]  # what the README says: closer to the original, a little larger

    proc = run(compare, tmp_path)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = markdown_rows(proc.stdout)
    assert table["metric"] == [first_out.name, mine_out.name]  # compare names runs by their folders
    sizes = [float(cell.split(" ")[0]) for cell in table["size on disk (MB)"]]
    assert sizes == pytest.approx([s / 1e6 for s in size], rel=1e-3)
