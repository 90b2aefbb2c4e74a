"""SignRound (`method: signround`): plain rounding as its start, the tuning lowering a layer's output error, the
codes the model runs, the pass against RTN, and the options' plan-time checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmopt.passes.quantize import QuantizeConfig, QuantizePass, quantize_rtn
from llmopt.passes.quantize_signround import TunedRounding, layer_calls, tune_layer
from llmopt.state import ModelState, PassContext
from tests.conftest import tiny_llama


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True)])
def test_untuned_signround_is_rtn(bits, symmetric):
    # Offsets 0 and clipping 1: the codes, scales and zero points of RTN, so tuning starts from plain rounding
    # and the exporters read the same layout.
    torch.manual_seed(0)
    w = torch.randn(24, 128) * 0.05
    codes = TunedRounding(w, bits, 32, symmetric).codes()
    rtn = quantize_rtn(w, "w", "linear", QuantizeConfig(bits=bits, group_size=32, symmetric=symmetric))
    np.testing.assert_array_equal(codes["codes"].numpy(), rtn.codes)
    np.testing.assert_array_equal(codes["zero_points"].numpy(), rtn.zero_points)
    np.testing.assert_allclose(codes["scales"].numpy(), rtn.scales, rtol=1e-6)


def _layer_calls(model, windows):
    """Decoder layer 0 of `model` and its tuning data on `windows`: each window's (args, kwargs, float output)."""
    from llmopt.passes.layerwise import capture_layer_inputs, run_layer

    layer = model.model.layers[0]
    with torch.no_grad():
        inputs = capture_layer_inputs(model, windows)
        return layer, layer_calls(inputs, 0, run_layer(layer, 0, inputs).hidden)


def test_tuning_lowers_the_layer_output_error_and_its_codes_are_what_it_measured(tiny_tokenizer):
    model = tiny_llama(num_hidden_layers=1, intermediate_size=256)
    for p in model.parameters():
        p.requires_grad_(False)
    rng = np.random.default_rng(0)
    windows = [rng.integers(0, tiny_tokenizer.vocab_size, 64) for _ in range(8)]
    layer, calls = _layer_calls(model, windows)
    names = {n: 4 for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    codes, plain, tuned = tune_layer(layer, names, calls, group_size=32, symmetric=True, iters=60, lr=1 / 60,
                                     batch_size=4, seed=0)
    print(f"layer output MSE: plain rounding {plain:.3e}, tuned {tuned:.3e}")
    assert tuned < 0.8 * plain, (plain, tuned)
    # The returned codes, dequantized into the layer, give the error it reports.
    quantize = QuantizePass(QuantizeConfig(method="signround", group_size=32, symmetric=True))
    for name, c in codes.items():
        quantize.set_codes(name, layer.get_submodule(name), c, bits=4)
    errors = []
    with torch.no_grad():
        for args, kwargs, target in calls:
            out = layer(*args, **kwargs)
            errors.append(float(torch.nn.functional.mse_loss(out[0] if isinstance(out, tuple) else out, target)))
    assert np.mean(errors) == pytest.approx(tuned, rel=1e-4)


def test_signround_pass_beats_rtn_on_a_tiny_model_and_records_its_codes(tiny_tokenizer):
    from tests.passes.test_quantize import quantized_against_float

    configs = {"rtn": QuantizeConfig(method="rtn", bits=4, group_size=32, symmetric=True),
               "signround": QuantizeConfig(method="signround", iters=50, bits=4, group_size=32, symmetric=True)}
    results = quantized_against_float(tiny_tokenizer, configs, layers=2, windows=16)
    kl = {m: r[0] for m, r in results.items()}
    assert kl["signround"] < 0.9 * kl["rtn"], kl
    info = results["signround"][1]["quantize"]
    assert info["signround_layers"] == 2 and info["signround_iters"] == 50
    assert 0 < info["signround_output_error_vs_rtn"] < 1 and info["calibration_tokens"] == 16 * 128
    assert info["quantized_tensors"] == 2 * 7 + 1  # and lm_head, tuned too
    assert 0 < info["signround_lm_head_error_vs_rtn"] < 1


def test_each_layer_tunes_on_the_quantized_inputs_towards_the_float_models_activations(tiny_tokenizer, monkeypatch):
    # AutoRound's target: the float model's output of the layer, not the float layer's output on the quantized
    # inputs (GPTQ's), so a layer also corrects what the earlier layers' rounding moved.
    from llmopt.passes import quantize_signround

    model = tiny_llama(num_hidden_layers=3)
    rng = np.random.default_rng(0)
    windows = [rng.integers(0, tiny_tokenizer.vocab_size, 32) for _ in range(4)]
    with torch.no_grad():
        float_hidden = [model(input_ids=torch.as_tensor(w)[None], output_hidden_states=True).hidden_states
                        for w in windows]
    seen = []

    def recording(layer, names, calls, **kw):
        seen.append(calls)
        return tune_layer(layer, names, calls, **{**kw, "iters": 2})

    monkeypatch.setattr(quantize_signround, "tune_layer", recording)
    chosen = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}

    quantize = QuantizePass(QuantizeConfig(method="signround", group_size=32, symmetric=True))

    def store(name, module, codes):
        quantize.set_codes(name, module, codes, bits=4)

    quantize_signround.signround_decoder_layers(model, windows, chosen, store, lambda *_: None, bits_of=lambda _: 4,
                                                group_size=32, symmetric=True, iters=2, lr=0.5, batch_size=2, seed=0)
    assert len(seen) == 3
    for layer in (1, 2):  # hidden_states[k]: the input of layer k; the last one is after the final norm
        for w, (args, kwargs, target) in enumerate(seen[layer]):
            hidden = args[0] if args else kwargs["hidden_states"]
            assert not torch.allclose(hidden, float_hidden[w][layer], atol=1e-4)  # the quantized chain's input
            if layer + 1 < 3:
                torch.testing.assert_close(target, float_hidden[w][layer + 1], rtol=1e-4, atol=1e-5)


