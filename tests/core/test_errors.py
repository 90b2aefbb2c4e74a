"""llmopt.errors.translate: library and system exceptions become the documented exit codes; what no row
matches stays a bug (exit 70). A real full disk (a small tmpfs) ends in exit 5 with the previous artifact intact;
LLMOPT_DEBUG is read as a yes/no, not as "set"."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import pytest

from llmopt.errors import ExitCode, InputError, RecipeError, ResourceError, translate
from tests.cli.test_exit_codes import run_main


def safetensor_error(text: str) -> Exception:
    from safetensors import SafetensorError

    return SafetensorError(text)


def protobuf_error() -> Exception:
    from google.protobuf.message import DecodeError

    return DecodeError("Error parsing message")


@pytest.mark.parametrize("make,kind,code,needle", [
    (lambda: OSError(errno.ENOSPC, "No space left on device", "/out/model.onnx"), ResourceError, 5,
     "The disk is full (/out/model.onnx)"),
    (lambda: OSError(errno.EDQUOT, "Disk quota exceeded"), ResourceError, 5, "The disk is full"),
    # safetensors and onnx's external-data writer drop the errno; their text still says it.
    (lambda: safetensor_error('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })'), ResourceError, 5, "The disk is full"),
    (lambda: Exception("[Errno 28] No space left on device"), ResourceError, 5, "The disk is full"),
    (lambda: MemoryError(), ResourceError, 5, "Ran out of memory"),
    (lambda: OSError(errno.EIO, "Input/output error", "/out/x"), ResourceError, 5, "I/O error"),
    (lambda: OSError(errno.EACCES, "Permission denied", "/root/x"), RecipeError, 2, "'/root/x': permission denied"),
    (lambda: OSError(errno.EROFS, "Read-only file system", "/ro/x"), RecipeError, 2, "read-only file system"),
    (lambda: FileNotFoundError(errno.ENOENT, "No such file", "/nowhere/x"), RecipeError, 2, "no such file"),
    (lambda: RecursionError("maximum recursion depth exceeded"), InputError, 3, "nested too deeply"),
    (lambda: b"\xff".decode("utf-8"), InputError, 3, "not UTF-8"),
    (lambda: safetensor_error("Error while deserializing header: HeaderTooLarge"), InputError, 3,
     "safetensors refused"),
    (protobuf_error, InputError, 3, "could not be parsed"),
])
def test_translation_table(make, kind, code, needle):
    try:
        exc = make()
    except Exception as raised:  # the decode error is raised, not built
        exc = raised
    typed = translate(exc)
    assert isinstance(typed, kind) and typed.exit_code == code, (exc, typed)
    assert needle in str(typed), str(typed)


@pytest.mark.parametrize("exc", [ValueError("a bug"), KeyError("k"), TypeError("t"), AttributeError("a"),
                                 OSError(errno.EBADF, "Bad file descriptor")])
def test_bugs_stay_bugs(exc):
    assert translate(exc) is None


@pytest.mark.parametrize("value,traceback", [("0", False), ("", False), ("no", False), ("false", False),
                                             ("1", True), ("yes", True), ("TRUE", True)])
def test_llmopt_debug_is_a_yes_or_no(value, traceback, monkeypatch, capsys, tmp_path):
    from llmopt.cli import main

    missing = str(tmp_path / "nowhere.yaml")
    monkeypatch.setattr(sys, "argv", ["llmopt", "validate", missing, "--model", "demo"])
    monkeypatch.setenv("LLMOPT_DEBUG", value)
    if traceback:
        with pytest.raises(RecipeError):  # re-raised for the traceback
            main()
        return
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == ExitCode.USAGE
    assert capsys.readouterr().err.startswith("Recipe error (exit 2): No recipe file")


def test_an_unexpected_library_error_is_translated_by_the_cli(monkeypatch, capsys, tmp_path, tiny_model_dir):
    """An exception that escapes a command (here a permission error raised deep inside) gets its paragraph."""
    import llmopt.inspect

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tiny_model_dir / "model.safetensors"))

    monkeypatch.setattr(llmopt.inspect, "inspect_model", denied)
    code, err = run_main(monkeypatch, capsys, "inspect", str(tiny_model_dir))
    assert code == 2 and err.startswith("Recipe error (exit 2): Cannot use ") and "permission denied" in err, err
    assert "Internal error" not in err and "Traceback" not in err


def can_mount_tmpfs() -> bool:
    if not shutil.which("unshare") or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


FULL_DISK_SCRIPT = """
set -u
mount -t tmpfs -o size={size} tmpfs "$DISK"
python - <<'PY'
import os
from pathlib import Path
from llmopt.artifact import write_manifest
out = Path(os.environ["DISK"]) / "out"
out.mkdir()
(out / "model.safetensors").write_text("previous good artifact")
write_manifest(out, recipe={{}}, versions={{}}, seed=0)
PY
python -m llmopt optimize "$RECIPE" --model "$MODEL" --output "$DISK/out" --force
echo "exit=$?"
python - <<'PY'
import os
from pathlib import Path
from llmopt.artifact import verify_manifest
disk = Path(os.environ["DISK"])
print("left:", sorted(p.name for p in disk.iterdir()))
print("previous:", (disk / "out" / "model.safetensors").read_text(), verify_manifest(disk / "out"))
PY
"""


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs root and mount namespaces (unshare) for a small tmpfs")
@pytest.mark.parametrize("fmt,passes", [("safetensors", "[]"), ("onnx", "[]"),
                                        ("onnx", "[{type: quantize, bits: 8, group_size: 16}]")],
                         ids=["safetensors-export", "onnx-export", "resume-checkpoint"])
@pytest.mark.slow
def test_a_real_full_disk_exits_5_and_keeps_the_previous_artifact(fmt, passes, tmp_path, tiny_model_dir):
    """The output lives on a 200 kB tmpfs: the fp32 artifact (or the resume checkpoint written after a pass)
    cannot fit. The writers' own errors (safetensors' SafetensorError, onnx's save) must reach the user as
    exit 5, not as an internal error."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"passes: {passes}\nexport: {{format: {fmt}}}\nevaluation: {{enabled: false}}\n")
    disk = tmp_path / "disk"
    disk.mkdir()
    temp = tmp_path / "temp"  # the baseline export goes to the temp folder, on the big disk
    temp.mkdir()
    env = {**os.environ, "DISK": str(disk), "RECIPE": str(recipe), "MODEL": str(tiny_model_dir), "TMPDIR": str(temp),
           "LLMOPT_SKIP_PREFLIGHT": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("LLMOPT_DEBUG", None)
    proc = subprocess.run(["unshare", "--mount", "sh", "-c", FULL_DISK_SCRIPT.format(size="200k")],
                          capture_output=True, text=True, env=env, timeout=600)
    print(proc.stdout, proc.stderr)
    assert "exit=5" in proc.stdout, (proc.stdout, proc.stderr)
    assert "Out of resources (exit 5): The disk is full" in proc.stderr
    assert "Traceback" not in proc.stderr and "Internal error" not in proc.stderr
    assert "left: ['out']" in proc.stdout  # no staging folder, backup or lock left on the full disk
    assert "previous: previous good artifact []" in proc.stdout
