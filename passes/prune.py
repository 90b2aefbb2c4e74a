"""`type: prune` — remove channels, heads or layers (a smaller dense model), or zero weights (sparsity)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal, Sequence

from pydantic import Field, field_validator, model_validator

from llmopt.architectures import require
from llmopt.errors import RecipeError
from llmopt.model import ArchInfo
from llmopt.passes.base import Pass, PassConfig, refuse_after_quantize
from llmopt.state import ModelState, PassContext

SPARSITY_NOTE = (
    "Sparse weights keep their dense shapes: the zeros are stored and multiplied like any other weight, so dense "
    "CPU kernels (PyTorch, ONNX Runtime MatMul) run no faster and the files are no smaller. A speed-up needs a "
    "runtime with sparse kernels (2:4 sparse tensor cores on NVIDIA Ampere or later, or a sparse CPU engine)."
)

# Which fields each method reads; setting another method's field is a mistake worth naming.
_FIELDS = {
    "width": {"mlp", "heads", "head_unit", "params", "importance", "multiple_of"},
    "depth": {"num_layers", "ratio", "layer_choice"},
    "unstructured": {"sparsity", "criterion"},
    "2:4": {"criterion"},
}


class PruneConfig(PassConfig):
    type: Literal["prune"] = "prune"
    method: Literal["width", "depth", "unstructured", "2:4"] = Field(
        description="width: remove MLP channels and attention heads in every layer; depth: remove whole decoder "
                    "layers; unstructured: zero a fraction of each linear layer's weights; 2:4: zero 2 of every 4 "
                    "consecutive input weights (the pattern sparse tensor cores run).")
    # width
    mlp: float | None = Field(None, ge=0, lt=1, description="width: fraction of MLP intermediate channels to remove "
                                                              "in every layer (0.25 keeps 75%).")
    heads: int | float | None = Field(None, description="width: attention heads to remove in every layer: an "
                                                         "integer count, or a fraction of num_attention_heads.")
    head_unit: Literal["group", "query"] = Field(
        "group", description="width: 'group' removes whole KV groups (a key/value head with its query heads: the KV "
                             "cache shrinks too); 'query' removes the same number of query heads from every group.")
    params: float | None = Field(None, gt=0, lt=1, description="width: instead of `mlp`, a budget: the fraction of "
                                                                "all parameters to remove, met with MLP channels (after "
                                                                "any `heads`).")
    importance: Literal["activation", "wanda", "magnitude"] = Field(
        "activation", description="width: activation = size of each channel's/head's output on calibration text "
                                  "(Minitron); wanda = |W| x input norm (Wanda); magnitude = weight norms, no data.")
    multiple_of: int = Field(32, ge=1, description="width: the kept MLP width is rounded to a multiple of this "
                                                   "(fast kernels, and quantize group sizes that divide it).")
    # depth
    num_layers: int | None = Field(None, ge=0, description="depth: number of decoder layers to remove.")
    ratio: float | None = Field(None, ge=0, lt=1, description="depth: fraction of decoder layers to remove.")
    layer_choice: Literal["block_influence", "perplexity", "last"] = Field(
        "block_influence", description="depth: block_influence = layers whose output is most similar to their input "
                                       "(ShortGPT); perplexity = smallest calibration-loss increase when skipped "
                                       "alone (one forward pass per layer); last = the last layers, no data.")
    # unstructured, 2:4
    sparsity: float = Field(0.5, ge=0, lt=1, description="unstructured: fraction of each linear layer's weights set "
                                                         "to zero (2:4 is always 0.5).")
    criterion: Literal["wanda", "magnitude", "sparsegpt"] = Field(
        "wanda", description="unstructured/2:4: wanda = |W| x input norm per output row (Wanda); magnitude = |W| per "
                             "layer, no data; sparsegpt = OBS mask with a weight update of the kept weights (SparseGPT).")

    @field_validator("method", mode="before")
    @classmethod
    def _unquoted_two_four(cls, value: Any) -> Any:
        # YAML 1.1 (PyYAML) reads an unquoted 2:4 as the base-60 integer 124; nobody means 124 here.
        return "2:4" if value == 124 and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _fields_fit_method(self) -> "PruneConfig":
        misplaced = sorted(self.model_fields_set - _FIELDS[self.method] - {"type", "method"})
        if misplaced:
            owners = [f"{name} ({', '.join(m for m, fields in _FIELDS.items() if name in fields)})" for name in misplaced]
            raise ValueError(f"{', '.join(owners)} do not apply to method '{self.method}', which reads: "
                             f"{', '.join(sorted(_FIELDS[self.method]))}")
        if self.method == "width":
            if self.mlp is None and self.heads is None and self.params is None:
                raise ValueError("method 'width' needs a target: mlp (fraction of MLP channels), heads (count or "
                                 "fraction) or params (fraction of all parameters)")
            if self.mlp is not None and self.params is not None:
                raise ValueError("give mlp or params, not both: params sets the MLP width from a parameter budget")
            if isinstance(self.heads, float) and not 0 <= self.heads < 1:
                raise ValueError(f"heads={self.heads}: a fraction must be in [0, 1); give an integer for a count")
            if isinstance(self.heads, int) and self.heads < 0:
                raise ValueError(f"heads={self.heads}: cannot remove a negative number of heads")
        if self.method == "depth" and (self.num_layers is None) == (self.ratio is None):
            raise ValueError("method 'depth' needs exactly one of num_layers (a count) or ratio (a fraction)")
        return self


class PrunePass(Pass):
    """Structured pruning to a smaller dense model (MLP channels and heads, or whole layers), or sparsity that
    keeps the shapes (2:4, unstructured).

    - width: removes the same number of MLP intermediate channels (rows of gate/up_proj, columns of
      down_proj) and attention heads (rows of q/k/v_proj, columns of o_proj) in every layer, the least
      important first, and updates `intermediate_size` and the head counts in the config. Importance:
      `activation` is Minitron's (Muralidharan et al. 2024, "Compact Language Models via Pruning and
      Knowledge Distillation"): the mean size over tokens of a channel's activation (a head's output
      norm), root-mean-squared over calibration windows; `wanda` is the structured form of Wanda's
      |W| x ||x|| (Sun et al. 2023) summed over the weights that read the channel; `magnitude` uses
      weight norms alone. With GQA, heads go by whole KV groups or equally from every group.
    - depth: removes whole decoder layers chosen one-shot by block influence, 1 - mean cosine
      similarity of a layer's input and output hidden states (ShortGPT, Men et al. 2024), by the
      calibration loss when the layer alone is skipped, or the last layers as a naive baseline.
    - unstructured / 2:4: zeroes weights of every linear layer in the decoder layers, layer by layer
      on the already-pruned model's activations: `wanda` compares |W| x ||x_j|| within each output
      row (Sun et al. 2023); `sparsegpt` picks the mask from the inverse Hessian of the layer's inputs
      and updates the kept weights to compensate (Frantar & Alistarh 2023, "SparseGPT"); `magnitude`
      zeroes the smallest |W| of each matrix. Dense kernels gain no speed from the zeros.

    Statistics are running sums per channel, per head or per layer; the sparse methods keep the
    hidden states of the calibration windows at one layer boundary (windows x tokens x hidden).
    Ties are broken by index, so a run is reproducible given the (seeded) calibration windows.
    What went (channel and head indices per layer, layer indices and scores, sparsity achieved)
    is recorded in the report.
    """

    type = "prune"
    Config = PruneConfig
    config: PruneConfig
    needs_calibration = True

    def check_order(self, earlier: Sequence[PassConfig], where: str) -> None:
        refuse_after_quantize(self.type, earlier, where)

    def check(self, arch: ArchInfo, where: str) -> ArchInfo:
        c = self.config
        # Depth and sparse pruning take every described family; width pruning needs a dense gated MLP.
        require(arch.model_type, f"{c.method} pruning", f"{where}.method",
                capability="prune" if c.method == "width" else None)
        if c.method == "width":
            heads, kv = self._planned_heads(arch, where)
            intermediate = self._planned_intermediate(arch, heads, kv, where)
            return replace(arch, intermediate_size=intermediate, num_heads=heads, num_kv_heads=kv)
        if c.method == "depth":
            n = c.num_layers if c.num_layers is not None else round(c.ratio * arch.num_layers)
            if n >= arch.num_layers:
                field = "num_layers" if c.num_layers is not None else "ratio"
                raise RecipeError(f"{where}.{field}: removing {n} of the model's {arch.num_layers} layers leaves none.",
                                  f"Remove at most {arch.num_layers - 1} layers.")
            return replace(arch, num_layers=arch.num_layers - n)
        if c.method == "2:4":
            widths = {"hidden_size": arch.hidden_size, "intermediate_size": arch.intermediate_size,
                      "num_heads*head_dim": arch.num_heads * arch.head_dim}
            bad = {k: v for k, v in widths.items() if v % 4}
            if bad:
                raise RecipeError(f"{where}.method: 2:4 sparsity needs input widths divisible by 4; the model has "
                                  + ", ".join(f"{k}={v}" for k, v in bad.items()) + ".",
                                  "Use `method: unstructured` for this model.")
        return arch

    def _planned_heads(self, arch: ArchInfo, where: str) -> tuple[int, int]:
        """(num_heads, num_kv_heads) after removing `heads`; the KV grouping must stay uniform."""
        h, kv, spec = arch.num_heads, arch.num_kv_heads, self.config.heads
        if not spec:
            return h, kv
        n = spec if isinstance(spec, int) else round(spec * h)
        per_group = h // kv
        if self.config.head_unit == "group":
            step, unit = per_group, f"whole KV groups of {per_group} heads ({kv} groups)"
        else:
            step, unit = kv, f"the same number of query heads from each of the {kv} KV groups"
        valid = list(range(step, h, step))
        if n % step or n >= h:
            asked = f"{spec} of {h} heads is {n}" if isinstance(spec, float) else f"{n} of {h} heads"
            other = "query" if self.config.head_unit == "group" else "group"
            raise RecipeError(
                f"{where}.heads: {asked}; removing {unit} allows "
                + (f"{', '.join(map(str, valid))} heads." if valid else "no head count that leaves a head."),
                f"Pick one of those counts, or try `head_unit: {other}`.",
            )
        if self.config.head_unit == "group":
            return h - n, kv - n // per_group
        return h - n, kv

    def _planned_intermediate(self, arch: ArchInfo, heads: int, kv: int, where: str) -> int:
        c, size, m = self.config, arch.intermediate_size, self.config.multiple_of
        if c.params is not None:
            # Solve for the MLP width that meets the budget (3 matrices of hidden x width per layer).
            total = _parameters(arch, size, arch.num_heads, arch.num_kv_heads)
            target = (1 - c.params) * total
            excess = _parameters(arch, size, heads, kv) - target
            exact = size - excess / (3 * arch.hidden_size * arch.num_layers)
            kept = int(round(exact / m)) * m
            if excess <= 0:
                raise RecipeError(f"{where}.params: the heads removal alone already removes more than {c.params:.0%} "
                                  "of the parameters.", "Raise params or remove fewer heads.")
            if kept < m:
                raise RecipeError(f"{where}.params: removing {c.params:.0%} of the parameters would take the whole MLP "
                                  f"width ({size} channels) and more.", "Lower params, or also remove heads.")
            return min(kept, size)
        if not c.mlp:
            return size
        kept = int(round(size * (1 - c.mlp) / m)) * m
        if kept >= size or kept < m:
            raise RecipeError(
                f"{where}.mlp: {c.mlp} of {size} channels rounded to a multiple_of {m} keeps {kept} channels.",
                f"Choose mlp so that {m} <= kept < {size}, or lower multiple_of.",
            )
        return kept

    def run(self, state: ModelState, ctx: PassContext) -> ModelState:
        import torch

        from llmopt.passes import prune_sparse, prune_structured

        c, model = self.config, state.model
        arch = ArchInfo.from_config(model.config)
        planned = self.check(arch, "prune")
        before = _count(model)
        data_free = {"width": c.importance == "magnitude", "depth": c.layer_choice == "last"}.get(
            c.method, c.criterion == "magnitude")
        batches: list[Any] = []
        if not data_free:
            batches = ctx.calibration_windows("The prune pass")
        with torch.no_grad():
            if c.method == "width":
                info = prune_structured.prune_width(
                    model, batches, mlp_remove=arch.intermediate_size - planned.intermediate_size,
                    heads_remove=arch.num_heads - planned.num_heads, head_unit=c.head_unit,
                    importance=c.importance, progress=ctx.progress)
            elif c.method == "depth":
                info = prune_structured.prune_depth(model, batches, remove=arch.num_layers - planned.num_layers,
                                                    choice=c.layer_choice, progress=ctx.progress)
            else:
                info = prune_sparse.sparsify(model, batches, two_four=c.method == "2:4",
                                             sparsity=0.5 if c.method == "2:4" else c.sparsity,
                                             criterion=c.criterion, progress=ctx.progress)
                info["note"] = SPARSITY_NOTE
        after = _count(model)
        state.pass_info["prune"] = {
            "method": c.method, **info, "parameters": {"before": before, "after": after,
                                                       "removed_pct": round(100 * (1 - after / before), 2)},
            "calibration_windows": len(batches),
        }
        return state


def _parameters(arch: ArchInfo, intermediate: int, heads: int, kv: int) -> float:
    """Parameter count of a Llama-layout model from its shape (biases ignored), for the `params` budget."""
    h, d = arch.hidden_size, arch.head_dim
    layer = h * d * (2 * heads + 2 * kv) + 3 * h * intermediate + 2 * h
    embeddings = arch.vocab_size * h * (1 if arch.tie_word_embeddings else 2)
    return embeddings + arch.num_layers * layer + h


def _count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
