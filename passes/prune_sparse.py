"""Unstructured and 2:4 sparsity for `type: prune`: Wanda, SparseGPT and magnitude masks, layer by layer.

Model-running code, imported by PrunePass.run only (torch at module scope is fine here).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmopt.passes.layerwise import InputMoments, measured_layers
from llmopt.passes.prune_structured import Progress

SPARSEGPT_BLOCK = 128  # columns updated together (the paper's lazy batch size)
SPARSEGPT_DAMP = 0.01  # dampening: 1% of the mean Hessian diagonal, as in the reference code


def sparsify(model: Any, batches: list[Any], *, two_four: bool, sparsity: float, criterion: str,
             progress: Progress) -> dict[str, Any]:
    """Zero weights of every Linear inside the decoder layers; returns what the report records."""
    def input_moments(i: int, layer: nn.Module) -> dict[str, InputMoments]:
        return {name: InputMoments(m, full=criterion == "sparsegpt") for name, m in layer.named_modules()
                if isinstance(m, nn.Linear)}

    measured = criterion != "magnitude" and sparsity > 0  # magnitude needs no data
    per_layer = []
    zeros = total = 0
    for _, layer, moments in measured_layers(model, batches if measured else [], input_moments, progress):
        linears = [(name, m) for name, m in layer.named_modules() if isinstance(m, nn.Linear)]
        if sparsity > 0:
            for name, m in linears:
                w = m.weight.detach()
                if criterion == "sparsegpt":
                    mo = moments[name]
                    w.copy_(sparsegpt(w, mo.moment / max(mo.tokens, 1), sparsity, two_four))
                else:
                    score = w.abs().float()  # (out, in)
                    if criterion == "wanda":
                        score = score * moments[name].moment.sqrt()[None, :]
                    w.masked_fill_(lowest_mask(score, sparsity, two_four, per_row=criterion == "wanda"), 0)
        layer_zeros = sum(int((m.weight == 0).sum()) for _, m in linears)
        layer_total = sum(m.weight.numel() for _, m in linears)
        per_layer.append(round(layer_zeros / layer_total, 4))
        zeros, total = zeros + layer_zeros, total + layer_total

    achieved = zeros / total if total else 0.0
    record = {"pattern": "2:4" if two_four else "unstructured", "criterion": criterion, "target_sparsity": sparsity,
              "achieved_sparsity": round(achieved, 4), "sparsity_per_layer": per_layer,
              "pruned": "every Linear in the decoder layers (embedding and lm_head dense)",
              "zero_weights": zeros, "pruned_weights": total}
    # Saved with the config, so that whoever loads the checkpoint knows what the zeros are.
    model.config.llmopt_sparsity = {k: record[k] for k in ("pattern", "criterion", "achieved_sparsity", "pruned")}
    return record


def lowest_mask(score: torch.Tensor, sparsity: float, two_four: bool, per_row: bool) -> torch.Tensor:
    """True where a weight goes: the 2 lowest of every 4 inputs, or the lowest `sparsity` share of each
    output row (per_row) or of the whole matrix. Exact counts: ties go to the lower index."""
    rows, cols = score.shape
    if two_four:
        groups = score.reshape(rows, cols // 4, 4)  # (out, in/4, 4)
        drop = torch.topk(groups, 2, dim=-1, largest=False).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True).reshape(rows, cols)
    # k-th value as the threshold (a full sort costs ~5x more), then just enough of the ties, lowest index first.
    flat = score if per_row else score.reshape(1, -1)  # (groups, n): compare within each row
    k = int(flat.shape[1] * sparsity)
    if k == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    threshold = torch.kthvalue(flat, k, dim=1, keepdim=True).values  # (groups, 1)
    mask = flat <= threshold
    if bool((mask.sum(1) > k).any()):  # ties at the threshold: keep only as many as needed
        ties = flat == threshold
        missing = k - (flat < threshold).sum(1, keepdim=True)  # (groups, 1)
        mask = (flat < threshold) | (ties & (ties.cumsum(1) <= missing))
    return mask.reshape(rows, cols)


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, two_four: bool) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh 2023, Algorithm 1): prune column by column and spread each pruned
    weight's error over the columns not yet visited, through the Cholesky factor of H^-1.

    weight (out, in); hessian (in, in) = mean of x x^T over calibration tokens. Returns the new weight.
    """
    w = weight.detach().float().clone()  # (out, in)
    h = hessian.clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0  # inputs that never fire: their weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    h += SPARSEGPT_DAMP * torch.mean(torch.diag(h)) * torch.eye(cols)
    # Upper Cholesky factor of H^-1: row i holds the update of columns i.. when column i is fixed.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # (in, in)
    for start in range(0, cols, SPARSEGPT_BLOCK):
        end = min(start + SPARSEGPT_BLOCK, cols)
        w1 = w[:, start:end].clone()  # (out, b)
        hinv1 = hinv[start:end, start:end]  # (b, b)
        err1 = torch.zeros_like(w1)
        diag = torch.diag(hinv1)  # (b,)
        if two_four:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        else:
            # Adaptive mask selection: the block's lowest w^2 / [H^-1]_jj^2 go (the OBS saliency).
            mask1 = lowest_mask(w1 ** 2 / diag[None, :] ** 2, sparsity, False, per_row=False)
        for i in range(end - start):
            if two_four and i % 4 == 0:
                saliency = w1[:, i:i + 4] ** 2 / diag[None, i:i + 4] ** 2  # (out, 4)
                mask1[:, i:i + 4] = lowest_mask(saliency, 0.5, True, per_row=False)
            col = w1[:, i]
            kept = torch.where(mask1[:, i], torch.zeros_like(col), col)
            e = (col - kept) / hinv1[i, i]  # (out,)
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            w1[:, i] = kept
            err1[:, i] = e
        w[:, start:end] = w1
        w[:, end:] -= err1 @ hinv[start:end, end:]
    return w.to(weight.dtype)
