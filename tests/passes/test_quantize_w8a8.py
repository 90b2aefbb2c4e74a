"""W8A8 (SmoothQuant + onnxruntime's integer matmul) and mixed int4/int8 precision."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from llmopt.errors import RecipeError
from llmopt.passes.quantize import QuantizeConfig, QuantizePass, quantize_rtn
from llmopt.quantized import dynamic_uint8, float_activations
from llmopt.state import ModelState, PassContext
from tests.conftest import tiny_llama
from tests.passes.test_quantize import _windows, _with_outlier_channels


def _quantized(tokenizer, model=None, **config):
    model = model if model is not None else _with_outlier_channels(tiny_llama())
    calibration = _windows(tokenizer, 100_000, 8, 128)
    state = QuantizePass(QuantizeConfig(**config)).run(ModelState(model, tokenizer),
                                                       PassContext(calibration=lambda: calibration))
    return state


def _export(state, folder):
    from llmopt.exporters.onnx import OnnxExporter
    from llmopt.recipe import ExportConfig

    return OnnxExporter(ExportConfig()).export(state, folder)


def test_dynamic_uint8_is_onnxruntime_dynamic_quantization():
    """The torch simulation and DynamicQuantizeLinear agree code for code on a tensor with an outlier."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(0)) * 3 + 0.5
    x[0, 3, 5] = 40.0
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "scale", "zero"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 32])],
                              [helper.make_tensor_value_info(n, t, None) for n, t in
                               (("q", TensorProto.UINT8), ("scale", TensorProto.FLOAT), ("zero", TensorProto.UINT8))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    q, scale, zero = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})
    expected = (q.astype(np.float32) - float(zero)) * float(scale)
    np.testing.assert_allclose(dynamic_uint8(x).numpy(), expected, rtol=0, atol=1e-5)


