"""GPTQ, AWQ and SignRound on a streamed checkpoint: each decoder layer built alone from its tensors, calibrated,
quantized, handed to the writer and freed.

The model is instantiated without weights (`accelerate.init_empty_weights`: parameters on the meta device, the
rotary buffers real); the embedding table is read to turn the calibration windows into the first layer's
inputs, then each layer's tensors are read into its module, which runs on the calibration activations as the
earlier layers produced them. Peak memory is one layer in float32 plus the activations (samples x seq_len x
hidden, two sets with AWQ + GPTQ or SignRound; SignRound adds its tunables), whatever the depth.

The codes are those of the in-memory `quantize` pass, computed the same way in the same order: AWQ's scales are
searched on the float model's activations (the in-memory pass scales every layer before GPTQ starts), GPTQ's
Hessians on the activations of the already-quantized earlier layers. The two runs share one read of each layer,
with a set of activations each. SignRound carries the same two sets: each layer is tuned on the quantized set
against the float set's outputs, and lm_head (when quantized) last, on both sets through the final norm, its
codes kept for the final block (`plan.tuned`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from llmopt.passes.layerwise import capture_layer_inputs, layout, probe_layer, run_layer
from llmopt.passes.quantize import QuantizePass
from llmopt.passes.quantize_awq import AwqInputs, ScaleTotals, awq_search, group_probes, scale_layer
from llmopt.passes.quantize_gptq import layer_hessians, quantize_layer
from llmopt.passes.quantize_signround import (native_bfloat16, signround_info, signround_output_linear,
                                              tune_decoder_layer)

if TYPE_CHECKING:
    from llmopt.checkpoint_reader import CheckpointReader
    from llmopt.blocks import Block
    from llmopt.streaming import StreamPlan


def empty_model(folder: Any) -> Any:
    """The checkpoint's causal-LM module tree with its weights on the meta device (no memory) and its buffers
    (rotary frequencies) real, in float32 and eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmopt.experts import unfuse_experts

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    unfuse_experts(model)  # transformers 5's 3-D experts as the checkpoint names them: one Linear per expert
    return model.eval()


