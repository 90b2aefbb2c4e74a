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
    """Raised by the last layer's recorder: nothing after the decoder layers needs to run."""


class LayerInputs:
    """The calibration windows as one decoder layer sees them: each window's hidden states, and the other
    arguments the model passes each layer (mask, rotary tables, positions).

    Those arguments are recorded per layer, since they differ between layer types: Gemma 2/3's sliding layers
    get a windowed mask and local rotary tables, their full-attention layers the full mask and global tables.
    Layers of one type share the same tensors, so recording them all costs no memory.
    """

    def __init__(self, hidden: list[torch.Tensor], calls: list[list[tuple[tuple, dict]]]) -> None:
        self.hidden = hidden  # per window: (1, T, H)
        self.calls = calls  # per window, per layer: the (args, kwargs) of that layer's call

    def __bool__(self) -> bool:
        return bool(self.hidden)

    def of_layer(self, index: int) -> list[tuple[tuple, dict]]:
        """Each window's (args, kwargs) for layer `index`, with the current hidden states."""
        out = []
        for hidden, calls in zip(self.hidden, self.calls):
            args, kwargs = calls[index]
            out.append(((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden}))
        return out


def capture_layer_inputs(model: Any, batches: list[Any]) -> LayerInputs:
    """What each calibration window gives the decoder layers: the first layer's hidden states and every layer's
    other arguments.

    Each layer's forward is swapped for a recorder that hands its input on unchanged, so one cheap pass
    through the model (embedding, mask and rotary tables only) records the call of every layer, whatever the
    family builds per layer; a layer can then be run alone with what the model would have passed it.
    """
    layers = decoder_layers(model)
    hidden: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = []

    def recorder(index: int):
        def record(*args, **kwargs):
            calls[-1].append((args, kwargs))
            if index == len(layers) - 1:
                raise _Stop
            return args[0] if args else kwargs["hidden_states"]
        return record

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)  # an instance attribute: nn.Module.__call__ finds it before the class's
    try:
        for ids in batches:
            calls.append([])
            try:
                model.model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None], use_cache=False)  # (1, T)
            except _Stop:
                pass
            args, kwargs = calls[-1][0]
            hidden.append(args[0] if args else kwargs["hidden_states"])
    finally:
        for layer in layers:
            del layer.forward
    return LayerInputs(hidden, calls)


def run_layer(layer: nn.Module, index: int, inputs: LayerInputs) -> LayerInputs:
    """Each window through decoder layer `index`; its outputs become the next layer's hidden states."""
    hidden = []
    for args, kwargs in inputs.of_layer(index):
        out = layer(*args, **kwargs)
        hidden.append(out[0] if isinstance(out, tuple) else out)  # (1, T, H)
    return LayerInputs(hidden, inputs.calls)


def probe_layer(layer: nn.Module, index: int, inputs: LayerInputs, probes: dict[str, Any]) -> None:
    """Run the calibration inputs through layer `index` so that its probes' hooks see them, then remove the
    hooks."""
    if not probes:
        return
    try:
        with torch.no_grad():
            run_layer(layer, index, inputs)
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
    inputs = capture_layer_inputs(model, batches) if batches else LayerInputs([], [])
    for i, layer in enumerate(layers):
        probes = attach(i, layer) if inputs else {}
        probe_layer(layer, i, inputs, probes)
        yield i, layer, probes
        if inputs:
            with torch.no_grad():
                inputs = run_layer(layer, i, inputs)
        progress(i + 1, len(layers))
