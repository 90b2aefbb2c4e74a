"""Memory-bounded quantization: a safetensors checkpoint read, quantized and written one decoder layer at a time.

    from llmopt.passes.quantize import QuantizeConfig
    from llmopt.streaming import quantize_checkpoint
    quantize_checkpoint("llama-7b/", "out/", QuantizeConfig(method="gptq", awq=True), export_format="onnx")

or, from a recipe, `export: {streaming: true}` with one `quantize` pass (the pipeline's streamed schedule,
`run_streamed`). RTN needs nothing but each layer's tensors: peak memory is about one decoder layer in float32 (or
the embedding table, when larger), whatever the depth. GPTQ, AWQ and SignRound add the calibration activations
and each layer's module (llmopt.streaming_calibrated). The whole model is never built. The artifact is checked
against the model it holds with a reference computed layer by layer as it is written
(llmopt.streaming_reference), then loaded by its runtime; the pipeline's evaluation windows go through the same
walk, and through the checkpoint's float weights, for the quality figures. The codes are those of the `quantize` pass, so the artifacts match what
the non-streaming pipeline writes for the same recipe.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from llmopt.blocks import Block
from llmopt.checkpoint_reader import SKIPPED, CheckpointReader
from llmopt.errors import InputError, RecipeError
from llmopt.quantized import QuantizedTensor

if TYPE_CHECKING:
    import torch

    from llmopt.passes.quantize import QuantizeConfig
    from llmopt.recipe import OnnxValidation

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class StreamPlan:
    """What will be quantized, decided from the config and tensor headers before any weight is read."""

    config: dict[str, Any]
    quantize: QuantizeConfig
    num_layers: int
    quantized: frozenset[str]  # weight names stored as codes
    linears: frozenset[str]  # every decoder-layer projection weight, quantized or excluded
    tied: bool  # lm_head shares the embedding table in the input
    untie: bool  # the output gets an lm_head of its own (the pass's `_untie_if_needed`)
    extra_names: tuple[str, ...]  # top-level tensors other than embedding, norm and lm_head, copied as they are
    # GPTQ / AWQ / SignRound: the calibration token windows and the pipeline's seed (llmopt.streaming_calibrated).
    windows: tuple[Any, ...] | None = None
    seed: int = 0
    pass_info: dict[str, Any] = field(default_factory=dict)  # what calibration recorded, for the report
    # Codes the calibrated schedule computed for a tensor outside the layer blocks (SignRound's lm_head), by name.
    tuned: dict[str, QuantizedTensor] = field(default_factory=dict)
    # What sees every block before the writer (llmopt.streaming_reference.LayerTrace: the check and evaluation).
    observers: tuple[Any, ...] = ()

    @property
    def calibrated(self) -> bool:
        return self.quantize.method != "rtn" or self.quantize.awq

    def blocks(self, reader: CheckpointReader) -> Iterator[Block]:
        """Embedding, each decoder layer, then final norm and lm_head; each block's tensors read when it is due,
        and shown to the observers before the writer gets it."""
        for block in self._blocks(reader):
            for observer in self.observers:
                observer.see(block)
            yield block

    def _blocks(self, reader: CheckpointReader) -> Iterator[Block]:
        names = reader.names()
        if self.calibrated:
            from llmopt.streaming_calibrated import calibrated_layer_blocks

            if self.windows is None:
                raise RuntimeError("a calibrated stream plan needs its windows")  # a bug, not input
            yield from calibrated_layer_blocks(self, reader)
        else:
            yield Block("embedding", 0, {"model.embed_tokens.weight": reader.read("model.embed_tokens.weight")})
            for i in range(self.num_layers):
                yield Block("layer", i, {name: self._load(reader, name, name) for name in reader.layer_names(i)})
        final = Block("final", 0, {name: reader.read(name) for name in (*self.extra_names, "model.norm.weight")})
        if "lm_head.weight" in names:
            final.tensors["lm_head.weight"] = self._load(reader, "lm_head.weight", "lm_head.weight")
        elif self.untie:
            final.tensors["lm_head.weight"] = self._load(reader, "model.embed_tokens.weight", "lm_head.weight")
        yield final

    def _load(self, reader: CheckpointReader, source: str, name: str) -> Any:
        return self.tuned[name] if name in self.tuned else self.stored(name, reader.read(source))

    def stored(self, name: str, weight: torch.Tensor) -> Any:
        """What the artifact holds for `name`: its RTN codes when it is quantized, else the float tensor."""
        return quantize_rows(weight, name, self.quantize) if name in self.quantized else weight


STREAMING_NOTE = ("Quantized and written layer by layer from the safetensors checkpoint (export.streaming): the model "
                  "was never whole in memory.")
EVALUATED_NOTE = ("Quality measured layer by layer in PyTorch on the evaluation windows: the checkpoint's float weights "
                  "against the weights the artifact stores (the validation compares the artifact with the latter). "
                  "Speed is not measured: it needs the baseline whole in memory.")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_CHUNK_ELEMENTS = 1 << 22  # 16 MB of float32 per quantize_rtn call


def quantize_rows(weight: torch.Tensor, name: str, config: QuantizeConfig) -> QuantizedTensor:
    """The pass's `quantize_rtn`, a block of rows at a time: groups run along rows, so the codes are the same, and
    its float temporaries (several copies of its input) are a block's, not a 500 MB lm_head's."""
    import numpy as np

    from llmopt.passes.quantize import quantize_rtn

    rows, cols = weight.shape  # (out, in)
    step = max(1, _CHUNK_ELEMENTS // cols)
    parts = [quantize_rtn(weight[r:r + step], name, "linear", config) for r in range(0, rows, step)]
    if len(parts) == 1:
        return parts[0]
    return replace(parts[0], codes=np.concatenate([p.codes for p in parts]),
                   scales=np.concatenate([p.scales for p in parts]),
                   zero_points=np.concatenate([p.zero_points for p in parts]))


def plan_stream(folder: str | Path, quantize: QuantizeConfig, *, export_format: str = "onnx") -> tuple[StreamPlan, CheckpointReader]:
    """Check that the checkpoint and the quantization suit the streaming path; RecipeError / InputError if not."""
    from transformers import AutoConfig

    from llmopt.architectures import require
    from llmopt.consistency import check_checkpoint_tensors
    from llmopt.model import ArchInfo
    from llmopt.passes.quantize import QuantizePass

    reader = CheckpointReader(folder)
    config = reader.config
    # Plain decoder blocks (q/k/v/o, gate/up/down, RMSNorm, rotary): what the streaming writers describe.
    require(str(config.get("model_type")), "the streaming path", "export.streaming", capability="stream")
    q = quantize
    unsupported = [name for name, value in (("embeddings", q.embeddings), ("activations", q.activations != "float"),
                                            ("target_bits_per_weight", q.target_bits_per_weight is not None)) if value]
    if unsupported:
        raise RecipeError(f"quantize.{unsupported[0]}: the streaming path runs weight-only quantization (RTN, GPTQ "
                          "or SignRound, with or without AWQ) of the decoder layers and lm_head, with a float "
                          "embedding table; mixed precision needs the whole model's sensitivities.",
                          "Remove the option, or use the non-streaming pipeline (the model must then fit in "
                          "memory).")
    hf_config = AutoConfig.from_pretrained(folder)
    if export_format == "safetensors":
        from llmopt.exporters.safetensors import experts_layout_problem

        problem = experts_layout_problem(hf_config.model_type, [q])
        if problem:
            raise RecipeError(f"export.streaming: {problem}.", "Set `symmetric: true`, or export onnx.")
    if export_format == "onnx":
        from llmopt.exporters.onnx_writer import writer_problem

        problem = writer_problem(hf_config)
        if problem:
            raise RecipeError(f"export.streaming: the ONNX graph of '{folder}' cannot be written layer by layer: "
                              f"{problem}.", "Use export.format: safetensors for this model.")
    arch = ArchInfo.from_config(hf_config)
    QuantizePass(q).check(arch, "quantize")  # group_size divides every input width
    # Every tensor the architecture needs, with its shape, and none it does not: the layers are read by name.
    check_checkpoint_tensors(hf_config, {n: e.shape for n, e in reader.entries.items() if not SKIPPED.search(n)},
                             str(folder))
    names = set(reader.names())
    excluded = lambda name: any(fnmatch.fnmatchcase(name.removesuffix(".weight"), p) for p in q.exclude)
    layer_linears = {n for n in names if _LAYER.match(n) and n.endswith("_proj.weight")}
    tied = "lm_head.weight" not in names
    head_quantized = not excluded("lm_head.weight")
    quantized = {n for n in layer_linears if not excluded(n)} | ({"lm_head.weight"} if head_quantized else set())
    extra = tuple(n for n in sorted(names) if not _LAYER.match(n)
                  and n not in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"))
    plan = StreamPlan(config=config, quantize=q, num_layers=arch.num_layers, quantized=frozenset(quantized),
                      linears=frozenset(layer_linears),
                      tied=tied, untie=tied and head_quantized, extra_names=extra)
    return plan, reader


@dataclass
class StreamResult:
    output: Path
    files: dict[str, int]  # file name -> bytes
    quantized_tensors: int
    info: dict[str, Any] = field(default_factory=dict)  # the export's
    pass_info: dict[str, Any] = field(default_factory=dict)  # GPTQ / AWQ's, as the quantize pass reports them
    validation: Any = None  # llmopt.evaluation.report.ValidationRecord, or None when not validated
    notes: list[str] = field(default_factory=list)

    @property
    def size_bytes(self) -> int:
        return sum(self.files.values())


def stream_artifact(plan: StreamPlan, reader: CheckpointReader, folder: Path, *, export_format: str,
                    accuracy_level: int = 0, max_shard_bytes: int = 5_000_000_000, tokenizer: Any = None) -> StreamResult:
    """Write the plan's artifact (weights, config, tokenizer) into `folder`, block by block, every block shown to
    the plan's observers first. `tokenizer`: the checkpoint's, when the caller has loaded it already."""
    if export_format == "onnx":
        from llmopt.exporters.onnx_stream import write_onnx

        info = write_onnx(plan, reader, folder, accuracy_level=accuracy_level)
    else:
        from llmopt.exporters.safetensors_stream import write_safetensors

        info = write_safetensors(plan, reader, folder, max_shard_bytes=max_shard_bytes)
    _copy_tokenizer(reader.folder, folder, tokenizer)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    return StreamResult(folder, files, len(plan.quantized), info, plan.pass_info)


def quantize_checkpoint(model: str | Path, output: str | Path, quantize: QuantizeConfig, *,
                        export_format: Literal["onnx", "safetensors"] = "onnx", accuracy_level: int = 0,
                        max_shard_bytes: int = 5_000_000_000, force: bool = False, seed: int = 0,
                        calibration: list[Any] | None = None, validation: OnnxValidation | None = None,
                        validate: bool = True) -> StreamResult:
    """Quantize a local safetensors checkpoint layer by layer into an ONNX or safetensors artifact folder: the
    streamed schedule's artifact without a recipe, a report or an evaluation (`llmopt.optimize` with
    `export: {streaming: true}` gives those).

    GPTQ and AWQ calibrate on `calibration` (token id arrays; by default 32 windows of 256 tokens of the
    built-in text, drawn with `seed`). The artifact is checked against the model it holds, as the pipeline checks
    its artifacts (`validation`'s limits; prompts and a sequence past every window, in one prefill and through
    the KV cache), with a reference computed layer by layer as the layers are written; a failed check raises
    ResultValidationError and writes nothing. The folder appears at `output` only when complete (staged beside
    it, then renamed), with a manifest that records the quantize pass and export format.
    """
    import shutil

    from llmopt.artifact import OutputLock, check_destination, new_staging, promote, write_manifest
    from llmopt.pipeline import library_versions
    from llmopt.preflight import check_disk
    from llmopt.recipe import OnnxValidation
    from llmopt.streaming_reference import StreamCheck
    from llmopt.write_safety import Input, real

    plan, reader = plan_stream(model, quantize, export_format=export_format)
    tokenizer = checkpoint_tokenizer(Path(model), required=plan.calibrated and calibration is None)
    if plan.calibrated:
        plan = replace(plan, windows=tuple(calibration if calibration is not None
                                           else default_calibration(tokenizer, seed)), seed=seed)
    out = check_destination(Path(output), force, [Input("the model", real(model))])
    with OutputLock(out):
        check_disk(plan, reader, out)
        check = None
        if validate:
            check = StreamCheck(reader, export_format, validation or OnnxValidation(), tokenizer=tokenizer)
            plan = replace(plan, observers=check.traces)
        staging = new_staging(out)
        try:
            result = stream_artifact(plan, reader, staging, export_format=export_format,
                                     accuracy_level=accuracy_level, max_shard_bytes=max_shard_bytes,
                                     tokenizer=tokenizer)
            if check is not None:
                result.validation, result.notes = check.run(staging)
            recipe = {"model": str(model), "passes": [quantize.model_dump(mode="json")],
                      "export": {"format": export_format, "streaming": True}}
            write_manifest(staging, recipe=recipe, versions=library_versions(), seed=seed)
            promote(staging, out)
            result.output = out
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return result


def default_calibration(tokenizer: Any, seed: int) -> list[Any]:
    """32 windows of 256 tokens (the `calibration` section's defaults) of the built-in text, drawn with `seed`."""
    from llmopt.evaluation.calibration import calibration_batches
    from llmopt.recipe import CalibrationConfig

    c = CalibrationConfig()
    windows, _ = calibration_batches(tokenizer, data=c.data, text_field=c.text_field,
                                     samples=c.samples, seq_len=c.seq_len, seed=seed)
    return windows


def checkpoint_tokenizer(model: Path, required: bool = True) -> Any:
    """The checkpoint's tokenizer, which GPTQ and AWQ need to turn calibration text into token ids (None when the
    checkpoint has none and it is not `required`)."""
    from transformers import AutoTokenizer

    hint = "Put the model's tokenizer files next to its weights, or use method: rtn without awq."
    if not any((model / name).is_file() for name in TOKENIZER_FILES):
        if not required:
            return None
        raise InputError(f"GPTQ, AWQ and SignRound calibrate on text, and '{model}' has no tokenizer "
                         f"({', '.join(TOKENIZER_FILES)}).", hint)
    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise InputError(f"The tokenizer of '{model}' cannot be loaded: {str(exc).splitlines()[0]}",
                         "Fix or remove the tokenizer files next to the weights (GPTQ and AWQ need a tokenizer to "
                         "calibrate on text).") from None


def check_streamable(plan: Any) -> tuple[StreamPlan, CheckpointReader]:
    """The stream plan and reader of a pipeline plan (llmopt.pipeline.Plan) that can take the streaming path: a
    single weight-only `quantize` pass (RTN, GPTQ or SignRound, with or without AWQ) on a local or hub safetensors
    checkpoint of a described family, and nothing measured that needs the whole model (speed, lm-eval tasks).
    RecipeError naming why when it cannot; InputError for a damaged checkpoint (streamed or not, exit 3)."""
    passes, recipe = plan.recipe.passes, plan.recipe
    problem = None
    if len(passes) != 1 or passes[0].type != "quantize":
        problem = "the streaming path runs recipes made of one `quantize` pass"
    elif plan.source.kind not in ("local", "hub"):
        problem = f"the streaming path reads safetensors checkpoint folders (the model is a {plan.source.kind} source)"
    elif recipe.checks.min_decode_speedup is not None:
        problem = ("speed is not measured on a streamed run (it needs the baseline whole), so "
                   "checks.min_decode_speedup cannot be judged")
    elif recipe.evaluation.enabled and recipe.evaluation.tasks:
        problem = "lm-eval tasks (evaluation.tasks) run the whole model"
    else:
        try:
            return plan_stream(plan.source.path, passes[0], export_format=recipe.export.format)
        except RecipeError as exc:
            problem = exc.message
    raise RecipeError(f"export.streaming: this recipe cannot be streamed: {problem}.",
                      "Use one weight-only `quantize` pass on a safetensors checkpoint of a described family, "
                      "without speed checks or lm-eval tasks; or remove export.streaming.")


def run_streamed(plan: Any, staging: Path, steps: Any, resume: bool = False) -> Any:
    """The pipeline's streamed schedule (llmopt.pipeline.run with `export: {streaming: true}`): the recipe's
    `quantize` pass and export layer by layer into `staging`, the artifact checked, and the quality evaluated
    with both models run layer by layer; returns the pipeline's Outcome for its report. `steps` is the
    pipeline's step timer. `resume` starts over: a streamed run is one pass and keeps no checkpoints (its
    artifact is the same either way, as the run is deterministic); the report says so."""
    import time

    from llmopt.evaluation.report import ModelMetrics, PassRecord
    from llmopt.exporters.base import weight_bytes
    from llmopt.measure import Evaluation, evaluation_windows, quality_report
    from llmopt.pipeline import CalibrationSource, Outcome
    from llmopt.preflight import parameter_count
    from llmopt.streaming_reference import StreamCheck

    recipe, folder = plan.recipe, Path(plan.source.path)
    quantize, fmt, ev = recipe.passes[0], recipe.export.format, recipe.evaluation
    stream_plan, reader = plan.stream  # checked at plan time (check_streamable)
    tokenizer = checkpoint_tokenizer(folder, required=stream_plan.calibrated)
    notes = [STREAMING_NOTE]
    calibration = None
    if stream_plan.calibrated:  # the windows the in-memory pipeline would give the pass
        calibration = CalibrationSource(recipe, tokenizer)
        stream_plan = replace(stream_plan, windows=tuple(calibration()), seed=recipe.seed)
    windows: list[Any] = []
    description = ""
    if ev.enabled and tokenizer is None:
        notes.append("Not evaluated: the checkpoint has no tokenizer to read the evaluation text with.")
    elif ev.enabled:
        windows, description = evaluation_windows(recipe, tokenizer)
        notes.append(EVALUATED_NOTE)
    else:
        notes.append("Not evaluated (evaluation.enabled: false).")
    check = StreamCheck(reader, fmt, recipe.export.validate_result, windows, tokenizer)
    stream_plan = replace(stream_plan, observers=(*check.traces, _BlockProgress(steps.progress, stream_plan.num_layers)))

    t0 = time.perf_counter()
    with steps("quantize and export, layer by layer"):
        result = stream_artifact(stream_plan, reader, staging, export_format=fmt,
                                 accuracy_level=recipe.export.accuracy_level, tokenizer=tokenizer)
    seconds = time.perf_counter() - t0
    input_bytes = plan.source.input_bytes  # the checkpoint's safetensors files
    evaluation = Evaluation(baseline_bytes=input_bytes, threads=None)
    if windows:
        with steps("quality (perplexity, KL, top-1)"):
            scores = check.quality(steps.progress.advance)
        evaluation.baseline["perplexity"] = scores.baseline_perplexity
        evaluation.optimized["perplexity"] = scores.perplexity
        evaluation.quality = quality_report(scores, description, ev.window)
    with steps("validate artifact"):
        evaluation.validation, check_notes = check.run(staging)

    parameters = parameter_count(plan.source)
    runtime = plan.exporter.runtime
    kv_bytes = plan.arch.kv_cache_bytes_per_token()
    return Outcome(
        export={"format": fmt, "runtime": runtime, "files": sorted(result.files), **result.info},
        baseline=ModelMetrics(runtime="pytorch, layer by layer" if windows else "safetensors checkpoint (not run)",
                              parameters=parameters, size_bytes=input_bytes, kv_cache_bytes_per_token=kv_bytes,
                              **evaluation.baseline),
        optimized=ModelMetrics(runtime=runtime, parameters=parameters, size_bytes=weight_bytes(staging),
                               kv_cache_bytes_per_token=kv_bytes, **evaluation.optimized),
        passes=[PassRecord(type="quantize", seconds=seconds, info={
            "method": quantize.method, "bits": quantize.bits, "group_size": quantize.group_size,
            "symmetric": quantize.symmetric, "quantized_tensors": result.quantized_tensors, "streaming": True,
            **result.pass_info})],
        evaluation=evaluation,
        notes=notes + check_notes
        + ([f"calibration data: {calibration.description}"] if calibration else [])
        + (["--resume: a streamed run keeps no checkpoints, so this one started over."] if resume else []),
        kv_cache_context_tokens=plan.arch.extra.get("max_position_embeddings"),
    )


class _BlockProgress:
    """The layers written so far, on the run's progress (a 7B layer takes seconds to minutes)."""

    def __init__(self, progress: Any, layers: int) -> None:
        self.progress, self.total, self.done = progress, layers + 2, 0  # with the embedding and the final block

    def see(self, block: Block) -> None:
        self.done += 1
        self.progress.advance(self.done, self.total)


def _copy_tokenizer(model: Path, folder: Path, tokenizer: Any = None) -> None:
    """The tokenizer and generation config next to the weights, as the exporters write them."""
    import shutil

    if tokenizer is None:
        tokenizer = checkpoint_tokenizer(model, required=False)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if (model / "generation_config.json").is_file():
        # As given: transformers refuses to save a config with sampling settings but no do_sample.
        shutil.copyfile(model / "generation_config.json", folder / "generation_config.json")
