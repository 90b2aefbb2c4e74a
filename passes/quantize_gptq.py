"""GPTQ for `type: quantize, method: gptq`: group-wise int4/int8 weights with second-order error compensation.

Model-running code, imported by QuantizePass.run only (torch at module scope is fine here).

Written here rather than taken from a library: the GPTQ packages (auto-gptq, gptqmodel, llm-compressor)
each pull their own model wrappers, kernels and pinned transformers, and none hands back the plain codes,
scales and zero points that our exporters store as MatMulNBits. The algorithm itself is short.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any, Callable

import torch
from torch import nn

from llmopt.errors import InputError
from llmopt.architectures import LAYERS, Architecture
from llmopt.passes.layerwise import InputMoments, input_groups, layout, measured_layers
from llmopt.passes.quantize import group_params

BLOCK = 128  # columns updated together before the rest of the matrix is (the paper's lazy batch)
DAMP_RETRIES = 4  # damping x10 each retry: 1% -> 10% -> 100% -> 1000% of the mean Hessian diagonal


def _inverse_cholesky(h: torch.Tensor, damp: float, name: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + d I)^-1, retrying with 10x the damping while H + d I is not positive definite.

    The damping goes onto H's diagonal in place (H is the caller's working copy): a damped copy would be one more
    matrix as big as H, 0.5 GB for a 7B down_proj, on top of the peak."""
    mean_diag = float(torch.diag(h).mean())
    added = 0.0
    for attempt in range(DAMP_RETRIES):
        d = damp * 10**attempt
        h.diagonal().add_(d * mean_diag - added)
        added = d * mean_diag
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            del chol
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper, d
    raise InputError(
        f"GPTQ: the input Hessian of {name} is not positive definite even with damping {d:g} x its mean diagonal "
        f"(after {DAMP_RETRIES} tries from {damp:g}).",
        "The calibration activations of this layer are degenerate: use more or longer calibration samples, a larger "
        "`damp`, or keep the layer in float with `exclude`.")


def gptq(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int, group_size: int, symmetric: bool,
         act_order: bool = False, damp: float = 0.01, name: str = "a layer") -> dict[str, Any]:
    """GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
    Transformers", Algorithm 1): quantize column by column, and spread each column's rounding error over
    the columns not yet quantized through the Cholesky factor of H^-1, so that ||X W^T - X Q^T|| is small.

    weight (out, in); hessian (in, in) = mean of x x^T over calibration tokens. Groups run along `in`.
    Without act_order a group's scale and zero point are set when GPTQ reaches its first column, from the
    error-updated weights (as in the reference code). With act_order columns go in order of decreasing
    H_jj, and every group's parameters are fixed from the original weights first ("static groups"), so the
    groups stay contiguous in the original order, which is the layout MatMulNBits reads.
    Returns codes (out, in) uint8, scales and zero points (out, in / group_size), the damping used.

    `hessian` is the working memory and is overwritten (pass a copy to keep it): at 7B shapes a down_proj Hessian
    is 0.5 GB, and every copy of it adds to the calibration's peak.
    """
    w = weight.detach().float().clone()  # (out, in)
    h = hessian.detach().float()  # the same tensor when it is float32 already
    rows, cols = w.shape
    levels = 2**bits - 1
    dead = torch.diag(h) == 0  # inputs that never fire: their weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0

    groups = cols // group_size
    scales = torch.zeros(rows, groups)
    zeros = torch.zeros(rows, groups)
    if act_order:
        s, z = group_params(w.reshape(rows, groups, group_size), bits, symmetric)  # (out, groups)
        scales, zeros = s, z
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    else:  # the original order: no permuted copies of W and H
        perm = torch.arange(cols)
    hinv, used_damp = _inverse_cholesky(h, damp, name)  # (in, in) upper
    del h
    group_of = perm // group_size  # group of each column, in processing order

    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    for start in range(0, cols, BLOCK):
        end = min(start + BLOCK, cols)
        w1 = w[:, start:end].clone()  # (out, b)
        hinv1 = hinv[start:end, start:end]  # (b, b)
        err1 = torch.zeros_like(w1)
        for i in range(end - start):
            col_index = start + i
            g = int(group_of[col_index])
            if not act_order and col_index % group_size == 0:
                # This group's columns are still ahead: set its range from their current (updated) values.
                # Only the group's own columns are copied (the block's rest and at most group_size after it).
                ahead = torch.cat([w1[:, i:i + group_size], w[:, end:end + max(0, group_size - (end - start - i))]],
                                  1)  # (out, g)
                scales[:, g], zeros[:, g] = group_params(ahead, bits, symmetric)
            col = w1[:, i]
            code = torch.clamp(torch.round(col / scales[:, g]) + zeros[:, g], 0, levels)
            q = (code - zeros[:, g]) * scales[:, g]
            codes[:, col_index] = code
            e = (col - q) / hinv1[i, i]  # (out,)
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, end:] -= err1 @ hinv[start:end, end:]

    inverse = torch.argsort(perm)
    return {"codes": codes[:, inverse], "scales": scales.contiguous(),
            "zero_points": zeros.to(torch.uint8), "damp": used_damp}


