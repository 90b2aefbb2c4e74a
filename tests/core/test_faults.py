"""Bad inputs and faults: each ends in one named paragraph, the documented exit code, no traceback, nothing
written outside the output folder, and a previous artifact left intact.

Covered elsewhere (not repeated here): unknown pass type with a suggestion and misspelt keys
(test_recipe.py, test_cli.py, test_exit_codes.py), `auto_map` without trust_remote_code and junk pickle bytes
(test_cli.py), an existing output without --force (test_cli.py), export validation beyond tolerance
(test_pipeline.py), disk full inside the exporter and two runs on one output (test_exit_codes.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import pytest

from tests.cli.test_cli import llmopt as run_cli
from tests.cli.test_exit_codes import run_main

FAST = ("evaluation:\n  max_tokens: 256\n  window: 64\n  speed: {prompt_tokens: 8, new_tokens: 4, runs: 1}\n"
        "calibration: {samples: 2, seq_len: 32}\n")
INT4 = "passes:\n  - type: quantize\n    bits: 4\n    group_size: 16\n"
TITLES = {2: "Recipe error", 3: "Input rejected", 4: "Result validation failed", 5: "Out of resources"}


def tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file and symlink under `folder` (symlinks by their target)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            found[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture()
def sandbox(tmp_path, monkeypatch):
    """tmp_path with the temp folder inside it, so a test sees every file a run leaves anywhere."""
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    return tmp_path


def fails_cleanly(monkeypatch, capsys, sandbox: Path, code: int, needles: tuple[str, ...], *args: str) -> str:
    """Run the CLI in this process; assert exit code, one titled paragraph naming `needles`, no traceback,
    and no file created, changed or removed anywhere under the sandbox."""
    before = tree(sandbox)
    got, err = run_main(monkeypatch, capsys, *args)
    print(err)
    assert got == code, (got, err)
    assert "Traceback" not in err
    paragraphs = [line for line in err.splitlines() if line.startswith(f"{TITLES[code]} (exit {code}): ")]
    assert len(paragraphs) == 1, err
    message = err[err.index(paragraphs[0]):]
    assert "\n\n" not in message.strip() and len(message.strip().splitlines()) <= 2, message  # message + hint
    for needle in needles:
        assert needle in message, (needle, message)
    assert tree(sandbox) == before  # nothing written, nothing left behind, the previous artifact intact
    return message


def previous_artifact(out: Path, files: dict[str, bytes | str]) -> Path:
    """A folder that llmopt wrote before: `files` and their manifest (what --force may replace)."""
    from llmopt.artifact import write_manifest

    out.mkdir()
    for name, content in files.items():
        (out / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    write_manifest(out, recipe={}, versions={}, seed=0)
    return out


def write_recipe(folder: Path, body: str = INT4 + "export: {format: safetensors}\n") -> Path:
    path = folder / "r.yaml"
    path.write_text(body + FAST, encoding="utf-8")
    return path


def optimize(monkeypatch, capsys, sandbox, model: Path | str, code: int, *needles: str, recipe: str | None = None,
             extra: tuple[str, ...] = ()) -> str:
    recipe_path = write_recipe(sandbox) if recipe is None else write_recipe(sandbox, recipe)
    return fails_cleanly(monkeypatch, capsys, sandbox, code, needles, "optimize", str(recipe_path), "--model",
                         str(model), "--output", str(sandbox / "out"), *extra)


# ----------------------------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """The tiny Llama saved in shards of 200 kB, with model.safetensors.index.json."""
    from tests.conftest import tiny_llama

    folder = tmp_path_factory.mktemp("sharded")
    tiny_llama().save_pretrained(folder, safe_serialization=True, max_shard_size="200KB")
    tiny_tokenizer.save_pretrained(folder)
    assert len(list(folder.glob("model-*.safetensors"))) >= 2
    return folder


@pytest.fixture()
def ckpt(sandbox, tiny_model_dir) -> Path:
    folder = sandbox / "ckpt"
    shutil.copytree(tiny_model_dir, folder)
    return folder


@pytest.fixture()
def sharded(sandbox, sharded_dir) -> Path:
    folder = sandbox / "sharded"
    shutil.copytree(sharded_dir, folder)
    return folder


def split(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's JSON header and data (the layout is 8-byte little-endian length, header, data)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data


def edit_index(folder: Path, edit) -> str:
    """Apply `edit(shard_name) -> new name` to the first shard of the index; return the original name."""
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = min(index["weight_map"].values())
    index["weight_map"] = {k: (edit(v) if v == first else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    return first


def test_truncated_safetensors(monkeypatch, capsys, sandbox, ckpt):
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    optimize(monkeypatch, capsys, sandbox, ckpt, 3, "model.safetensors' is not a valid safetensors file",
             "file not fully covered", "Re-download")


def test_header_longer_than_the_file(monkeypatch, capsys, sandbox, ckpt):
    weights = ckpt / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", 2 * len(raw)) + raw[8:])
    optimize(monkeypatch, capsys, sandbox, ckpt, 3, "not a valid safetensors file", "invalid header length")


def test_overlapping_tensor_offsets(monkeypatch, capsys, sandbox, ckpt):
    weights = ckpt / "model.safetensors"
    header, data = split(weights)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]  # two tensors on the same bytes
    weights.write_bytes(join(header, data))
    optimize(monkeypatch, capsys, sandbox, ckpt, 3, "not a valid safetensors file", "invalid offset")


def test_index_naming_a_parent_path(monkeypatch, capsys, sandbox, sharded):
    first = edit_index(sharded, lambda name: f"../{name}")
    shutil.copy(sharded / first, sandbox / first)  # the file exists out there: only its place is wrong
    optimize(monkeypatch, capsys, sandbox, sharded, 3, f"names '../{first}', which leads outside the checkpoint "
             "folder", "reads no weight file outside it")


def test_index_naming_an_absolute_path(monkeypatch, capsys, sandbox, sharded):
    outside = sandbox / "elsewhere.safetensors"
    first = edit_index(sharded, lambda name: str(outside))
    shutil.copy(sharded / first, outside)
    optimize(monkeypatch, capsys, sandbox, sharded, 3, f"names shard '{outside}', which is not a file name inside")


def test_shard_that_is_a_symlink_out_of_the_folder(monkeypatch, capsys, sandbox, sharded):
    first = min(sharded.glob("model-*.safetensors"))
    outside = sandbox / "outside.safetensors"
    shutil.move(first, outside)
    first.symlink_to(outside)
    optimize(monkeypatch, capsys, sandbox, sharded, 3, f"'{first}' leads outside the checkpoint folder")


def test_symlink_inside_the_folder_is_fine(sandbox, sharded):
    from llmopt.model import resolve_model

    first = min(sharded.glob("model-*.safetensors"))
    (sharded / "blobs").mkdir()
    shutil.move(first, sharded / "blobs" / "shard")
    first.symlink_to(sharded / "blobs" / "shard")  # like a hub snapshot: links that stay inside
    assert resolve_model(str(sharded)).kind == "local"


def test_missing_shard(monkeypatch, capsys, sandbox, sharded):
    first = min(sharded.glob("model-*.safetensors"))
    first.unlink()
    optimize(monkeypatch, capsys, sandbox, sharded, 3, f"names shard '{first.name}', which is missing",
             "Download or copy every shard")


def test_index_names_a_tensor_its_shard_lacks(monkeypatch, capsys, sandbox, sharded):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.extra.weight"] = min(index["weight_map"].values())
    index_path.write_text(json.dumps(index))
    optimize(monkeypatch, capsys, sandbox, sharded, 3, "holds 'model.extra.weight', but that shard has no such tensor")


def test_index_that_is_not_json(monkeypatch, capsys, sandbox, sharded):
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": {')
    optimize(monkeypatch, capsys, sandbox, sharded, 3, "model.safetensors.index.json' is not valid JSON")


def test_head_counts_that_disagree_with_the_weights(monkeypatch, capsys, sandbox, ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["num_key_value_heads"] = 1  # the weights have 2 KV heads of 16
    (ckpt / "config.json").write_text(json.dumps(config))
    optimize(monkeypatch, capsys, sandbox, ckpt, 3, "model.layers.0.self_attn.k_proj.weight has 32 rows, but "
             "config.json (num_attention_heads=4, num_key_value_heads=1, head_dim=16) needs 16")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weights(bad, monkeypatch, capsys, sandbox, ckpt):
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = bad
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    optimize(monkeypatch, capsys, sandbox, ckpt, 3, "has NaN or infinite values in 1 weight tensor(s): "
             "model.layers.1.mlp.up_proj.weight", "The checkpoint is damaged")


@pytest.fixture()
def pickle_ckpt(sandbox, tiny_tokenizer) -> Path:
    from tests.conftest import tiny_llama

    import torch

    folder = sandbox / "pickled"
    model = tiny_llama()
    model.config.save_pretrained(folder)  # transformers 5 saves safetensors only: the pickle written as older ones did
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "pytorch_model.bin")
    tiny_tokenizer.save_pretrained(folder)
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))
    return folder


def test_pickle_checkpoint_needs_allow_pickle_and_then_loads(monkeypatch, capsys, sandbox, pickle_ckpt):
    from llmopt.model import load_model, resolve_model

    optimize(monkeypatch, capsys, sandbox, pickle_ckpt, 3, "holds only pickle weights", "--allow-pickle")
    model, _ = load_model(resolve_model(str(pickle_ckpt), allow_pickle=True))  # a plain tensor pickle passes
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (32, 64)


def test_malicious_pickle_is_never_executed(monkeypatch, capsys, sandbox, pickle_ckpt):
    import torch

    marker = sandbox / "PWNED"

    class CreatesAFile:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # runs open(marker, "w") when unpickled by a plain pickle.load

    state = torch.load(pickle_ckpt / "pytorch_model.bin", weights_only=True)
    state["model.norm.weight"] = CreatesAFile()
    torch.save(state, pickle_ckpt / "pytorch_model.bin")
    message = optimize(monkeypatch, capsys, sandbox, pickle_ckpt, 3,
                       "pytorch_model.bin' was refused by torch's safe unpickler (weights_only=True): Unsupported "
                       "global: GLOBAL io.open was not an allowed global by default", "so it was not loaded",
                       extra=("--allow-pickle",))
    assert not marker.exists()
    assert "weights_only=False" not in message  # torch's advice to switch the check off is not passed on


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"},
                                 # No network: a hub that refuses connections at once (nothing leaves the machine).
                                 {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline", "unreachable"])
def test_uncached_hub_id_fails_within_seconds(env, sandbox):
    def timed(model: str):
        started = time.perf_counter()
        proc = run_cli("validate", "int4-onnx", "--model", model, env={"HF_HOME": str(sandbox / "hf"), **env},
                       timeout=60)
        return proc, time.perf_counter() - started

    # The same command on a missing local folder (no network involved): what starting the CLI costs on this
    # machine now, so that a loaded machine's slow start is not counted as waiting for the hub.
    local, start_up = timed(str(sandbox / "no-such-folder"))
    assert local.returncode == 3, local.stderr
    proc, elapsed = timed("no-such-org/no-such-model")
    print(f"{env}: {elapsed:.1f} s, the CLI's start {start_up:.1f} s", proc.stderr)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
    assert "Hub model 'no-such-org/no-such-model' is not" in proc.stderr and "local folder" in proc.stderr
    assert elapsed - start_up < 8, (elapsed, start_up)


# ---------------------------------------------------------------------------------------------------- recipes

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))


@pytest.mark.parametrize("text,needles", [
    ("seed: abc\n", ("r.yaml:1: seed: Input should be a valid integer", "(got 'abc')")),
    ("passes:\n  - type: quantize\n    bits: four\n", ("r.yaml:3: passes[0].bits",)),
    ("passes: {type: quantize}\n", ("r.yaml:1: passes must be a list of mappings",)),
    ("evaluation:\n  window: 4\n", ("r.yaml:2: evaluation.window: Input should be greater than or equal to 8",)),
    ("checks: {min_top1_agreement: 1.5}\n", ("checks.min_top1_agreement: Input should be less than or equal to 1",)),
    ("- type: quantize\n", ("a recipe must be a YAML mapping (key: value), got list",)),
    ("passes:\n  - quantize\n", ("passes[0] needs a 'type'",)),
    ("passes:\n  - type: [quantize]\n", ("r.yaml:2: passes[0].type: unknown pass type '['quantize']'",)),  # fuzz find
    ("", ("the recipe is empty",)),
    ("# nothing but a comment\n", ("the recipe is empty",)),
    (BOMB, ("YAML aliases (*name) are not allowed",)),
    ("seed: 0\n" + "# padding\n" * 120_000, ("is larger than 1 MiB",)),
    ("model: !!python/object/apply:os.system ['touch PWNED']\n", ("the recipe is not valid YAML",
                                                                  "could not determine a constructor")),
    ("passes:\n  - type: quantize\n  - type: prune\n    method: depth\n    num_layers: 1\n",
     ("passes[1].type: 'prune' cannot run after quantize (passes[0])", "Move quantize after prune")),
    ("passes:\n  - type: quantize\n  - type: gqa\n    num_key_value_heads: 1\n",
     ("passes[1].type: 'gqa' cannot run after quantize (passes[0])",)),
    (("passes:\n  - type: prune\n    method: width\n    mlp: 0.25\n    multiple_of: 16\n  - type: quantize\n"
      "    group_size: 64\n"), ("passes[1].group_size: 64 does not divide the model's input widths intermediate_size=96",)),
], ids=["wrong-type", "wrong-type-in-pass", "passes-not-a-list", "out-of-range", "out-of-range-check",
        "not-a-mapping", "pass-without-type", "type-is-a-list", "empty", "only-comments", "alias-bomb", "over-1-MiB", "python-tag",
        "prune-after-quantize", "gqa-after-quantize", "quantize-after-prune-misfits"])
def test_bad_recipe(text, needles, monkeypatch, capsys, sandbox, tiny_model_dir):
    recipe = sandbox / "r.yaml"
    recipe.write_text(text, encoding="utf-8")
    monkeypatch.chdir(sandbox)  # where a python tag's `touch` would land, were it ever run
    started = time.perf_counter()
    fails_cleanly(monkeypatch, capsys, sandbox, 2, needles, "optimize", str(recipe), "--model", str(tiny_model_dir),
                  "--output", str(sandbox / "out"))
    print(f"refused in {time.perf_counter() - started:.2f} s")


def test_recipe_that_is_not_utf8(monkeypatch, capsys, sandbox, tiny_model_dir):
    recipe = sandbox / "r.yaml"
    recipe.write_bytes(b"seed: \xff\xfe\n")
    fails_cleanly(monkeypatch, capsys, sandbox, 2, ("Cannot read recipe", "UTF-8 text file"), "validate",
                  str(recipe), "--model", str(tiny_model_dir))


# --------------------------------------------------------------------------------------------------- numerics

def test_a_pass_that_produces_nan_writes_nothing(monkeypatch, capsys, sandbox, tiny_model_dir):
    import torch

    from llmopt.passes.quantize import QuantizePass

    real_run = QuantizePass.run

    def poisoned(self, state, ctx):
        state = real_run(self, state, ctx)
        with torch.no_grad():
            state.model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
        return state

    monkeypatch.setattr(QuantizePass, "run", poisoned)
    out = previous_artifact(sandbox / "out", {"model.safetensors": "previous good artifact"})
    optimize(monkeypatch, capsys, sandbox, tiny_model_dir, 4, "Pass 'quantize' produced NaN or infinite values in 1 "
             "weight tensor(s): model.layers.0.mlp.down_proj.weight; nothing was written", extra=("--force",))
    assert (out / "model.safetensors").read_text() == "previous good artifact"


# ---------------------------------------------------------------------------------------------------- outputs

def unwritable_folders() -> list:
    chmod = pytest.param("chmod", marks=pytest.mark.skipif(
        os.geteuid() == 0, reason="root ignores folder permissions; the /sys case covers it"))
    sysfs = pytest.param("sysfs", marks=pytest.mark.skipif(
        not Path("/sys/kernel").is_dir(), reason="no sysfs (the chmod case covers it)"))
    return [chmod, sysfs]


@pytest.mark.parametrize("kind", unwritable_folders())
def test_unwritable_output_folder(kind, monkeypatch, capsys, sandbox, tiny_model_dir):
    if kind == "chmod":
        parent = sandbox / "read-only"
        parent.mkdir()
        parent.chmod(0o500)
    else:
        parent = Path("/sys/kernel")  # read-only for every user, root included
    recipe = write_recipe(sandbox)
    try:
        fails_cleanly(monkeypatch, capsys, sandbox, 2, (f"Cannot write next to '{parent / 'out'}'",
                                                        "Choose an --output in a folder you can write to"),
                      "optimize", str(recipe), "--model", str(tiny_model_dir), "--output", str(parent / "out"))
    finally:
        if kind == "chmod":
            parent.chmod(0o700)
    assert not (parent / "out").exists()


@pytest.mark.parametrize("force,needles", [((), ("already exists", "--force")),
                                           (("--force",), ("exists and is not a folder",))],
                         ids=["without-force", "with-force"])
def test_output_path_is_an_existing_file(force, needles, monkeypatch, capsys, sandbox, tiny_model_dir):
    (sandbox / "out").write_text("not a folder")
    optimize(monkeypatch, capsys, sandbox, tiny_model_dir, 2, *needles, extra=force)
    assert (sandbox / "out").read_text() == "not a folder"


def test_output_inside_a_file(monkeypatch, capsys, sandbox, tiny_model_dir):
    (sandbox / "file").write_text("x")
    recipe = write_recipe(sandbox)
    fails_cleanly(monkeypatch, capsys, sandbox, 2, ("Cannot create", "no writable folder on the way to it"), "optimize",
                  str(recipe), "--model", str(tiny_model_dir), "--output", str(sandbox / "file" / "out"))


@pytest.mark.slow
def test_stale_external_data_in_the_destination(monkeypatch, capsys, sandbox, tiny_model_dir):
    import onnx

    from llmopt.artifact import verify_manifest

    # with stale external weights of an older export
    out = previous_artifact(sandbox / "out", {"model.onnx": "previous artifact", "model.onnx.data": b"\0" * 4096})
    optimize(monkeypatch, capsys, sandbox, tiny_model_dir, 2, "already exists", "--force", recipe=INT4)  # intact
    recipe = sandbox / "r.yaml"  # ONNX (the default format)

    code, err = run_main(monkeypatch, capsys, "optimize", str(recipe), "--model", str(tiny_model_dir), "--output",
                         str(out), "--force")
    assert code == 0, err
    assert not (out / "model.onnx.data").exists()  # the new artifact does not pick up the stale file
    assert verify_manifest(out) == []
    onnx.load(str(out / "model.onnx"))  # self-contained: references no external data
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer)
    assert sorted(p.name for p in sandbox.iterdir()) == ["out", "r.yaml", "temp"]
    # Only onnxruntime's own telemetry-session file (its 1DS SDK's `.ses`, first-launch time and an id) stays in
    # the temp folder: llmopt's scratch and staging folders are gone.
    assert [p.name for p in (sandbox / "temp").iterdir()] in ([], [".ses"])


@pytest.mark.slow
def test_disk_full_while_writing_the_manifest_keeps_the_previous_artifact(monkeypatch, capsys, sandbox,
                                                                          tiny_model_dir):
    import llmopt.pipeline

    def full(folder, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "manifest.json"))

    monkeypatch.setattr(llmopt.pipeline, "write_manifest", full)
    previous_artifact(sandbox / "out", {"model.safetensors": "previous good artifact"})  # fails_cleanly: unchanged
    optimize(monkeypatch, capsys, sandbox, tiny_model_dir, 5, "The disk is full", "manifest.json); nothing was "
             "written", "Free space", extra=("--force",))


@pytest.mark.slow
def test_the_executable_prints_the_same_paragraph(sandbox):
    """`python -m llmopt` (not only the in-process entry point) prints the paragraph and nothing else."""
    recipe = write_recipe(sandbox, "passes:\n  - type: quantize\n  - type: prune\n    method: depth\n"
                                   "    num_layers: 1\n")
    proc = run_cli("validate", str(recipe), "--model", "demo")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("Recipe error (exit 2): passes[1].type: 'prune' cannot run after quantize"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 2 and proc.stdout == ""
