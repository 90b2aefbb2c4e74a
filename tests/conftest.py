"""Shared fixtures: tiny random-init Llama models (fast) and the real SmolLM2 (converted once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VOCAB = 384


def build_tiny_tokenizer():
    """A byte-level BPE trained on Python's docs: a real tokenizer with no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llmopt.evaluation.text import builtin_text

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([builtin_text()[:200_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>", model_input_names=["input_ids", "attention_mask"])


class ProgressRecorder:
    """A run's progress (llmopt's Progress protocol) kept for assertions: its steps, and each advance with the
    step it happened in."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.advances: list[tuple[str, int, int]] = []

    def step(self, name: str, total: int | None = None) -> None:
        self.steps.append(name)

    def advance(self, done: int, total: int) -> None:
        self.advances.append((self.steps[-1], done, total))

    def done(self, name: str, seconds: float) -> None:
        pass


def tiny_llama(tie: bool = False, **overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    settings = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    config = LlamaConfig(**{**settings, **overrides})
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama checkpoint folder (safetensors + tokenizer), written once per session."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def fast_recipe(tmp_path) -> callable:
    """Write a recipe whose evaluation is small enough for unit tests; returns its path."""

    def write(body: str = "", name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(body + "\nevaluation:\n  max_tokens: 256\n  window: 64\n"
                        "  speed: {prompt_tokens: 8, new_tokens: 4, runs: 1}\n", encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct, dequantized from its GGUF once and saved as safetensors."""
    from llmopt.model import load_model, resolve_model

    model, tokenizer = load_model(resolve_model("demo"))
    folder = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def assert_report_matches_schema(folder: Path) -> None:
    """report.json of an artifact folder validates against the committed docs/report.schema.json."""
    import json

    import jsonschema

    schema = json.loads((Path(__file__).resolve().parents[1] / "docs" / "report.schema.json").read_text())
    report = json.loads((Path(folder) / "report.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(report)


@pytest.fixture(scope="session", autouse=True)
def every_report_matches_the_schema(tmp_path_factory):
    """After the session: every report.json any test wrote validates against docs/report.schema.json."""
    yield
    reports = [p.parent for p in tmp_path_factory.getbasetemp().rglob("report.json")
               if not p.parent.name.startswith(".")]
    failures = []
    for folder in reports:
        try:
            assert_report_matches_schema(folder)
        except Exception as exc:  # jsonschema.ValidationError, or a report that is not JSON at all
            failures.append(f"{folder}: {str(exc).splitlines()[0]}")
    assert not failures, "reports that do not match docs/report.schema.json:\n" + "\n".join(failures)


OPTIMUM_OVERLAY = Path(os.environ.get("LLMOPT_OPTIMUM_OVERLAY", Path.home() / ".cache" / "llmopt-optimum-overlay"))


def optimum_generate(folder: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """optimum's ORTModelForCausalLM's greedy tokens for an ONNX folder, in a subprocess with optimum-onnx and its
    transformers < 4.58 laid over this environment (.ci/run installs them with `pip install --target`)."""
    import json
    import subprocess
    import sys

    if not (OPTIMUM_OVERLAY / "optimum" / "onnxruntime").is_dir():
        message = f"optimum-onnx is not installed in {OPTIMUM_OVERLAY} (see .ci/run)"
        if os.environ.get("LLMOPT_REQUIRE_OPTIMUM") == "1":  # CI installs it: the test must run, not skip
            pytest.fail(message)
        pytest.skip(message)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(OPTIMUM_OVERLAY), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "optimum_generate.py"), str(folder),
                           json.dumps([int(t) for t in prompt]), str(new_tokens)],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["transformers"].startswith("4.")  # the overlay, not this environment's transformers
    return result["tokens"]


def write_onnx(model, folder: Path, quantized: dict | None = None, **options) -> dict:
    """The direct writer's graph of a model in memory (its float weights, or the pass's codes where `quantized`
    has them) with its config.json: a folder OrtRunner loads."""
    from llmopt.blocks import model_blocks
    from llmopt.exporters.onnx_writer import write_decoder

    folder.mkdir(parents=True, exist_ok=True)
    info = write_decoder(model, model_blocks(model, quantized or {}), folder, **options)
    model.config.save_pretrained(folder)
    return info
