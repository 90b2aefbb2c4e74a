"""Property tests: no input makes the recipe loader or the checkpoint readers raise anything but llmopt's own
errors (which the CLI prints as one paragraph with an exit code). Each test prints how many inputs it ran."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmopt.checkpoint import SAFETENSORS_INDEX, check_checkpoint, read_safetensors_shapes, read_shard_index
from llmopt.errors import LlmoptError
from llmopt.recipe import parse_recipe

# database=None: no .hypothesis folder in the working tree; deadline=None: a shared 2-core machine is not a timer.
FUZZ = settings(max_examples=250, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
RECIPE_KEYS = ["model", "seed", "passes", "export", "evaluation", "calibration", "checks", "allow_pickle",
               "trust_remote_code", "type", "bits", "group_size", "method", "format", "validate", "window", "mlp",
               "num_layers", "num_key_value_heads", "speed", "threads", "max_kl", "exclude", "embeddings"]
PASS_TYPES = ["quantize", "prune", "gqa", "distill", "quantise"]

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
           | st.text(max_size=20) | st.sampled_from(PASS_TYPES))
keys = st.sampled_from(RECIPE_KEYS) | st.text(max_size=12) | st.integers(-5, 5) | st.booleans()
yamlish = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
                       max_leaves=25)
recipes = st.dictionaries(st.sampled_from(RECIPE_KEYS) | st.text(max_size=8), yamlish, max_size=6)
pass_lists = st.lists(st.dictionaries(st.sampled_from(RECIPE_KEYS), yamlish, max_size=5).map(
    lambda d: d if "type" in d else {**d, "type": "quantize"}), max_size=4)


class Counter:
    def __init__(self) -> None:
        self.runs = 0


@pytest.fixture()
def counted(request):
    counter = Counter()
    yield counter
    print(f"{request.node.name}: {counter.runs} inputs")


def only_llmopt_errors(call) -> None:
    try:
        call()
    except LlmoptError as exc:
        assert exc.message and exc.exit_code in (2, 3), exc


def test_recipe_loader_on_any_text(counted):
    @FUZZ
    @given(st.text(max_size=400) | st.binary(max_size=400).map(lambda b: b.decode("latin-1")))
    def check(text):
        counted.runs += 1
        only_llmopt_errors(lambda: parse_recipe(text, where="fuzz.yaml"))

    check()


@pytest.mark.slow
def test_recipe_loader_on_any_yaml_structure(counted):
    import yaml

    @FUZZ
    @given(recipes, pass_lists)
    def check(data, passes):
        counted.runs += 1
        if passes:
            data = {**data, "passes": passes}
        text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
        only_llmopt_errors(lambda: parse_recipe(text, where="fuzz.yaml"))

    check()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def header_files():
    """Bytes laid out as a safetensors file (length, JSON header, data) with fuzzed header values."""
    entry = st.fixed_dictionaries({}, optional={
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "F64", "BOOL", "X"]) | st.integers(),
        "shape": st.lists(st.integers(-2, 2**40), max_size=3) | st.text(max_size=3),
        "data_offsets": st.lists(st.integers(-2, 2**64), max_size=3) | st.none(),
    })
    header = st.dictionaries(st.text(max_size=8), entry | yamlish, max_size=4)

    @st.composite
    def build(draw):
        blob = json.dumps(draw(header)).encode()
        length = draw(st.sampled_from([len(blob), len(blob) + 1, 0, 2**63]) | st.integers(0, 2**64 - 1))
        return struct.pack("<Q", length) + blob + draw(st.binary(max_size=64))

    return build()


def test_safetensors_reader_on_any_bytes(counted, scratch):
    path = scratch / "model.safetensors"

    @FUZZ
    @given(st.binary(max_size=300) | header_files())
    def check(data):
        counted.runs += 1
        path.write_bytes(data)
        only_llmopt_errors(lambda: read_safetensors_shapes(path))

    check()


def test_shard_index_reader_on_any_json(counted, scratch):
    folder = scratch / "index"
    folder.mkdir()
    (folder / "a.safetensors").write_bytes(b"")
    shard_names = st.sampled_from(["a.safetensors", "../a.safetensors", "/etc/passwd", "", ".", "b", "a\x00b"]) | st.text(max_size=12)
    index = (st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=8), shard_names | yamlish,
                                                                 max_size=4)}).map(json.dumps)
             | yamlish.map(json.dumps) | st.text(max_size=200))

    @FUZZ
    @given(index)
    def check(text):
        counted.runs += 1
        (folder / SAFETENSORS_INDEX).write_text(text, encoding="utf-8", errors="surrogatepass")
        only_llmopt_errors(lambda: read_shard_index(folder, SAFETENSORS_INDEX))

    check()


def test_checkpoint_check_on_any_weights_and_config(counted, scratch):
    """The whole folder check: fuzzed weights, index and config together."""
    folder = scratch / "ckpt"
    folder.mkdir()
    configs = st.fixed_dictionaries({}, optional={"hidden_size": yamlish, "num_attention_heads": yamlish,
                                                  "num_key_value_heads": yamlish, "head_dim": yamlish})

    @FUZZ
    @given(st.binary(max_size=200) | header_files(), st.none() | st.text(max_size=100), configs)
    def check(weights, index_text, config):
        counted.runs += 1
        (folder / "model.safetensors").write_bytes(weights)
        (folder / SAFETENSORS_INDEX).unlink(missing_ok=True)
        if index_text is not None:
            (folder / SAFETENSORS_INDEX).write_text(index_text, encoding="utf-8", errors="surrogatepass")
        only_llmopt_errors(lambda: check_checkpoint(folder, config, allow_pickle=False))

    check()
