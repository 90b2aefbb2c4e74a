"""genai_config.json: the file onnxruntime-genai reads to drive an ONNX decoder, for graphs whose every layer's
KV cache goes through GroupQueryAttention.

Such a graph runs two ways. ORTModelForCausalLM (and llmopt's runners) feed a cache that grows by one position a
step, and each step returns a copy one longer. GroupQueryAttention can instead take one buffer per layer, sized
for the whole sequence, as both its past input and its present output, and write each new token's keys and
values into it in place: onnxruntime-genai's `past_present_share_buffer`, which is how it runs the model
builder's graphs. The config says so, so the same artifact loads in onnxruntime-genai without a second export.

Written by hand: onnxruntime-genai's builder writes this file only for graphs it builds itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GENAI_CONFIG = "genai_config.json"
# The report's export.runtimes for an artifact with a genai_config.json.
RUNTIMES = ["onnxruntime (ORTModelForCausalLM)", "onnxruntime-genai (genai_config.json)"]
# optimum's names, which llmopt's graphs keep (exporters/onnx.py, exporters/onnx_stream.py).
_INPUTS = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
_OUTPUTS = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}


def write_genai_config(folder: Path, config: dict[str, Any], *, provider: str = "CPUExecutionProvider",
                       filename: str = "model.onnx") -> Path:
    """Write genai_config.json for the decoder `folder/filename` described by the Hugging Face `config` dict."""
    heads = config["num_attention_heads"]
    context = int(config.get("max_position_embeddings") or 4096)
    eos = config.get("eos_token_id")
    pad = config.get("pad_token_id")
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    # onnxruntime-genai names its providers without the suffix; the CPU is its default (an empty list).
    providers = [] if provider == "CPUExecutionProvider" else [{provider.removesuffix("ExecutionProvider").lower(): {}}]
    data = {
        "model": {
            "type": config["model_type"],
            "bos_token_id": config.get("bos_token_id"),
            "eos_token_id": eos,
            "pad_token_id": pad,
            "vocab_size": config["vocab_size"],
            "context_length": context,
            "decoder": {
                "filename": filename,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": providers},
                "head_size": config.get("head_dim") or config["hidden_size"] // heads,
                "hidden_size": config["hidden_size"],
                "num_attention_heads": heads,
                "num_key_value_heads": config.get("num_key_value_heads") or heads,
                "num_hidden_layers": config["num_hidden_layers"],
                "inputs": dict(_INPUTS),
                "outputs": dict(_OUTPUTS),
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "max_length": context, "min_length": 0,
                   "past_present_share_buffer": True},
    }
    path = Path(folder) / GENAI_CONFIG
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def shares_kv_buffer(folder: Path) -> bool:
    """Whether the folder's genai_config.json says its graph updates the KV cache in place."""
    path = Path(folder) / GENAI_CONFIG
    if not path.is_file():
        return False
    return bool(json.loads(path.read_text(encoding="utf-8")).get("search", {}).get("past_present_share_buffer"))


__all__ = ["GENAI_CONFIG", "RUNTIMES", "shares_kv_buffer", "write_genai_config"]
