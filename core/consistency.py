"""Model/checkpoint consistency: a config whose values make sense, and weights that are exactly what it declares.

Without these checks transformers builds whatever the config says and fills the gaps quietly: a tensor missing
from the checkpoint is randomly initialised, one the config does not declare (an extra layer) is dropped, and a
`model_type` that does not match the weights discards the whole checkpoint. The run then ends with a normal
report, because the baseline is the same damaged model. A bad value (zero heads, a negative depth, a size
written as a string, an unknown rope type) otherwise ends deep inside transformers as a bug-looking crash.

- `check_config_values`: the config's numbers, before anything is built (plan time, from config.json or the
  GGUF's metadata).
- `check_loading_info`: what transformers reports after loading (`output_loading_info=True`), before any pass:
  it already maps checkpoint names to the model's, honours tied weights and the keys a family may omit, so
  its missing/unexpected/mismatched lists are the authoritative comparison.
"""

from __future__ import annotations

from typing import Any

from llmopt.errors import InputError

# Sizes and counts (each family's spelling) that must be positive integers when present.
# (Not sliding_window or expert counts: some families write 0 there to mean "none".)
_POSITIVE_INTS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
                  "intermediate_size", "vocab_size", "head_dim", "max_position_embeddings", "n_layer", "n_head",
                  "n_embd", "n_positions", "n_inner")
# Of those, the ones no config leaves null to mean "derive it" (head_dim, num_key_value_heads may be null).
_NOT_NULL = ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size", "vocab_size")
_POSITIVE_NUMBERS = ("rope_theta", "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon")
_FIX = "Restore the config.json that came with these weights (or fix the value named above)."


def known_rope_types() -> set[str]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return {"default", *ROPE_INIT_FUNCTIONS}


def check_config_values(config: Any, where: str) -> None:
    """Raise InputError (exit 3) naming the first value of `config` (a config.json mapping) that cannot describe
    a model. A multimodal wrapper's `text_config` is checked too."""
    if not isinstance(config, dict):
        raise InputError(f"{where}: the model config must be a JSON object (key: value), got "
                         f"{type(config).__name__}.", _FIX)
    for key in _POSITIVE_INTS:
        value = config.get(key)
        if value is None and key in config and key in _NOT_NULL:
            raise InputError(f"{where}: {key} is null; it must be a positive whole number.", _FIX)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{where}: {key} is {value!r}; it must be a positive whole number.", _FIX)
    for key in _POSITIVE_NUMBERS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
                                  or value == float("inf")):
            raise InputError(f"{where}: {key} is {value!r}; it must be a positive number.", _FIX)
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise InputError(f"{where}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads "
                         f"({kv_heads}); each KV head must serve a whole group of query heads.", _FIX)
    hidden = config.get("hidden_size")
    if heads and hidden and not config.get("head_dim") and hidden % heads:
        raise InputError(f"{where}: hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}) and "
                         "no head_dim is given.", _FIX)
    for key in ("rope_scaling", "rope_parameters"):
        rope = config.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise InputError(f"{where}: {key} is {rope!r}; it must be a mapping with a rope_type.", _FIX)
        kind = rope.get("rope_type", rope.get("type", "default"))
        known = known_rope_types()
        if kind not in known:
            raise InputError(f"{where}: {key} has rope type {kind!r}, which transformers does not know "
                             f"(known: {', '.join(sorted(known))}).", _FIX)
    text_config = config.get("text_config")
    if isinstance(text_config, dict):
        check_config_values(text_config, f"{where} (text_config)")


def check_loading_info(info: dict[str, list[Any]], spec: str) -> None:
    """Raise InputError when transformers had to invent, drop or reshape weights to load `spec`."""
    # sorted: transformers 5 reports sets
    missing, unexpected = (sorted(info.get(k) or [], key=_natural) for k in ("missing_keys", "unexpected_keys"))
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: _natural(m[0] if isinstance(m, (tuple, list))
                                                                                     else m))
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) the architecture needs are missing from the checkpoint "
                        f"({_some(missing)}), so they would be random")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) of the checkpoint are not part of the architecture its config "
                        f"describes ({_some(unexpected)}), so they would be dropped")
    if mismatched:
        problems.append(f"{len(mismatched)} tensor(s) have another shape than the config gives "
                        f"({_some([m[0] if isinstance(m, (tuple, list)) else m for m in mismatched])})")
    if problems:
        raise InputError(f"Model '{spec}' does not match its config: " + "; ".join(problems) + ".",
                         "The weights and config.json belong to different models or the checkpoint is incomplete: "
                         "restore the config that came with the weights, or copy the missing files.")


def check_checkpoint_tensors(config: Any, shapes: dict[str, tuple[int, ...]], spec: str) -> None:
    """For a path that reads the checkpoint itself (streaming, never through transformers' loader): the tensor
    names and shapes of the headers against the module tree the config builds (on the meta device: no memory),
    a tied `lm_head` allowed to be absent. Raises InputError as `check_loading_info` does."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmopt.experts import unfuse_experts

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    unfuse_experts(model)  # checkpoints name experts one by one; transformers 5 fuses them at load
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in shapes:
        del expected["lm_head.weight"]  # the embedding serves as the head
    check_loading_info({"missing_keys": sorted(set(expected) - set(shapes)),
                        "unexpected_keys": sorted(set(shapes) - set(expected)),
                        "mismatched_keys": sorted(n for n in set(expected) & set(shapes) if expected[n] != shapes[n])},
                       spec)


def _natural(name: Any) -> list[Any]:
    """Sort key: layer 2 before layer 10."""
    import re

    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(name))]


def _some(names: list[Any]) -> str:
    shown = ", ".join(str(n) for n in names[:3])
    return shown + (f", … {len(names) - 3} more" if len(names) > 3 else "")
