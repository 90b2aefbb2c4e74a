"""SignRound for `type: quantize, method: signround`: each decoder layer's rounding and clipping tuned by signed
gradient descent on its output (Cheng et al. 2023, "Optimize Weight Rounding via Signed Gradient Descent for the
Quantization of LLMs"; the algorithm of Intel's AutoRound).

Model-running code, imported by QuantizePass.run only (torch at module scope is fine here).

Per decoder layer, in order: every chosen Linear gets a rounding offset v per weight (start 0) and two clipping
factors per group on the group's min and max (start 1, kept in [0, 1]). The layer with its weights fake-quantized
by them is run on a batch of windows as the already-quantized earlier layers produce them; the mean squared
difference from the float model's output of that layer (the float layer on the float model's own inputs) is
backpropagated through a straight-through round, and each tunable moves by lr * sign(gradient), lr falling linearly
to 0 over `iters` steps (so v stays within +-lr * iters / 2 = 0.5 at AutoRound's lr of 1 / iters). The tunables of
the step with the lowest loss are kept.

The target is the float model's activation, not the float layer's output on the quantized inputs (GPTQ's target):
so each layer also corrects what the earlier layers' rounding moved, as AutoRound does (`enable_quanted_input`,
its default). Two chains of calibration activations are carried through the layers for that: the float model's
and the quantized one's.

lm_head comes last when it is chosen (AutoRound's `quant_lm_head`): its input is the quantized chain's final norm,
its target the float model's logits, and its loss the KL divergence between the two next-token distributions, not
the logits' mean squared error (on SmolLM2 the latter, AutoRound's, cut that error by 20% and left the perplexity
where plain rounding had it). A tied embedding stores lm_head's codes, one tensor as in the builder's shared int4
embedding (AutoRound refuses a tied lm_head and leaves it float).

The codes use the same groups, scale and zero-point convention as RTN and GPTQ (passes/quantize.group_params):
only which integer each weight rounds to, and how far each group's range is clipped, change. So the exporters
store them unchanged (MatMulNBits, compressed-tensors).

Written here rather than called from auto-round: it pins its own transformers and model wrappers and hands back
packed checkpoints in its formats; the algorithm is a short loop on llmopt's own layer-by-layer calibration.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Container, Iterator
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from llmopt.architectures import FINAL_NORM, LAYERS, scalings
from llmopt.passes.layerwise import LayerInputs, capture_layer_inputs, decoder_layers, run_layer

SCALE_FLOOR = 1e-5  # smallest |scale| while tuning (a group clipped to nothing would divide by zero)
# Logits per tuning step of lm_head (512 MB in float32; a step holds about six tensors of that size): a vocabulary
# of 150k with windows of 2,048 tokens then tunes on one window per step instead of batch_size (tens of GB).
HEAD_LOGITS_PER_STEP = 2**27


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (the straight-through estimator)."""
    return (torch.round(x) - x).detach() + x


