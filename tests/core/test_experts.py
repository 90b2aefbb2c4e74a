"""MoE experts one Linear each (llmopt.experts): transformers 5 keeps them as 3-D parameters; llmopt unfuses them
when a model enters a pipeline. The unfused model computes the same logits to the last bit, every view of the
weights (ModelState, the ONNX writer's blocks) names them as the hub's checkpoints do, and a saved folder loads
back in transformers 5, fused again, with the same logits."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from llmopt.experts import ExpertList, fused_expert_tensors, unfuse_experts
from tests.core.test_architectures import config_of, logits


def fused_moe():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config_of("qwen3_moe")).eval()


def test_unfused_experts_compute_the_same_logits_to_the_last_bit():
    model = fused_moe()
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.ndim == 3  # transformers 5's layout
    before = logits(model)
    count = experts.gate_up_proj.shape[0]
    assert unfuse_experts(model) == model.config.num_hidden_layers
    layer = model.model.layers[0].mlp.experts
    assert isinstance(layer, ExpertList) and len(layer) == count
    assert isinstance(layer[3].gate_proj, torch.nn.Linear)
    assert torch.equal(layer[3].gate_proj.weight, experts.gate_up_proj[3, :experts.gate_up_proj.shape[1] // 2])
    assert torch.equal(logits(model), before)
    assert unfuse_experts(model) == 0  # once


def test_every_view_names_experts_as_the_checkpoints_do():
    from llmopt.blocks import model_blocks
    from llmopt.state import ModelState
    from tests.conftest import build_tiny_tokenizer

    fused = fused_moe()
    names = {n: p.shape for n, p in fused.named_parameters()}
    expanded = fused_expert_tensors("model.layers.0.mlp.experts.gate_up_proj",
                                    fused.model.layers[0].mlp.experts.gate_up_proj)
    assert "model.layers.0.mlp.experts.0.up_proj.weight" in expanded
    blocks_fused = {n: t for b in model_blocks(fused, {}) for n, t in b.tensors.items()}
    state = ModelState(fused, build_tiny_tokenizer())  # unfuses in place
    unfused = dict(state.model.named_parameters())
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in unfused
    assert not any(n.endswith("experts.gate_up_proj") for n in unfused) and names.keys() != unfused.keys()
    blocks = {n: t for b in model_blocks(state.model, {}) for n, t in b.tensors.items()}
    assert blocks.keys() == blocks_fused.keys() and all(torch.equal(blocks[n], blocks_fused[n]) for n in blocks)


def test_a_saved_unfused_model_loads_back_fused_with_the_same_logits(tmp_path):
    model = fused_moe()
    before = logits(model)
    unfuse_experts(model)
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.experts.2.gate_proj.weight" in set(f.keys())  # the hub's per-expert names
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.model.layers[0].mlp.experts.gate_up_proj.ndim == 3
    assert torch.equal(logits(again), before)


def test_a_resumed_run_that_rebuilds_the_model_gets_per_expert_linears():
    """A resume checkpoint names experts one by one; a model rebuilt from a changed config (an untied head here)
    must have them so, or the strict load fails."""
    from llmopt.resume import _config_json, _model_for_config

    model = fused_moe()
    unfuse_experts(model)
    saved = _config_json(model.config)
    saved["tie_word_embeddings"] = not saved.get("tie_word_embeddings", False)
    rebuilt = _model_for_config(model, saved)
    assert rebuilt is not model and isinstance(rebuilt.model.layers[0].mlp.experts, ExpertList)
    assert set(model.state_dict()) - {"lm_head.weight"} <= set(rebuilt.state_dict())
