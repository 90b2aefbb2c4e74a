"""Recipes: YAML (safe-loaded) validated by pydantic, with errors that name file, key path and line."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llmopt.errors import RecipeError
from llmopt.passes import PASSES

# pydantic and passes/ are imported here, torch is not: validating a recipe must stay fast.

# A recipe's pass: the config of one registered pass, chosen by its `type` (adding a pass to the registry makes
# it a recipe type, in validation and in the JSON schema, with nothing else to change here).
PassSpec = Annotated[Union[tuple(cls.Config for cls in PASSES.values())], Field(discriminator="type")]


class StrictModel(BaseModel):
    # allow_inf_nan=False: a NaN threshold compares false with everything, so it would pass `validate` and then
    # fail every run.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class OnnxValidation(StrictModel):
    prompts: int = Field(3, ge=1, description="Prompts run through both the artifact and the in-memory model.")
    min_top1_agreement: float = Field(0.95, ge=0, le=1, description="Fail when fewer next-token argmaxes agree.")
    max_abs_logit_diff: float = Field(
        1.0, gt=0, description="Fail when any logit differs more than this (absolute)."
    )


class ExportConfig(StrictModel):
    format: Literal["onnx", "safetensors"] = Field("onnx", description="Artifact format.")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        0,
        description="ONNX only: MatMulNBits accuracy_level (0 = unset/fp32 compute, 4 = int8 compute, fastest).",
    )
    execution_provider: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the artifact is validated and measured: cuda (onnxruntime's CUDA execution "
                            "provider; torch on the GPU for safetensors), cpu, or auto (the GPU when one is "
                            "present). The report names the device.")
    external_data: Literal["auto", "always", "never"] = Field(
        "auto", description="ONNX only: store weights in model.onnx.data (auto: when the model is over 1.8 GB)."
    )
    streaming: bool = Field(
        False, description="Quantize and write one decoder layer at a time from the safetensors checkpoint (peak "
                           "memory about one layer plus calibration activations, for models bigger than RAM): one "
                           "weight-only `quantize` pass (rtn, gptq or signround, with or without awq) of a described "
                           "family. The artifact is checked against the model, and its quality measured, layer by "
                           "layer; speed is not measured.")
    validate_result: OnnxValidation = Field(
        default_factory=OnnxValidation,
        alias="validate",
        description="Check the written artifact against the optimized in-memory model.",
    )


class SpeedConfig(StrictModel):
    enabled: bool = True
    prompt_tokens: int = Field(64, ge=1, description="Prompt length for the prefill latency.")
    new_tokens: int = Field(32, ge=2, description="Tokens generated (greedy, KV cache) for decode speed.")
    runs: int = Field(3, ge=1, description="Repetitions; the median is reported.")
    threads: int | None = Field(None, ge=1, description="CPU threads (default: all cores).")


class EvaluationConfig(StrictModel):
    enabled: bool = True
    data: str = Field(
        "builtin",
        description="'builtin' (Python's own documentation text), a local .txt/.jsonl file, or 'hf:NAME[:CONFIG][@SPLIT]'.",
    )
    text_field: str = Field("text", description="Field to read from .jsonl lines or dataset rows.")
    max_tokens: int = Field(4096, ge=16, description="Evaluation token budget (same tokens for both models).")
    window: int = Field(256, ge=8, description="Tokens per perplexity window.")
    context_length: int | None = Field(None, ge=1, description="Context for the report's KV-cache size (default: the "
                                                                "model's max_position_embeddings).")
    tasks: list[str] = Field(default_factory=list, description="lm-eval-harness task names (e.g. ['hellaswag', "
                                                               "'arc_easy']) scored for both models when lm-eval is "
                                                               "installed; skipped with a note when it is not.")
    task_limit: int | None = Field(None, ge=1, description="Examples per task (None: all).")
    speed: SpeedConfig = Field(default_factory=SpeedConfig)


class CalibrationConfig(StrictModel):
    """Text for passes that measure activations (pruning, GQA, GPTQ, ...); disjoint from evaluation text."""

    data: str = Field("builtin", description="Same choices as evaluation.data.")
    text_field: str = Field("text", description="Field to read from .jsonl lines or dataset rows.")
    samples: int = Field(32, ge=1, description="Number of token windows.")
    seq_len: int = Field(256, ge=8, description="Tokens per window.")


class ChecksConfig(StrictModel):
    """Quality gates evaluated at the end of `optimize`; any failure exits with code 1."""

    max_perplexity_increase_pct: float | None = Field(None, description="Optimized vs baseline perplexity, in %.")
    min_top1_agreement: float | None = Field(None, ge=0, le=1, description="Next-token agreement with the baseline.")
    max_kl: float | None = Field(None, ge=0, description="Mean KL(baseline || optimized) per token, in nats.")
    min_decode_speedup: float | None = Field(None, gt=0, description="Decode tokens/s ratio, optimized / baseline.")
    max_size_mb: float | None = Field(None, gt=0, description="Artifact weights size on disk, in MB.")
    max_size_ratio: float | None = Field(None, gt=0, description="Artifact weights size / baseline size.")


class Recipe(StrictModel):
    model: str | None = Field(
        None, description="Local folder, GGUF file, hub id ('org/name[@revision]') or 'demo'. --model overrides."
    )
    # numpy's seed takes 0 .. 2**32 - 1; torch's takes more, but one range for both keeps a run replayable.
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for every random choice (data sampling, "
                                                           "calibration), 0 to 4294967295.")
    allow_pickle: bool = Field(False, description="Allow loading pickle checkpoints (*.bin, *.pt): unsafe.")
    trust_remote_code: bool = Field(False, description="Allow running the model repository's own Python code.")
    passes: list[PassSpec] = Field(default_factory=list, description="Passes, run in order.")
    export: ExportConfig = Field(default_factory=ExportConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    checks: ChecksConfig = Field(default_factory=ChecksConfig)

    source: str | None = Field(None, exclude=True, description="Where the recipe was read from (not in YAML).")

    @field_validator("passes", mode="before")
    @classmethod
    def _typed_passes(cls, value: Any) -> Any:
        """Each pass as its type's config, so that `Recipe(passes=[{"type": "quantize", "bitz": 4}])` from Python
        is refused as the same YAML is (RecipeError, not an AttributeError later in plan())."""
        if not isinstance(value, list):
            return value  # pydantic's own "should be a valid list"
        return [p if isinstance(p, BaseModel) else _parse_pass(p, i, "recipe", {}) for i, p in enumerate(value)]


def _key_lines(node: yaml.Node, path: tuple = ()) -> dict[tuple, int]:
    """Map each key path of a YAML document to its 1-based line, for error messages."""
    lines: dict[tuple, int] = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            sub = (*path, key_node.value)
            lines.update(_key_lines(value_node, sub))
            lines[sub] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.update(_key_lines(item, (*path, i)))
    return lines


def _check_duplicate_keys(node: yaml.Node | None, where: str, path: tuple = ()) -> None:
    """PyYAML keeps the last of two equal keys without a word; a recipe that says a setting twice is refused."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                raise RecipeError(f"{where}:{line}: {_format_path((*path, key))}: the key '{key}' appears twice "
                                  f"in one mapping (first on line {seen[key]}); YAML would keep only the last.",
                                  "Keep one of the two.")
            if key is not None:
                seen[key] = line
            _check_duplicate_keys(value_node, where, (*path, key))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicate_keys(item, where, (*path, i))


