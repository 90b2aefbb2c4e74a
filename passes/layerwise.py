"""Layer-by-layer calibration: run one decoder layer at a time on captured inputs, and measure its Linears.

Shared by the passes that need each layer's inputs as the already-transformed earlier layers produce them
(SparseGPT/Wanda sparsity, GPTQ), so that memory is one layer plus the calibration activations.
Model-running code, imported inside pass run() methods only.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import nn

from llmopt.architectures import LAYERS, Architecture, require


def decoder_layers(model: Any) -> nn.ModuleList:
    return model.get_submodule(LAYERS)


def layout(model: Any) -> Architecture:
    """The model's family description (llmopt.architectures); the passes refuse undescribed families at plan
    time, so this only fails for a model handed to the Python functions directly."""
    return require(model.config.model_type, "layer-by-layer calibration", "model")


def input_groups(layer: nn.Module, arch: Architecture) -> list[tuple[str, nn.Module, list[str]]]:
    """(name of an op, that op, names of every Linear that reads its output) in one decoder layer, from the
    family's description: the Linears of a group see the same input."""
    return [(g.source, layer.get_submodule(g.source), list(g.linears)) for g in arch.layer_groups(layer)]


class _Stop(Exception):
    """Raised by the capture hook: nothing after the first layer needs to run."""


def capture_layer_inputs(model: Any, batches: list[Any]) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) each calibration window gives the first decoder layer.

    Capturing the call itself (hidden states, rotary embeddings, mask) lets every later layer be
    run alone with what the model would have passed it, on any architecture with this layout.
    """
    captured: list[tuple[tuple, dict]] = []

    def grab(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = decoder_layers(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model.model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None], use_cache=False)  # (1, T)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def run_layer(layer: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """Each window through one layer; the outputs become the next layer's inputs (the rest is shared)."""
    outputs = []
    for args, kwargs in inputs:
        out = layer(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out  # (1, T, H)
        if args:
            outputs.append(((hidden, *args[1:]), kwargs))
        else:
            outputs.append((args, {**kwargs, "hidden_states": hidden}))
    return outputs


def probe_layer(layer: nn.Module, inputs: list[tuple[tuple, dict]], probes: dict[str, Any]) -> None:
    """Run the calibration inputs through one layer so that its probes' hooks see them, then remove the hooks."""
    if not probes:
        return
    try:
        with torch.no_grad():
            run_layer(layer, inputs)
    finally:
        for probe in probes.values():
            probe.handle.remove()


class InputMoments:
    """Sum over calibration tokens of x_j^2 (Wanda) or of x x^T (SparseGPT's Hessian) for one Linear."""

    def __init__(self, module: nn.Linear, full: bool) -> None:
        n = module.weight.shape[-1]
        self.full = full
        self.moment = torch.zeros(n, n, dtype=torch.float32) if full else torch.zeros(n, dtype=torch.float32)
        self.tokens = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().float().reshape(-1, module.weight.shape[-1])  # (T, C)
        self.moment += x.T @ x if self.full else (x * x).sum(0)
        self.tokens += x.shape[0]


def measured_layers(model: Any, batches: list[Any], attach: Callable[[int, nn.Module], dict[str, Any]],
                    progress: Callable[[int, int], None]) -> Iterator[tuple[int, nn.Module, dict[str, Any]]]:
    """Each decoder layer in turn, measured on its calibration inputs as the earlier, already transformed
    layers produce them.

    `attach(i, layer)` puts probes on the layer ({key: probe}, each with the `handle` of its hook); the
    calibration inputs then run through the layer once, the probes are removed and yielded with the layer
    for the caller to transform it, and the transformed layer's outputs become the next layer's inputs.
    Memory is one layer plus the calibration activations, whatever the depth.
    """
    layers = decoder_layers(model)
    inputs = capture_layer_inputs(model, batches) if batches else []
    for i, layer in enumerate(layers):
        probes = attach(i, layer) if inputs else {}
        probe_layer(layer, inputs, probes)
        yield i, layer, probes
        if inputs:
            with torch.no_grad():
                inputs = run_layer(layer, inputs)
        progress(i + 1, len(layers))