class TunedRounding:
    """One Linear's tunables and its fake-quantized weight."""

    def __init__(self, weight: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                 low_memory: bool = False) -> None:
        rows, cols = weight.shape
        self.shape, self.bits, self.symmetric, self.low_memory = weight.shape, bits, symmetric, low_memory
        self.w = weight.detach().float().reshape(rows, cols // group_size, group_size)  # (out, groups, g)
        self.lo = torch.clamp(self.w.amin(-1), max=0.0)  # (out, groups)
        self.hi = torch.clamp(self.w.amax(-1), min=0.0)
        self.v = torch.zeros_like(self.w, requires_grad=True)
        self.min_scale = torch.ones_like(self.lo, requires_grad=True)
        self.max_scale = torch.ones_like(self.hi, requires_grad=True)

    def tunables(self) -> list[torch.Tensor]:
        return [self.v, self.min_scale, self.max_scale]

    def group_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point per group, by group_params' convention, from the clipped range."""
        lo, hi = self.lo * self.min_scale, self.hi * self.max_scale
        levels = 2**self.bits - 1
        if self.symmetric:
            mid = 2 ** (self.bits - 1)
            if self.bits <= 4:  # the group's extreme, with its sign, maps to code 0 (all 2^bits levels used)
                scale = torch.where(hi >= -lo, hi, lo) / -mid
            else:
                scale = torch.maximum(hi, -lo) / (mid - 1)
            scale = torch.where(scale < 0, torch.clamp(scale, max=-SCALE_FLOOR), torch.clamp(scale, min=SCALE_FLOOR))
            return scale, torch.full_like(scale, mid)
        scale = torch.clamp((hi - lo) / levels, min=SCALE_FLOOR)
        return scale, torch.clamp(torch.round(-lo / scale), 0, levels).detach()

    def fake_quantized(self) -> torch.Tensor:
        """(out, in): the dequantized weight, differentiable in the tunables. With `low_memory` its intermediates
        (about 2.5 tensors the size of the weight, 2 GB on a 7B-shaped layer) are recomputed in the backward pass
        instead of kept: the same values, a quarter less memory and a quarter more time for a tuning step here."""
        if not (self.low_memory and torch.is_grad_enabled()):
            return self._fake_quantized()
        return checkpoint(self._fake_quantized, use_reentrant=False)

    def _fake_quantized(self) -> torch.Tensor:
        scale, zero = self.group_params()
        codes = torch.clamp(_round_ste(self.w / scale[..., None] + self.v) + zero[..., None], 0, 2**self.bits - 1)
        return ((codes - zero[..., None]) * scale[..., None]).reshape(self.shape)

    def codes(self) -> dict[str, torch.Tensor]:
        """The final integers: codes (out, in) uint8, scales (out, groups) float32, zero points uint8."""
        with torch.no_grad():
            scale, zero = self.group_params()
            codes = torch.clamp(torch.round(self.w / scale[..., None] + self.v) + zero[..., None], 0, 2**self.bits - 1)
        return {"codes": codes.reshape(self.shape).to(torch.uint8), "scales": scale.float().contiguous(),
                "zero_points": zero.to(torch.uint8)}

    def clamp_(self) -> None:
        with torch.no_grad():
            self.min_scale.clamp_(0.0, 1.0)
            self.max_scale.clamp_(0.0, 1.0)


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def tune_layer(layer: nn.Module, names: dict[str, int], calls: list[tuple[tuple, dict, torch.Tensor]], *,
               group_size: int, symmetric: bool, iters: int, lr: float, batch_size: int, seed: int,
               loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.mse_loss,
               low_memory: bool = False) -> tuple[dict[str, dict[str, torch.Tensor]], float, float]:
    """SignRound on the Linears `names` (relative to `layer`, with their bits): each call's (args, kwargs) through
    the layer, against its target output (the float model's, from signround_decoder_layers; a tensor, or a
    function that computes it). `loss(output, target)`: the output error, mean squared by default. `low_memory`:
    TunedRounding's, for the streamed schedule, whose peak is one layer's.
    Returns each Linear's codes and the layer's output error (over all the calls) with plain rounding and with
    the tuned one."""
    tuned = {n: TunedRounding(layer.get_submodule(n).weight, b, group_size, symmetric, low_memory)
             for n, b in names.items()}
    tunables = [t for r in tuned.values() for t in r.tunables()]

    batched = _shared_arguments(calls)
    fast_matmuls = autocast(layer)  # decided once per layer, entered on each tuning step
    exact = torch.autocast(next(layer.parameters()).device.type, enabled=False)

    def loss_on(indices: list[int], fast: bool = False) -> torch.Tensor:
        """The loss on the windows `indices`; `fast`: matmuls in bfloat16 where native (the tuning steps; the
        errors that choose and report the result are measured in float32, as the targets are)."""
        weights = {f"{n}.weight" if n else "weight": r.fake_quantized() for n, r in tuned.items()}
        if batched:  # one call on the windows stacked: larger matmuls, several times faster on a CPU
            with exact:
                args, kwargs, target = _stacked(calls, indices)
            with fast_matmuls if fast else exact:
                return loss(_output(functional_call(layer, weights, args, kwargs)).float(), target)
        total: Any = 0.0
        for j in indices:
            with exact:
                target = _target(calls[j][2])
            with fast_matmuls if fast else exact:
                total = total + loss(_output(functional_call(layer, weights, calls[j][0], calls[j][1])).float(), target)
        return total / len(indices)

    def error_on_all() -> float:
        """The float32 error over every window, a batch at a time (activations of one batch held, not of all)."""
        with torch.no_grad():
            chunks = [list(range(i, min(i + batch_size, len(calls)))) for i in range(0, len(calls), batch_size)]
            return sum(float(loss_on(c)) * len(c) for c in chunks) / len(calls)

    plain = error_on_all()
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    best, best_state = float("inf"), [t.detach().clone() for t in tunables]
    for step in range(iters):
        if len(order) < batch_size:  # a fresh permutation of the windows each epoch
            order = torch.randperm(len(calls), generator=generator).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        batch_loss = loss_on(batch, fast=True)
        batch_loss.backward()
        value = batch_loss.item()
        if value < best:  # the tunables this loss was measured with (AutoRound keeps the best step's)
            best, best_state = value, [t.detach().clone() for t in tunables]
        step_lr = lr * (1 - step / iters)  # linear decay to 0, as AutoRound's LinearLR
        with torch.no_grad():
            for t in tunables:
                t.add_(t.grad.sign(), alpha=-step_lr)
                t.grad = None
        for r in tuned.values():
            r.clamp_()
    with torch.no_grad():
        for t, kept in zip(tunables, best_state):
            t.copy_(kept)
        tuned_loss = error_on_all()
        if tuned_loss > plain:  # the best batch's tunables can lose on the whole set: plain rounding then
            for r in tuned.values():
                r.v.zero_(), r.min_scale.fill_(1.0), r.max_scale.fill_(1.0)
            tuned_loss = plain
    return {n: r.codes() for n, r in tuned.items()}, plain, tuned_loss


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """The module's own parameters out of autograd while it is tuned: the gradients go to the tunables only."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def native_bfloat16(module: nn.Module) -> bool:
    """Whether the module's device computes in bfloat16 natively (a CPU with AVX512-BF16 or AMX, most GPUs)."""
    device = next(module.parameters()).device.type
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    return device == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast(layer: nn.Module) -> torch.autocast:
    """The layer's matmuls in bfloat16 while tuning where that is native (AutoRound's default `amp`; 1.5-2x faster
    on a CPU with AVX512-BF16); the tunables, the fake quantization, the loss and the codes stay float32."""
    return torch.autocast(next(layer.parameters()).device.type, dtype=torch.bfloat16, enabled=native_bfloat16(layer))


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _rest(args: tuple, kwargs: dict) -> list[Any]:
    """A call's arguments besides the hidden states, flattened."""
    flat: list[Any] = []

    def walk(value: Any) -> None:
        if isinstance(value, (tuple, list)):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for k in sorted(value):
                flat.append(k)
                walk(value[k])
        else:
            flat.append(value)

    walk((args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}))
    return flat


