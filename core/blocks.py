"""What the writers receive at a time (a Block: the embedding, one decoder layer, or the final norm and lm_head),
and the blocks of a model in memory. The streamed schedule (llmopt.streaming) makes them from a checkpoint, one
at a time; the writers and the artifact check's traces take either the same way."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from llmopt.quantized import QuantizedTensor


@dataclass
class Block:
    """What a writer receives at a time: the embedding, one decoder layer, or the final norm and lm_head."""

    kind: Literal["embedding", "layer", "final"]
    index: int  # layer number (0 for the other kinds)
    tensors: dict[str, Any] = field(default_factory=dict)  # name -> float32 torch.Tensor or QuantizedTensor


def model_blocks(model: Any, quantized: dict[str, QuantizedTensor]) -> Iterator[Block]:
    """The blocks of a model in memory: each parameter as the pass left it, or its codes where it was quantized."""
    from llmopt.experts import fused_expert_tensors

    params: dict[str, Any] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        params.update(fused_expert_tensors(name, param) or {name: param})  # a model that did not pass ModelState
    stored = lambda name: quantized.get(name, params[name].detach())  # noqa: E731
    yield Block("embedding", 0, {"model.embed_tokens.weight": stored("model.embed_tokens.weight")})
    for i in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        yield Block("layer", i, {n: stored(n) for n in params if n.startswith(prefix)})
    final = {"model.norm.weight": stored("model.norm.weight")}
    head = model.get_output_embeddings()
    if head is not None and (head.weight is not model.get_input_embeddings().weight or "lm_head.weight" in quantized):
        final["lm_head.weight"] = stored("lm_head.weight")
    yield Block("final", 0, final)


def counted(blocks: Iterable[Block], total: int, progress: Callable[[int, int], None]) -> Iterator[Block]:
    """`blocks`, reporting progress(done, total) as each one has been consumed (written)."""
    for done, block in enumerate(blocks, 1):
        yield block
        progress(done, total)