def gptq_decoder_layers(model: Any, batches: list[Any], chosen: dict[str, nn.Linear], quantize: Callable,
                        progress: Callable[[int, int], None]) -> dict[str, float]:
    """Run GPTQ on the chosen Linears of every decoder layer, one layer at a time.

    Each layer's Hessians come from its inputs as the already-quantized earlier layers produce them, so
    later layers compensate for earlier errors; memory is one layer plus the calibration activations.
    `quantize(name, module, hessian)` quantizes one Linear in place. Returns the damping used per Linear.
    """
    damping: dict[str, float] = {}
    arch = layout(model)
    attach = lambda i, layer: layer_hessians(i, layer, arch, chosen)  # noqa: E731
    for i, layer, moments in measured_layers(model, batches, attach, progress):
        damping.update(quantize_layer(i, layer, moments, quantize))
    return damping


def layer_hessians(i: int, layer: nn.Module, arch: Architecture, chosen: Container[str]) -> dict[str, InputMoments]:
    """Input-moment probes on the Linears of decoder layer i whose full names are in `chosen`. Linears that read
    the same input (q/k/v, gate/up) share one probe: the same sums, computed and held once."""
    prefix = f"{LAYERS}.{i}."
    probes: dict[str, InputMoments] = {}
    for _, _, names in input_groups(layer, arch):
        if all(prefix + n in chosen for n in names):
            shared = InputMoments(layer.get_submodule(names[0]), full=True)
            probes.update({prefix + n: shared for n in names})
    for n, m in layer.named_modules():
        if isinstance(m, nn.Linear) and prefix + n in chosen and prefix + n not in probes:
            probes[prefix + n] = InputMoments(m, full=True)
    return probes


def quantize_layer(i: int, layer: nn.Module, moments: dict[str, InputMoments], quantize: Callable) -> dict[str, float]:
    """`quantize(name, module, hessian)` on each probed Linear of layer i, once the calibration inputs have run
    through it; returns the damping used per Linear. Empties `moments` as it goes, so that each Hessian is
    freed once its last Linear is done.

    `quantize` may overwrite the Hessian it is handed (gptq does): a Linear that shares its probe with one still
    to come gets a copy, and the probe's last Linear gets the sums themselves, turned into the mean in place."""
    prefix = f"{LAYERS}.{i}."
    damping = {}
    for name in list(moments):
        mo = moments.pop(name)
        shared = any(other is mo for other in moments.values())
        hessian = mo.moment / max(mo.tokens, 1) if shared else mo.moment.div_(max(mo.tokens, 1))
        del mo  # the last reference to an unshared probe: its sums live on only as `hessian`
        damping[name] = quantize(name, layer.get_submodule(name.removeprefix(prefix)), hessian)
        del hessian
    return damping