def _format_path(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _closest(word: str, options: list[str]) -> str:
    match = difflib.get_close_matches(str(word), options, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def _allowed_keys(model_cls: type[BaseModel], path: tuple) -> list[str]:
    """Field names (and aliases) valid at `path` inside `model_cls`, to suggest a correction."""
    cls: Any = model_cls
    for part in path:
        if isinstance(part, int) or cls is None:
            return []
        field = cls.model_fields.get(part) or next(
            (f for f in cls.model_fields.values() if f.alias == part), None
        )
        annotation = getattr(field, "annotation", None)
        cls = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if cls is None:
        return []
    return [f.alias or name for name, f in cls.model_fields.items() if name != "source"]


def _raise_validation(exc: ValidationError, where: str, lines: dict[tuple, int], prefix: tuple, model_cls) -> None:
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        full = (*prefix, *loc)
        line = lines.get(full) or lines.get(full[:-1]) or lines.get(prefix)
        at = f"{where}:{line}" if line else where
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model_cls, loc[:-1])
            msg = f"unknown key '{loc[-1]}'.{_closest(loc[-1], allowed)}"
            if allowed:
                msg += f" Valid keys here: {', '.join(sorted(allowed))}."
        else:
            msg = err["msg"]
            if err["type"] not in ("missing",) and "input" in err:
                msg += f" (got {err['input']!r})"
        problems.append(f"{at}: {_format_path(full)}: {msg}")
    raise RecipeError(
        "Invalid recipe: " + "; ".join(p.rstrip(".") for p in problems) + ".",
        "Fix the key(s) named above; `llmopt schema` prints every valid key, and `llmopt recipes` lists working examples.",
    )


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; a bigger file is a mistake (or an attack)


def parse_recipe(text: str, where: str = "<recipe>") -> Recipe:
    """Parse and validate recipe YAML text. Raises RecipeError naming file, key path and line."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{where}: the recipe is larger than 1 MiB.", "A recipe is a short YAML file; check the path.")
    if not text.strip():
        raise RecipeError(f"{where}: the recipe is empty.", "Start from `llmopt recipes show int4-onnx`.")
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                # Aliases can make a tiny file expand into a huge structure (a "billion laughs"); recipes need none.
                raise RecipeError(f"{where}:{event.start_mark.line + 1}: YAML aliases (*name) are not allowed in recipes.",
                                  "Write the value out in full.")
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{where}:{mark.line + 1}" if mark else where
        raise RecipeError(
            f"{at}: the recipe is not valid YAML ({getattr(exc, 'problem', exc)}).",
            "Check indentation and quoting around that line.",
        ) from None
    if data is None:  # only comments
        raise RecipeError(f"{where}: the recipe is empty.", "Start from `llmopt recipes show int4-onnx`.")
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe must be a YAML mapping (key: value), got {type(data).__name__}.",
                          "Start from `llmopt recipes show int4-onnx`.")
    _check_duplicate_keys(root, where)
    lines = _key_lines(root) if root is not None else {}
    try:  # the passes apart: each is validated by its own type's config, with the lines of the file
        recipe = Recipe.model_validate({**{k: v for k, v in data.items() if k != "passes"}, "source": where})
    except ValidationError as exc:
        _raise_validation(exc, where, lines, (), Recipe)
    raw_passes = data.get("passes") or []
    if not isinstance(raw_passes, list):
        raise RecipeError(f"{where}:{lines.get(('passes',), '?')}: passes must be a list of mappings.",
                          "Write each pass as a list item: `- type: quantize`.")
    passes = [_parse_pass(p, i, where, lines) for i, p in enumerate(raw_passes)]
    return recipe.model_copy(update={"passes": passes})


def _parse_pass(raw: Any, index: int, where: str, lines: dict[tuple, int]) -> BaseModel:
    from llmopt.passes import PASSES

    at = f"{where}:{lines[('passes', index)]}" if ("passes", index) in lines else where
    if not isinstance(raw, dict) or "type" not in raw:
        raise RecipeError(
            f"{at}: passes[{index}] needs a 'type' (one of: {', '.join(PASSES)}).",
            "Write it as a mapping, e.g. `- type: quantize`.",
        )
    pass_type = raw["type"]
    if not isinstance(pass_type, str) or pass_type not in PASSES:  # `type: [..]` is unhashable
        line = lines.get(("passes", index, "type"))
        at = f"{where}:{line}" if line else where
        raise RecipeError(
            f"{at}: passes[{index}].type: unknown pass type '{pass_type}'.{_closest(pass_type, list(PASSES))}"
            f" Available: {', '.join(PASSES)}.",
            "Use one of the available types.",
        )
    config_cls = PASSES[pass_type].Config
    try:
        return config_cls.model_validate(raw)
    except ValidationError as exc:
        _raise_validation(exc, where, lines, ("passes", index), config_cls)


def find_shipped_recipe(name: str) -> Path | None:
    """A recipe shipped inside the wheel (llmopt/recipes/NAME.yaml), or None."""
    from importlib import resources

    candidate = resources.files("llmopt.recipes").joinpath(f"{name}.yaml")
    return Path(str(candidate)) if candidate.is_file() else None


def recipe_summary(name: str) -> str:
    """A shipped recipe's description: its leading comment lines, joined."""
    lines = []
    for line in find_shipped_recipe(name).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    return " ".join(lines)


def recipes_markdown() -> str:
    """The README's table of shipped recipes, from their descriptions (a test keeps the README in sync)."""
    rows = ["| recipe | what it makes |", "|---|---|"]
    rows += [f"| `{name}` | {recipe_summary(name).replace('|', '&#124;')} |" for name in shipped_recipe_names()]
    return "\n".join(rows) + "\n"


def shipped_recipe_names() -> list[str]:
    from importlib import resources

    return sorted(p.name[: -len(".yaml")] for p in resources.files("llmopt.recipes").iterdir() if p.name.endswith(".yaml"))


def load_recipe(spec: str | Path | Recipe) -> Recipe:
    """A Recipe from a path to a YAML file, a shipped recipe name, or a Recipe (returned as is)."""
    if isinstance(spec, Recipe):
        return spec
    path = Path(spec)
    if not path.is_file():
        shipped = find_shipped_recipe(str(spec))
        if shipped is None:
            names = shipped_recipe_names()
            raise RecipeError(
                f"No recipe file '{spec}' and no shipped recipe of that name.{_closest(str(spec), names)}",
                f"Give a path to a YAML file or one of: {', '.join(names)}.",
            )
        path = shipped
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"Recipe '{path}' is larger than 1 MiB.", "A recipe is a short YAML file; check the path.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"Cannot read recipe '{path}': {exc}.", "Check the path and that it is a UTF-8 text file.") from None
    return parse_recipe(text, where=str(path))