def calibrated_layer_blocks(plan: StreamPlan, reader: CheckpointReader) -> Iterator[Block]:
    """The embedding block, then each decoder layer's block with its Linears quantized by AWQ (+ RTN),
    (AWQ +) GPTQ or (AWQ +) SignRound on the plan's calibration windows, with its seed. `plan.pass_info`
    receives, once the last layer is done, what the report records (the pass's own keys); with SignRound,
    `plan.tuned` receives lm_head's codes."""
    from llmopt.blocks import Block

    q, windows, seed = plan.quantize, list(plan.windows or ()), plan.seed
    quantizer = QuantizePass(q)
    model = empty_model(reader.folder)
    arch = layout(model)
    embedding = reader.read("model.embed_tokens.weight")
    model.model.embed_tokens.weight = torch.nn.Parameter(embedding, requires_grad=False)
    with torch.no_grad():
        first_inputs = capture_layer_inputs(model, windows)
    model.model.embed_tokens.to("meta")
    yield Block("embedding", 0, {"model.embed_tokens.weight": embedding})
    del embedding

    signround = q.method == "signround"
    head = signround and "lm_head.weight" in plan.quantized
    float_inputs = first_inputs if q.awq or signround else None  # AWQ, SignRound's targets: the float model's
    quant_inputs = first_inputs if q.method != "rtn" else None  # GPTQ, SignRound: the quantized earlier layers'
    del first_inputs
    awq_totals, damping, ratios, bfloat16 = ScaleTotals(), {}, [], False
    for i in range(plan.num_layers):
        prefix = f"model.layers.{i}."
        layer = model.model.layers[i]
        names = reader.layer_names(i)
        layer.load_state_dict({n.removeprefix(prefix): reader.read(n) for n in names}, strict=True, assign=True)
        chosen = {n.removesuffix(".weight") for n in names if n in plan.quantized}
        last = i == plan.num_layers - 1
        with torch.no_grad():
            if q.awq:
                probes = group_probes(i, layer, arch, chosen, AwqInputs, seed=seed)
                probe_layer(layer, i, float_inputs, probes)
                awq_totals.add(*scale_layer(layer, arch, probes, awq_search(quantizer.awq_fake_quantize)))
            if signround or (q.awq and not last):  # the float layer (AWQ-scaled: the same function) on the float set
                float_out = run_layer(layer, i, float_inputs)
            codes = {}
            if q.method == "gptq":
                moments = layer_hessians(i, layer, arch, chosen)
                probe_layer(layer, i, quant_inputs, moments)

                def quantize_one(name: str, module: Any, hessian: torch.Tensor) -> float:
                    codes[f"{name}.weight"], damp = quantizer.gptq_linear(name, module, hessian)
                    return damp

                damping.update(quantize_layer(i, layer, moments, quantize_one))
                quant_inputs = None if last else run_layer(layer, i, quant_inputs)
        if signround:
            bfloat16 = native_bfloat16(layer)

            def store(name: str, module: Any, r: dict) -> None:
                codes[f"{name}.weight"] = quantizer.set_codes(name, module, r, q.bits)

            relative = {n.removeprefix(prefix): q.bits for n in chosen}
            if relative:
                ratios.append(tune_decoder_layer(layer, i, relative, quant_inputs, float_out.hidden, store,
                                                 **_signround_options(q), seed=plan.seed))
            with torch.no_grad():
                quant_inputs = None if last and not head else run_layer(layer, i, quant_inputs)
        if q.awq or signround:
            float_inputs = None if last and not head else float_out
            float_out = None
        tensors = {f"{prefix}{n}": t.detach() for n, t in layer.state_dict().items()}
        block = Block("layer", i, {n: codes[n] if n in codes else plan.stored(n, t) for n, t in tensors.items()})
        del tensors
        layer.to("meta")  # frees the layer's float weights once the writer has the block
        yield block
    head_ratio = None
    if head:
        plan.tuned["lm_head.weight"], head_ratio = _tuned_head(plan, reader, model, quantizer, quant_inputs,
                                                               float_inputs)
    if q.awq:
        plan.pass_info.update(awq_totals.awq_info())
    if q.method == "gptq":
        plan.pass_info.update(quantizer.gptq_info(damping, windows))
    if signround:
        plan.pass_info.update(signround_info(ratios, head_ratio, q.iters, bfloat16=bfloat16),
                              calibration_tokens=int(sum(len(w) for w in windows)))


def _signround_options(q: Any) -> dict[str, Any]:
    """The quantize config's SignRound settings, as the in-memory pass (QuantizePass._run_signround) passes them,
    with the fake-quantized weights recomputed in the backward pass (the same codes, with less memory)."""
    return {"group_size": q.group_size, "symmetric": q.symmetric, "iters": q.iters, "lr": q.lr or 1 / q.iters,
            "batch_size": q.batch_size, "low_memory": True}


def _tuned_head(plan: StreamPlan, reader: CheckpointReader, model: Any, quantizer: QuantizePass, quantized: Any,
                reference: Any) -> tuple[Any, float]:
    """SignRound on lm_head after the last layer: the final norm and lm_head (the embedding table when tied) read
    into the empty model, tuned on both sets of activations. Returns its codes and its error ratio."""
    from llmopt.architectures import FINAL_NORM

    norm = model.get_submodule(FINAL_NORM)
    norm.load_state_dict({n.removeprefix(f"{FINAL_NORM}."): reader.read(n) for n in reader.names()
                          if n.startswith(f"{FINAL_NORM}.")}, strict=True, assign=True)
    source = "lm_head.weight" if "lm_head.weight" in reader.names() else "model.embed_tokens.weight"
    model.lm_head.weight = torch.nn.Parameter(reader.read(source), requires_grad=False)  # untied from the table
    kept = {}

    def store(name: str, module: Any, r: dict) -> None:
        kept["codes"] = quantizer.set_codes(name, module, r, plan.quantize.bits)

    ratio = signround_output_linear(model, "lm_head", quantized, reference, store, bits=plan.quantize.bits,
                                    **_signround_options(plan.quantize), seed=plan.seed + plan.num_layers)
    norm.to("meta")
    model.lm_head.to("meta")
    return kept["codes"], ratio
