"""`llmopt inspect`: what a model is and which passes apply, from its config and tensor headers only."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llmopt.errors import LlmoptError
from llmopt.model import ArchInfo, ModelSource, check_causal_lm, load_config, resolve_model

# Parameter-name fragments -> module type, for HF names and GGUF names alike.
_MODULE_TYPES = [
    ("embedding", re.compile(r"embed_tokens|wte|token_embd")),
    ("lm_head", re.compile(r"lm_head|^output\.weight")),
    ("attention", re.compile(r"self_attn|attn_(q|k|v|output)|\.attn\.")),
    ("mlp", re.compile(r"\.mlp\.|ffn_(gate|up|down)")),
    ("norm", re.compile(r"norm")),
]


def _module_type(name: str) -> str:
    return next((kind for kind, pattern in _MODULE_TYPES if pattern.search(name)), "other")


def tensor_headers(source: ModelSource) -> list[tuple[str, tuple[int, ...], str, int]]:
    """(name, shape, dtype, bytes) of every weight tensor, read from file headers (no weights loaded)."""
    folder = Path(source.path)
    if source.gguf_file:
        import gguf

        reader = gguf.GGUFReader(folder / source.gguf_file)  # memory-mapped: reads only what it touches
        return [(t.name, tuple(int(d) for d in t.shape), t.tensor_type.name, int(t.n_bytes)) for t in reader.tensors]
    from safetensors import safe_open

    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    found = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="numpy") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                shape = tuple(piece.get_shape())
                dtype = piece.get_dtype()
                count = 1
                for d in shape:
                    count *= d
                found.append((name, shape, dtype, count * sizes.get(dtype, 4)))
    return found


def inspect_model(spec: str, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> dict[str, Any]:
    """Architecture, parameters by module type, dtypes, size, KV cache, and pass applicability."""
    from llmopt.passes import PASSES

    source = resolve_model(spec, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    config = load_config(source)
    check_causal_lm(config, spec)
    arch = ArchInfo.from_config(config)
    by_type: dict[str, int] = {}
    dtypes: dict[str, int] = {}
    size = 0
    for name, shape, dtype, nbytes in tensor_headers(source):
        count = 1
        for d in shape:
            count *= d
        by_type[_module_type(name)] = by_type.get(_module_type(name), 0) + count
        dtypes[dtype] = dtypes.get(dtype, 0) + count
        size += nbytes
    return {
        "model": spec,
        "source": source.kind,
        "model_type": arch.model_type,
        "architecture": {k: v for k, v in vars(arch).items() if k != "extra"},
        "parameters": sum(by_type.values()),
        "parameters_by_module_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
        "dtypes": dtypes,
        "size_bytes": size,
        "kv_cache_bytes_per_token_fp32": arch.kv_cache_bytes_per_token(4),
        "kv_cache_bytes_per_token_fp16": arch.kv_cache_bytes_per_token(2),
        "passes": {name: _applicability(cls, arch) for name, cls in PASSES.items()},
        "exporters": _exporters(arch, config),
    }


def _applicability(cls: Any, arch: ArchInfo) -> str:
    """'applies', or why not. Passes whose config has required fields are checked with their defaults only."""
    from pydantic import ValidationError

    try:
        config = cls.Config.model_validate({"type": cls.type})
    except ValidationError as exc:
        needed = ", ".join(str(e["loc"][0]) for e in exc.errors() if e["type"] == "missing")
        return f"needs settings ({needed}); run `llmopt validate` with a recipe to check them"
    try:
        cls(config).check(arch, where=cls.type)
    except LlmoptError as exc:
        return f"does not apply with defaults: {exc.message}"
    return "applies"


def _exporters(arch: ArchInfo, config: Any = None) -> dict[str, str]:
    from llmopt.exporters import EXPORTERS
    from llmopt.recipe import ExportConfig

    result = {}
    for name, cls in EXPORTERS.items():
        try:
            cls(ExportConfig(format=name)).check(arch, config)
            result[name] = "supported"
        except LlmoptError as exc:
            result[name] = f"not supported: {exc.message}"
    return result


def estimate_memory_bytes(parameters: int, *, needs_teacher: bool, evaluate: bool) -> int:
    """Rough peak memory of `optimize`: float32 weights for the working model, the teacher copy,
    and the baseline plus artifact loaded side by side for evaluation."""
    copies = 1 + (1 if needs_teacher else 0) + (2 if evaluate else 0)
    return parameters * 4 * copies