def test_lm_head_tunes_on_the_quantized_chain_towards_the_float_logits_and_a_tied_embedding_shares_its_codes(
        tiny_tokenizer, monkeypatch):
    # After the decoder layers, lm_head is tuned on the quantized model's final norm output towards the float
    # model's logits (AutoRound's quant_lm_head); the tied embedding is the same tensor and stores the same codes.
    from llmopt.passes import quantize_signround

    model = tiny_llama(tie=True)
    rng = np.random.default_rng(0)
    windows = [rng.integers(0, tiny_tokenizer.vocab_size, 64) for _ in range(8)]
    with torch.no_grad():
        float_logits = [model(input_ids=torch.as_tensor(w)[None]).logits for w in windows]
        # The chains start from the float embedding (quantized after the layers, with lm_head's codes when tied).
        float_embedded = [model.get_input_embeddings()(torch.as_tensor(w)[None]).clone() for w in windows]
        float_rtn = quantize_rtn(model.lm_head.weight, "w", "linear", QuantizeConfig(group_size=32)).codes
    head_calls = []

    def recording(layer, names, calls, **kw):
        if "" in names:  # the targets are computed when used: read them before the tuning quantizes the weight
            head_calls.extend((args[0], quantize_signround._target(target)) for args, _, target in calls)
        return tune_layer(layer, names, calls, **kw)

    monkeypatch.setattr(quantize_signround, "tune_layer", recording)
    config = QuantizeConfig(method="signround", iters=40, group_size=32, symmetric=True, embeddings=True)
    state = QuantizePass(config).run(ModelState(model, tiny_tokenizer), PassContext(calibration=lambda: windows))

    assert len(head_calls) == len(windows)
    with torch.no_grad():
        for w, (head_input, target) in enumerate(head_calls):
            torch.testing.assert_close(target, float_logits[w], rtol=1e-4, atol=1e-5)
            quantized_final = model(inputs_embeds=float_embedded[w], output_hidden_states=True).hidden_states[-1]
            torch.testing.assert_close(head_input, quantized_final)  # the quantized layers, after the final norm
    head, embedding = state.quantized["lm_head.weight"], state.quantized["model.embed_tokens.weight"]
    assert embedding.kind == "embedding" and embedding.codes is head.codes and embedding.scales is head.scales
    assert not np.array_equal(head.codes, float_rtn)  # tuned, not plain rounding
    np.testing.assert_array_equal(model.lm_head.weight.detach().numpy(), head.dequantized())
    assert model.get_input_embeddings().weight is model.lm_head.weight
    assert 0 < state.pass_info["quantize"]["signround_lm_head_error_vs_rtn"] < 1


@pytest.mark.parametrize("model_type,overrides", [("gemma2", {"final_logit_softcapping": 0.5}),
                                                   ("cohere", {"logit_scale": 3.0}),
                                                   ("granite", {"logits_scaling": 4.0})])