def test_w8a8_artifact_runs_the_pass_codes_in_integer_matmuls(tiny_tokenizer, tmp_path):
    from llmopt.evaluation.runners import TorchRunner, load_runner

    state = _quantized(tiny_tokenizer, bits=8, activations="int8")
    linears = [n for n, m in state.model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert all(state.quantized[f"{n}.weight"].group_size == state.quantized[f"{n}.weight"].shape[1] for n in linears)
    result = _export(state, tmp_path)
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    packed = result.info["packed_projections"]  # q/k/v and gate/up share one node each, same input quantization
    assert result.info["dynamic_quantize_matmul"] == len(linears)
    assert ops.count("DynamicQuantizeMatMul") == len(linears) - 2 * packed["qkv"] - packed["gate_up"]
    assert "MatMulNBits" not in ops and "Round" not in ops  # the simulation was not traced into the graph
    artifact, reference = load_runner(tmp_path, "onnx", 1), TorchRunner(state.model)
    for ids in _windows(tiny_tokenizer, 0, 3, 48):
        got, want = artifact.logits(ids), reference.logits(ids)
        assert np.abs(got - want).max() < 2e-3 * np.abs(want).max()
        assert (got.argmax(-1) == want.argmax(-1)).mean() == 1.0
    with float_activations():  # the simulation is what makes the torch model match the integer kernels
        plain = TorchRunner(state.model).logits(ids)
    assert np.abs(plain - want).max() > 10 * np.abs(got - want).max()


def test_smoothquant_leaves_the_float_model_unchanged_and_cuts_w8a8_error(tiny_tokenizer):
    from llmopt.evaluation.quality import compare_quality
    from llmopt.evaluation.runners import TorchRunner
    from llmopt.passes.quantize_smooth import apply_smoothquant

    evaluation = _windows(tiny_tokenizer, 0, 6, 128)
    model = _with_outlier_channels(tiny_llama())
    ids = torch.from_numpy(evaluation[0][None])
    with torch.no_grad():
        before = model(ids).logits
    chosen = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
    config = QuantizeConfig(bits=8, activations="int8")
    info = apply_smoothquant(model, _windows(tiny_tokenizer, 100_000, 8, 128), chosen,
                             lambda w: torch.from_numpy(quantize_rtn(w, "w", "linear", config,
                                                                     group_size=w.shape[1]).dequantized()),
                             lambda *_: None)
    with torch.no_grad():
        after = model(ids).logits
    assert float((after - before).abs().max() / before.abs().max()) < 1e-4
    assert info["smoothquant_output_error_ratio"] < 0.9 and any(a > 0 for layer in info["smoothquant_alpha_per_layer"] for a in layer)

    reference = TorchRunner(_with_outlier_channels(tiny_llama()))
    kl = {}
    for smooth in (False, True):
        state = _quantized(tiny_tokenizer, bits=8, activations="int8", smoothquant=smooth)
        kl[smooth] = compare_quality(reference, TorchRunner(state.model), evaluation).kl_divergence
    print(f"W8A8 KL vs float without / with SmoothQuant: {kl[False]:.6f} / {kl[True]:.6f}")
    assert kl[True] < 0.7 * kl[False], kl


@pytest.mark.parametrize("options, message", [
    ({"activations": "int8"}, "needs bits: 8"),
    ({"activations": "int8", "bits": 8, "group_size": 64}, "remove group_size"),
    ({"activations": "int8", "bits": 8, "awq": True}, "use smoothquant: true instead"),
    ({"smoothquant": True, "bits": 8}, "smoothquant applies to activations: int8 only"),
    ({"target_bits_per_weight": 4.5}, "between 5 (all 4-bit) and 9 (all 8-bit)"),
    ({"target_bits_per_weight": 6.0, "bits": 8}, "set bits: 4"),
])
def test_options_that_do_not_go_together_are_refused(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        QuantizeConfig(**options)


def test_w8a8_with_a_safetensors_export_is_refused_at_plan_time(tiny_model_dir, fast_recipe):
    from llmopt.pipeline import plan

    recipe = fast_recipe(f"model: {tiny_model_dir}\npasses:\n  - {{type: quantize, bits: 8, activations: int8}}\n"
                         "export: {format: safetensors}\n")
    with pytest.raises(RecipeError, match=r"passes\[0\]\.activations: int8 \(W8A8\).*needs export.format: onnx"):
        plan(recipe)


def test_choose_bits_spends_the_budget_on_the_most_kl_per_bit():
    from llmopt.passes.quantize_mixed import choose_bits

    sizes = {"a": 100, "b": 100, "c": 400, "d": 400}
    kl = {"a": 1.0, "b": 0.1, "c": 2.0, "d": 0.05}  # per weight: a 0.01, b 0.001, c 0.005, d 0.000125
    # Budget for 500 weights at +4 bits: a (100) then c (400) fit; b would exceed it.
    assert choose_bits(kl, sizes, 5.0, 9.0, 5.0 + 4.0 * 500 / 1000) == {"a", "c"}
    assert choose_bits(kl, sizes, 5.0, 9.0, 5.0) == set()
    assert choose_bits(kl, sizes, 5.0, 9.0, 9.0) == set(sizes)
    # c does not fit in a 300-weight budget, so the next layers by KL per bit take it.
    assert choose_bits(kl, sizes, 5.0, 9.0, 5.0 + 4.0 * 300 / 1000) == {"a", "b"}


def test_mixed_precision_meets_its_budget_and_beats_uniform_int4(tiny_tokenizer, tmp_path):
    from llmopt.evaluation.quality import compare_quality
    from llmopt.evaluation.runners import TorchRunner

    evaluation = _windows(tiny_tokenizer, 0, 6, 128)
    reference = TorchRunner(_with_outlier_channels(tiny_llama()))
    uniform = _quantized(tiny_tokenizer, bits=4, group_size=32)
    mixed = _quantized(tiny_tokenizer, bits=4, group_size=32, target_bits_per_weight=6.0)
    info = mixed.pass_info["quantize"]
    bits = info["bits_per_layer"]
    assert 5.0 < info["bits_per_weight"] <= 6.0 and set(bits.values()) == {4, 8}
    assert all(mixed.quantized[f"{n}.weight"].bits == b for n, b in bits.items())
    # The most sensitive Linear per weight is the first to get 8 bits.
    per_weight = {n: info["sensitivity_kl"][n] / mixed.quantized[f"{n}.weight"].codes.size for n in bits}
    assert bits[max(per_weight, key=per_weight.get)] == 8
    kl = {name: compare_quality(reference, TorchRunner(s.model), evaluation).kl_divergence
          for name, s in (("uniform", uniform), ("mixed", mixed))}
    print(f"KL int4 / mixed at {info['bits_per_weight']} bits per weight: {kl['uniform']:.5f} / {kl['mixed']:.5f}")
    assert kl["mixed"] < 0.8 * kl["uniform"]
    _export(mixed, tmp_path)
    # Weights of each bit width stored in MatMulNBits (packed siblings share a node, so count elements).
    stored: dict[int, int] = {}
    for node in onnx.load(str(tmp_path / "model.onnx")).graph.node:
        if node.op_type == "MatMulNBits":
            a = {x.name: x.i for x in node.attribute}
            stored[a["bits"]] = stored.get(a["bits"], 0) + a["N"] * a["K"]
    chosen: dict[int, int] = {}
    for n, b in bits.items():
        chosen[b] = chosen.get(b, 0) + mixed.quantized[f"{n}.weight"].codes.size
    assert stored == chosen
