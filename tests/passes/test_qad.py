"""qad: trained scales (and codes) on a quantized tiny model, stored as the exporters' codes, plan-time refusals."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from llmopt.errors import RecipeError
from llmopt.passes.qad import QadConfig, QadPass
from llmopt.passes.quantize import QuantizeConfig, QuantizePass
from llmopt.state import ModelState, PassContext
from tests.conftest import TINY_VOCAB, tiny_llama


def windows(count: int = 16, length: int = 64, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, TINY_VOCAB, length).astype(np.int64) for _ in range(count)]


# Random tokens on a random model: what training learns there does not carry to other random windows, so the
# tests measure the objective on the training windows (held-out gains on real text: benchmarks/quantization.py).
TRAIN = windows()


def quantized(tie: bool = False, **quantize) -> tuple[ModelState, torch.nn.Module, PassContext]:
    """A tiny Llama, int4 RTN (groups of 16), its float copy as the teacher, and a context to train on."""
    teacher = tiny_llama(tie=tie)
    ctx = PassContext(seed=0, calibration=lambda: TRAIN, teacher=lambda: teacher)
    config = QuantizeConfig(group_size=16, **quantize)
    return QuantizePass(config).run(ModelState(copy.deepcopy(teacher), None), ctx), teacher, ctx


def kl_on_training_text(model, teacher) -> float:
    ids = torch.as_tensor(np.stack(TRAIN))
    with torch.no_grad():
        log_t = torch.log_softmax(teacher(input_ids=ids).logits.double(), -1)
        log_s = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
    return float((log_t.exp() * (log_t - log_s)).sum(-1).mean())


def qad(state: ModelState, ctx: PassContext, **config) -> ModelState:
    settings = {"steps": 40, "batch_size": 4, "lr": 1e-2, "eval_every": 10, "eval_fraction": 0,
                "precision": "fp32", **config}
    return QadPass(QadConfig(**settings)).run(state, ctx)


def assert_weights_are_the_stored_codes(state: ModelState) -> None:
    """What the exporters store (codes, scales, zero points) is exactly what the trained model computes with."""
    for name, qt in state.quantized.items():
        weight = state.model.get_parameter(name).detach()
        assert torch.equal(weight, torch.from_numpy(qt.dequantized())), name
        assert qt.codes.dtype == np.uint8 and int(qt.codes.max()) < 2**qt.bits


def test_training_the_scales_keeps_every_code_and_brings_the_model_closer_to_its_float_original():
    state, teacher, ctx = quantized()
    before = dict(state.quantized)
    kl_before = kl_on_training_text(state.model, teacher)
    state = qad(state, ctx)
    info = state.pass_info["qad"]
    kl_after = kl_on_training_text(state.model, teacher)
    print(f"KL {kl_before:.3e} -> {kl_after:.3e}; {info['trained_tensors']} tensors")
    assert kl_after < 0.8 * kl_before
    assert info["trained"] == "scales" and info["codes_changed"] == 0 and info["trained_tensors"] == 15  # lm_head too
    assert info["trainable_parameters"] == sum(qt.scales.size for qt in before.values())
    changed_scales = 0
    for name, qt in state.quantized.items():
        assert np.array_equal(qt.codes, before[name].codes) and np.array_equal(qt.zero_points, before[name].zero_points)
        changed_scales += int((qt.scales != before[name].scales).sum())
    assert changed_scales > 0.9 * info["trainable_parameters"]
    assert_weights_are_the_stored_codes(state)
    # The parametrizations are gone: the model has its plain Linear weights again, nothing left to train.
    assert not any("parametrizations" in n for n, _ in state.model.named_parameters())


def test_training_codes_too_moves_some_codes_to_neighbours_within_the_range():
    state, teacher, ctx = quantized(symmetric=False)
    before = dict(state.quantized)
    kl_before = kl_on_training_text(state.model, teacher)
    state = qad(state, ctx, train="scales_and_codes", lr=5e-2)
    info = state.pass_info["qad"]
    assert kl_on_training_text(state.model, teacher) < 0.8 * kl_before
    moved = [np.abs(qt.codes.astype(int) - before[n].codes.astype(int)) for n, qt in state.quantized.items()]
    assert info["codes_changed"] == sum(int((m > 0).sum()) for m in moved) > 0
    assert_weights_are_the_stored_codes(state)


def test_a_tied_quantized_embedding_and_head_train_one_table_and_stay_tied():
    state, teacher, ctx = quantized(tie=True, embeddings=True)
    before = dict(state.quantized)
    kl_before = kl_on_training_text(state.model, teacher)
    state = qad(state, ctx)
    info = state.pass_info["qad"]
    assert info["trained_tensors"] == 15  # 14 decoder Linears and the one shared table
    assert kl_on_training_text(state.model, teacher) < 0.8 * kl_before
    table, head = state.quantized["model.embed_tokens.weight"], state.quantized["lm_head.weight"]
    assert (table.kind, head.kind) == ("embedding", "linear")
    assert np.array_equal(table.scales, head.scales) and np.array_equal(table.codes, head.codes)
    assert not np.array_equal(table.scales, before["model.embed_tokens.weight"].scales)
    assert state.model.lm_head.weight is state.model.model.embed_tokens.weight
    assert_weights_are_the_stored_codes(state)


def test_held_out_best_step_never_leaves_the_model_worse_than_quantize_did():
    state, teacher, ctx = quantized()
    before = dict(state.quantized)
    state = qad(state, ctx, lr=50.0, steps=4, eval_every=2, eval_fraction=0.25, max_grad_norm=None)  # only harm
    info = state.pass_info["qad"]
    assert info["best_step"] == 0
    for name, qt in state.quantized.items():
        assert np.array_equal(qt.scales, before[name].scales)


def test_qad_is_refused_at_plan_time_without_an_earlier_weight_only_quantize():
    p = QadPass(QadConfig())
    with pytest.raises(RecipeError, match=r"passes\[0\]\.type: 'qad' trains the scales a quantize pass chose"):
        p.check_order([], "passes[0]")
    with pytest.raises(RecipeError, match="cannot follow W8A8"):
        p.check_order([QuantizeConfig(bits=8, activations="int8")], "passes[1]")
    p.check_order([QuantizeConfig()], "passes[1]")


def stored_integers_and_scales(folder, fmt: str) -> tuple[dict, dict]:
    """(codes, scales) by weight as the artifact stores them: MatMulNBits' inputs, or compressed-tensors'."""
    if fmt == "onnx":
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(folder / "model.onnx")).graph
        values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
        return {n.name: values[n.input[1]] for n in nodes}, {n.name: values[n.input[2]] for n in nodes}
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    return ({k.removesuffix("_packed"): v for k, v in tensors.items() if k.endswith("weight_packed")},
            {k.removesuffix("_scale"): v for k, v in tensors.items() if k.endswith("weight_scale")})


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "safetensors"])
def test_a_qad_recipe_stores_the_quantize_pass_codes_with_the_trained_scales(fmt, tiny_model_dir, tmp_path):
    """Through the pipeline, against the same recipe without qad: every stored code is the same, the scales are
    the trained ones (the artifact's validation compares it with the trained in-memory model)."""
    import llmopt
    from llmopt.recipe import EvaluationConfig

    quantize = {"type": "quantize", "group_size": 16}
    stored = []
    for passes in ([quantize], [quantize, {"type": "qad", "steps": 3, "eval_every": 3, "lr": 1e-2}]):
        recipe = llmopt.Recipe(passes=passes, export={"format": fmt}, calibration={"samples": 8, "seq_len": 32},
                               evaluation=EvaluationConfig(enabled=False))
        result = llmopt.optimize(recipe, model=str(tiny_model_dir), output=tmp_path / str(len(passes)))
        assert result.report.validation.passed
        stored.append(stored_integers_and_scales(result.output, fmt))
    info = {p.type: p.info for p in result.report.passes}["qad"]
    assert info["trained_tensors"] == 15 and info["steps_done"] == 3 and info["tokens_seen"] == 3 * 4 * 32
    (codes, scales), (trained_codes, trained_scales) = stored
    assert codes and codes.keys() == trained_codes.keys() == scales.keys() == trained_scales.keys()
    assert all(np.array_equal(codes[k], trained_codes[k]) for k in codes)
    assert sum(not np.array_equal(scales[k], trained_scales[k]) for k in scales) == len(scales)