def _shared_arguments(calls: list[tuple[tuple, dict, torch.Tensor]]) -> bool:
    """Whether every call has the same arguments besides its hidden states (batch 1 each): windows of one length
    share their positions, rotary tables and causal mask, so a batch of them can go through the layer as one call
    with the first window's arguments (which broadcast over the batch)."""
    first = _rest(*calls[0][:2])
    for args, kwargs, _ in calls:
        if _hidden(args, kwargs).shape[0] != 1:
            return False
        rest = _rest(args, kwargs)
        if len(rest) != len(first) or not all(_same(a, b) for a, b in zip(rest, first)):
            return False
    return True


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a is b or a == b


def _stacked(calls: list[tuple[tuple, dict, torch.Tensor]], indices: list[int]) -> tuple[tuple, dict, torch.Tensor]:
    args, kwargs, _ = calls[indices[0]]
    hidden = torch.cat([_hidden(*calls[j][:2]) for j in indices])
    target = torch.cat([_target(calls[j][2]) for j in indices])
    if args:
        return (hidden, *args[1:]), kwargs, target
    return args, {**kwargs, "hidden_states": hidden}, target


def _target(target: torch.Tensor | Callable[[], torch.Tensor]) -> torch.Tensor:
    """A call's target: a tensor, or a function computing it when needed (lm_head's logits, too large to hold
    for every window at once)."""
    if callable(target):
        with torch.no_grad():
            return target().float()
    return target


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def layer_calls(inputs: LayerInputs, index: int, targets: list[torch.Tensor]) -> list[tuple[tuple, dict, torch.Tensor]]:
    """The tuning's data for decoder layer `index`: each window's (args, kwargs) from `inputs` with its target
    output, detached (the inputs come from the model's own forward, whose graph the tuning must not reach)."""
    return [(_detached(args), _detached(kwargs), target.detach())
            for (args, kwargs), target in zip(inputs.of_layer(index), targets)]


