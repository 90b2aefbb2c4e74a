"""The safetensors exporter: compressed-tensors pack-quantized storage of the pass's own codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmopt.evaluation.runners import TorchRunner
from llmopt.exporters.safetensors import SafetensorsExporter, split_packable
from llmopt.passes.quantize import QuantizeConfig, QuantizePass
from llmopt.recipe import ExportConfig
from llmopt.state import ModelState, PassContext
from tests.conftest import tiny_llama


# (bits, symmetric, tied embeddings, quantize the embedding, Linears packed, lm_head left in float)
CASES = [(4, True, True, True, 14, True),  # lm_head shares the quantized table, which stays a float table
         (8, True, False, False, 15, False),
         (4, True, True, False, 15, False),  # the pass unties lm_head to quantize it alone: packed
         (4, False, False, False, 15, False),  # asymmetric: zero points packed too (compressed-tensors >= 0.20)
         (8, False, True, False, 15, False)]


@pytest.mark.parametrize("bits,symmetric,tie,embeddings,n_packed,head_in_float", CASES)
def test_packed_folder_reloads_to_the_exact_quantized_model(bits, symmetric, tie, embeddings, n_packed, head_in_float,
                                                            tiny_tokenizer, tmp_path):
    from safetensors import safe_open

    model = tiny_llama(tie=tie)
    config = QuantizeConfig(bits=bits, group_size=32, symmetric=symmetric, embeddings=embeddings)
    state = QuantizePass(config).run(ModelState(model, tiny_tokenizer), PassContext())
    packed, rest = split_packable(state)
    result = SafetensorsExporter(ExportConfig(format="safetensors")).export(state, tmp_path)
    ignore = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["ignore"]

    ids = np.array(tiny_tokenizer("class A:\n    pass")["input_ids"])
    diff = np.abs(TorchRunner.load(tmp_path).logits(ids) - TorchRunner(model).logits(ids)).max()
    print(f"bits {bits} tie {tie} embeddings {embeddings}: packed {len(packed)}, float {len(rest)}, ignore {ignore}, "
          f"max |dlogit| {diff:.2e}")
    assert diff < 1e-4
    # ... and as a user loads it, with nothing but the folder
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        plain_logits = plain(torch.from_numpy(ids[None])).logits[0].numpy()
    assert np.abs(plain_logits - TorchRunner(model).logits(ids)).max() < 1e-4
    assert len(packed) == n_packed and result.info["packed_tensors"] == n_packed
    assert ignore == (["lm_head"] if head_in_float else [])
    assert len(rest) == (2 if head_in_float else 0)  # the embedding and lm_head records, stored as one float table
    scheme = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert scheme["weights"]["symmetric"] is symmetric and scheme["weights"]["num_bits"] == bits
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        zero_points = [n for n in f.keys() if n.endswith("weight_zero_point")]
        assert len(zero_points) == (0 if symmetric else n_packed)
        assert not any(n.endswith("up_proj.weight") for n in f.keys())  # no float copy of a packed weight


def test_nothing_quantized_writes_a_plain_folder(tiny_tokenizer, tmp_path):
    state = ModelState(tiny_llama(), tiny_tokenizer)
    result = SafetensorsExporter(ExportConfig(format="safetensors")).export(state, tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert result.info["quantized_storage"] == "none" and result.notes == []
    reloaded = TorchRunner.load(tmp_path).model
    assert torch.equal(reloaded.model.layers[0].mlp.up_proj.weight, state.model.model.layers[0].mlp.up_proj.weight)