def test_lm_head_loss_compares_the_familys_own_logits(model_type, overrides, monkeypatch):
    # lm_head's KL is taken on the logits the model outputs: after Gemma 2's soft-cap, Cohere's logit_scale,
    # Granite's logits_scaling (the Linear's raw output would weigh the tokens differently).
    from llmopt.passes import quantize_signround
    from tests.core.test_architectures import TINY_VOCAB, tiny

    model = tiny(model_type, **overrides)
    rng = np.random.default_rng(0)
    windows = [rng.integers(3, TINY_VOCAB, 32) for _ in range(2)]
    with torch.no_grad():
        expected = torch.cat([model(input_ids=torch.as_tensor(w)[None]).logits for w in windows])
    targets = []
    kl = quantize_signround.next_token_kl
    monkeypatch.setattr(quantize_signround, "next_token_kl",
                        lambda out, target: targets.append(target) or kl(out, target))
    quantize = QuantizePass(QuantizeConfig(method="signround", group_size=16, symmetric=True))

    def store(name, module, codes):
        quantize.set_codes(name, module, codes, bits=4)

    # Only lm_head chosen: both chains are the float model's, so the target is its logits on the windows in order.
    quantize_signround.signround_decoder_layers(model, windows, {"lm_head"}, store, lambda *_: None,
                                                bits_of=lambda _: 4, group_size=16, symmetric=True, iters=2, lr=0.5,
                                                batch_size=2, seed=0)
    torch.testing.assert_close(targets[0], expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # and the family's transform matters here: lm_head's own output is not the logits
        raw = torch.cat([model.lm_head(model(input_ids=torch.as_tensor(w)[None], output_hidden_states=True)
                                       .hidden_states[-1]) for w in windows])
    assert (raw - expected).abs().max() > 0.1


def test_lm_head_tunes_on_fewer_windows_per_step_where_the_logits_would_be_too_large(tiny_tokenizer, monkeypatch):
    # A large vocabulary times long windows: lm_head's step holds at most HEAD_LOGITS_PER_STEP logits.
    from llmopt.passes import quantize_signround

    model = tiny_llama()
    windows = [np.arange(3, 67) for _ in range(6)]  # 64 tokens each
    monkeypatch.setattr(quantize_signround, "HEAD_LOGITS_PER_STEP", 2 * 64 * model.config.vocab_size + 1)
    batch_sizes = {}

    def recording(layer, names, calls, **kw):
        batch_sizes["lm_head" if "" in names else len(batch_sizes)] = kw["batch_size"]
        return tune_layer(layer, names, calls, **{**kw, "iters": 2})

    monkeypatch.setattr(quantize_signround, "tune_layer", recording)
    config = QuantizeConfig(method="signround", iters=2, batch_size=4, group_size=32, symmetric=True)
    QuantizePass(config).run(ModelState(model, tiny_tokenizer), PassContext(calibration=lambda: windows))
    assert batch_sizes == {0: 4, 1: 4, "lm_head": 2}


def test_signround_options_need_method_signround():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="iters applies to method: signround only"):
        QuantizeConfig(method="gptq", iters=100)
    with pytest.raises(ValidationError, match="signround tunes weight-only quantization"):
        QuantizeConfig(method="signround", bits=8, activations="int8")
    assert QuantizePass(QuantizeConfig(method="signround")).needs_calibration


@pytest.mark.slow
def test_a_streamed_signround_recipe_reports_the_tuning(tiny_model_dir, fast_recipe, tmp_path):
    import json

    import llmopt

    recipe = fast_recipe(f"model: {tiny_model_dir}\npasses:\n  - type: quantize\n    method: signround\n"
                         "    iters: 20\ncalibration:\n  samples: 4\n  seq_len: 32\n"
                         "export:\n  format: onnx\n  streaming: true\n")
    result = llmopt.optimize(recipe, output=tmp_path / "out")

    report = json.loads((tmp_path / "out/report.json").read_text())
    info = report["passes"][0]["info"]
    assert result.passed and info["streaming"] is True and info["method"] == "signround"
    assert info["signround_layers"] == 2 and info["signround_iters"] == 20 and info["calibration_tokens"] == 4 * 32
    # Tuning keeps plain rounding where it cannot beat it, so neither error exceeds plain rounding's.
    assert 0 < info["signround_output_error_vs_rtn"] <= 1 and 0 < info["signround_lm_head_error_vs_rtn"] <= 1
    assert report["optimized"]["perplexity"] > 0 and (tmp_path / "out/model.onnx").exists()


def _families():
    from tests.core.test_architectures import FAMILIES

    return sorted(FAMILIES)


@pytest.mark.parametrize("model_type", _families())
def test_windows_of_one_length_tune_as_one_batch_on_every_family(model_type):
    # The tuning stacks a batch of windows into one call with the first window's other arguments (positions,
    # rotary tables, masks): on every family that must give each window's own output; windows of different
    # lengths go one by one.
    from llmopt.passes.quantize_signround import _shared_arguments, _stacked
    from tests.core.test_architectures import TINY_VOCAB, tiny

    model = tiny(model_type)
    rng = np.random.default_rng(0)
    _, uneven = _layer_calls(model, [rng.integers(3, TINY_VOCAB, n) for n in (40, 24)])
    assert not _shared_arguments(uneven)
    layer, calls = _layer_calls(model, [rng.integers(3, TINY_VOCAB, 40) for _ in range(3)])
    assert _shared_arguments(calls)
    args, kwargs, target = _stacked(calls, [2, 0, 1])
    with torch.no_grad():
        out = layer(*args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(target, torch.cat([calls[j][2] for j in (2, 0, 1)]))
    torch.testing.assert_close(out, target, rtol=1e-4, atol=1e-5)
    # And the tuning runs through the family's layer (fused projections, experts): codes for every Linear.
    names = {n: 4 for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    for p in layer.parameters():
        p.requires_grad_(False)
    codes, plain, tuned = tune_layer(layer, names, calls, group_size=16, symmetric=True, iters=4, lr=0.05,
                                     batch_size=2, seed=0)
    assert set(codes) == set(names) and tuned <= plain