def signround_decoder_layers(model: Any, batches: list[Any], chosen: Container[str], store: Callable,
                             progress: Callable[[int, int], None], *, bits_of: Callable[[str], int],
                             group_size: int, symmetric: bool,
                             iters: int, lr: float, batch_size: int, seed: int) -> dict[str, Any]:
    """SignRound on the chosen Linears of every decoder layer, one layer at a time, then on lm_head when it is
    chosen (signround_output_linear). `store(name, module, codes)` records one Linear's codes and sets its weight
    to their dequantized values (what the next layer's inputs are computed with). Returns what the report
    records: per layer, the output error left by the tuned rounding as a fraction of plain rounding's, averaged,
    how many layers kept plain rounding, and lm_head's fraction.
    Memory is one layer plus two sets of calibration activations (the float chain and the quantized one)."""
    ratios = []
    layers = decoder_layers(model)
    head = _output_linear(model, chosen)
    steps = len(layers) + (head is not None)
    with torch.no_grad():
        quantized = capture_layer_inputs(model, batches) if batches else LayerInputs([], [])
    reference = quantized  # the float model's inputs to the current layer; the same as the quantized at layer 0
    for i, layer in enumerate(layers):
        prefix = f"{LAYERS}.{i}."
        names = {n: bits_of(prefix + n) for n, m in layer.named_modules()
                 if isinstance(m, nn.Linear) and prefix + n in chosen}
        with torch.no_grad():  # the float layer on the float model's inputs: the targets, and the next float inputs
            reference_out = run_layer(layer, i, reference)
        if names and quantized:
            ratios.append(tune_decoder_layer(layer, i, names, quantized, reference_out.hidden, store,
                                             group_size=group_size, symmetric=symmetric, iters=iters, lr=lr,
                                             batch_size=batch_size, seed=seed))
        with torch.no_grad():  # the quantized layer on the quantized chain: the next layer's inputs to tune on
            quantized = run_layer(layer, i, quantized)
        reference = reference_out
        progress(i + 1, steps)
    head_ratio = None
    if head is not None and quantized:
        head_ratio = signround_output_linear(model, head, quantized, reference, store, bits=bits_of(head),
                                             group_size=group_size, symmetric=symmetric, iters=iters, lr=lr,
                                             batch_size=batch_size, seed=seed + len(layers))
        progress(steps, steps)
    return signround_info(ratios, head_ratio, iters, bfloat16=native_bfloat16(model))


def tune_decoder_layer(layer: nn.Module, index: int, names: dict[str, int], quantized: LayerInputs,
                       targets: list[torch.Tensor], store: Callable, *, group_size: int, symmetric: bool, iters: int,
                       lr: float, batch_size: int, seed: int, low_memory: bool = False) -> float:
    """SignRound on decoder layer `index`'s Linears `names` (relative to the layer, with their bits): its inputs
    from the quantized chain, its targets the float chain's outputs of the layer. Each Linear's codes go to
    `store(full name, module, codes)`. Returns the tuned output error as a fraction of plain rounding's.
    (The in-memory pass and the streamed schedule, llmopt.streaming_calibrated, both call this.)"""
    calls = layer_calls(quantized, index, targets)
    with _frozen(layer):
        codes, plain, tuned = tune_layer(layer, names, calls, group_size=group_size, symmetric=symmetric,
                                         iters=iters, lr=lr, batch_size=min(batch_size, len(calls)),
                                         seed=seed + index, low_memory=low_memory)
    del calls
    for n, c in codes.items():
        store(f"{LAYERS}.{index}.{n}", layer.get_submodule(n), c)
    return tuned / plain if plain > 0 else 1.0


