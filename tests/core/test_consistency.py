"""A checkpoint that does not match its config, or a config whose values cannot describe a model, is refused
(exit 3, naming what is wrong) before any pass: never randomly initialised, dropped or silently reshaped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.core.test_faults import ckpt, optimize, sandbox  # noqa: F401 (fixtures)


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_weights(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors = {k: v.clone() for k, v in edit(tensors).items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_a_missing_tensor_is_not_randomly_initialised(monkeypatch, capsys, sandbox, ckpt):
    edit_weights(ckpt, lambda t: {k: v for k, v in t.items() if k != "model.layers.0.mlp.up_proj.weight"})
    optimize(monkeypatch, capsys, sandbox, ckpt, 3, "does not match its config", "1 tensor(s) the architecture needs "
             "are missing from the checkpoint (model.layers.0.mlp.up_proj.weight), so they would be random")


def test_a_layer_the_config_does_not_declare_is_not_dropped(monkeypatch, capsys, sandbox, ckpt):
    edit_weights(ckpt, lambda t: {**t, **{k.replace("layers.1.", "layers.2."): v for k, v in t.items()
                                          if ".layers.1." in k}})
    optimize(monkeypatch, capsys, sandbox, ckpt, 3, "9 tensor(s) of the checkpoint are not part of the architecture",
             "model.layers.2.", "so they would be dropped")


@pytest.mark.parametrize("model_type,needle", [("qwen3", "missing from the checkpoint (model.layers.0.self_attn.k_norm"),
                                               ("gpt2", "does not match its config")])
def test_a_model_type_that_does_not_match_the_weights(model_type, needle, monkeypatch, capsys, sandbox, ckpt):
    edit_config(ckpt, model_type=model_type)
    # No pass and safetensors: what plans on any family, so the load itself is what must refuse the checkpoint.
    optimize(monkeypatch, capsys, sandbox, ckpt, 3, needle, recipe="export: {format: safetensors}\n")


@pytest.mark.parametrize("change,needle", [
    ({"num_attention_heads": 0}, "num_attention_heads is 0; it must be a positive whole number"),
    ({"num_hidden_layers": -1}, "num_hidden_layers is -1"),
    ({"hidden_size": "64"}, "hidden_size is '64'"),
    ({"vocab_size": 384.0}, "vocab_size is 384.0"),
    ({"num_key_value_heads": 3}, "num_attention_heads (4) is not a multiple of num_key_value_heads (3)"),
    ({"rope_scaling": {"rope_type": "bogus", "factor": 2.0}}, "rope type 'bogus', which transformers does not know"),
    ({"rope_scaling": "linear"}, "rope_scaling is 'linear'; it must be a mapping"),
    ({"rms_norm_eps": -1e-5}, "rms_norm_eps is -1e-05; it must be a positive number"),
    ({"intermediate_size": None}, "intermediate_size is null; it must be a positive whole number"),
], ids=["heads-0", "layers-negative", "size-string", "vocab-float", "kv-heads-indivisible", "rope-unknown",
        "rope-not-a-mapping", "eps-negative", "size-null"])
def test_config_values_that_cannot_describe_a_model(change, needle, monkeypatch, capsys, sandbox, ckpt):
    edit_config(ckpt, **change)
    optimize(monkeypatch, capsys, sandbox, ckpt, 3, needle, "Restore the config.json")


def test_a_config_that_is_not_a_mapping(monkeypatch, capsys, sandbox, ckpt):
    (ckpt / "config.json").write_text("[1, 2]")
    optimize(monkeypatch, capsys, sandbox, ckpt, 3, "must be a JSON object (key: value), got list")
    (ckpt / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    optimize(monkeypatch, capsys, sandbox, ckpt, 3, "is not valid JSON")


@pytest.mark.parametrize("damage,needles", [
    ("missing", ("Cannot load the tokenizer", "copy them from the original checkpoint")),
    ("truncated", ("Cannot load the tokenizer", "tokenizer.json is not valid JSON")),
    ("remote-code", ("defined by the checkpoint's own Python code", "--trust-remote-code")),
])
def test_damaged_tokenizers(damage, needles, monkeypatch, capsys, sandbox, ckpt):
    tokenizer = ckpt / "tokenizer.json"
    if damage == "missing":
        tokenizer.unlink()
    elif damage == "truncated":
        tokenizer.write_text(tokenizer.read_text()[:500])
    else:
        path = ckpt / "tokenizer_config.json"
        config = json.loads(path.read_text())
        config["auto_map"] = {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}
        config["tokenizer_class"] = "CustomTokenizer"
        path.write_text(json.dumps(config))
    optimize(monkeypatch, capsys, sandbox, ckpt, 3, *needles)


@pytest.mark.slow
def test_the_real_model_loads_with_nothing_missing_or_unused():
    """The demo GGUF (tied embeddings, names converted by transformers) passes the check it is subject to."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmopt.consistency import check_loading_info
    from llmopt.model import resolve_model

    source = resolve_model("demo")
    _, info = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, output_loading_info=True,
                                                   **source.hf_kwargs())
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    check_loading_info(info, "demo")


@pytest.mark.parametrize("damage,needle", [
    ("missing", "1 tensor(s) the architecture needs are missing from the checkpoint (model.layers.0.mlp.up_proj"),
    ("extra", "1 tensor(s) of the checkpoint are not part of the architecture its config describes (model.layers.5."),
    ("reshaped", "1 tensor(s) have another shape than the config gives (model.layers.0.mlp.up_proj.weight)"),
])
def test_the_streaming_path_reads_only_a_consistent_checkpoint(damage, needle, monkeypatch, capsys, sandbox, ckpt):
    """The streaming path reads tensors by name itself, without transformers' loader: the headers are checked
    against the architecture at plan time."""
    def edit(t):
        up = "model.layers.0.mlp.up_proj.weight"
        if damage == "missing":
            del t[up]
        elif damage == "extra":
            t["model.layers.5.mlp.up_proj.weight"] = t[up]
        else:
            t[up] = t[up][:, :32]
        return t

    edit_weights(ckpt, edit)
    optimize(monkeypatch, capsys, sandbox, ckpt, 3, needle, recipe="passes:\n  - type: quantize\n    bits: 4\n"
             "    group_size: 16\nexport: {format: onnx, streaming: true}\n")