def signround_info(ratios: list[float], head_ratio: float | None, iters: int, *, bfloat16: bool) -> dict[str, Any]:
    """What the report records of a SignRound run: per decoder layer, the tuned output error as a fraction of
    plain rounding's, averaged, how many layers kept plain rounding, lm_head's fraction when it was tuned, and
    whether the tuning steps' matmuls ran in bfloat16 (native_bfloat16)."""
    return {"signround_layers": len(ratios), "signround_iters": iters,
            **({"signround_lm_head_error_vs_rtn": round(head_ratio, 4)} if head_ratio is not None else {}),
            "signround_matmuls": "bfloat16" if bfloat16 else "float32",
            "signround_output_error_vs_rtn": round(sum(ratios) / max(len(ratios), 1), 4),
            "signround_layers_kept_rtn": sum(r >= 1.0 for r in ratios)}


def _output_linear(model: Any, chosen: Container[str]) -> str | None:
    """The name of the model's output Linear (lm_head) when it is among the chosen, else None."""
    head = model.get_output_embeddings()
    return next((n for n, m in model.named_modules() if m is head and n in chosen), None)


def signround_output_linear(model: Any, name: str, quantized: LayerInputs, reference: LayerInputs, store: Callable,
                            *, bits: int, group_size: int, symmetric: bool, iters: int, lr: float, batch_size: int,
                            seed: int, low_memory: bool = False) -> float:
    """SignRound on the output Linear (AutoRound's `quant_lm_head`), after the decoder layers: its input is the
    final norm of the quantized chain, its target the float model's logits (the float chain's final norm through
    the float lm_head). A tied embedding shares the codes (QuantizePass), as the builder's shared int4 embedding
    does; AutoRound refuses a tied lm_head, leaving it float.
    The logits span the vocabulary, so each batch's targets are computed when used instead of held for every
    window, and a batch holds at most HEAD_LOGITS_PER_STEP of them. Returns the tuned output error as a fraction
    of plain rounding's."""
    head = model.get_submodule(name)
    norm = model.get_submodule(FINAL_NORM)
    final = scalings(model.config).final_logits
    with torch.no_grad():
        calls = [((norm(q),), {}, functools.partial(head, norm(f))) for q, f in zip(quantized.hidden, reference.hidden)]
    per_window = max(h.shape[-2] for h in quantized.hidden) * head.out_features
    windows = max(1, min(batch_size, len(calls), HEAD_LOGITS_PER_STEP // per_window))
    with _frozen(head):
        codes, plain, tuned = tune_layer(head, {"": bits}, calls, group_size=group_size, symmetric=symmetric,
                                         iters=iters, lr=lr, batch_size=windows, seed=seed,
                                         loss=lambda out, target: next_token_kl(final(out), final(target)),
                                         low_memory=low_memory)
    store(name, head, codes[""])
    return tuned / plain if plain > 0 else 1.0


def next_token_kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(float || quantized) of the next-token distributions, averaged over tokens: lm_head's loss, since what its
    rounding costs is felt through the softmax. (With the mean squared error of the logits, which weighs all ~49k
    vocabulary entries alike, the tuning cut that error by 20% on SmolLM2 and left the perplexity where plain
    rounding had it: +7.5% against +7.8%.)"""
    ours, theirs = (torch.log_softmax(x, -1).flatten(0, -2) for x in (logits, target))  # (tokens, vocabulary)
    return nn.functional.kl_div(ours, theirs, log_target=True, reduction="batchmean")
