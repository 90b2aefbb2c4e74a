"""Typer app. Heavy modules (torch, transformers) load inside commands, never at import."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

from llmopt.errors import ExitCode, LlmoptError

app = typer.Typer(
    name="llmopt",
    help="Make Hugging Face causal LMs cheaper and faster: run a recipe of passes, export ONNX or safetensors, "
    "and get an accuracy report.\n\nExit codes: 0 ok, 1 quality check failed, 2 recipe/usage error, "
    "3 input rejected, 4 result validation failed, 5 out of resources, 130 interrupted.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def flag(*names: str, **kwargs: Any) -> Any:
    """An option that is off unless given. metavar "": typer would print `<bool>` beside it in --help, as if the
    switch took a value."""
    return typer.Option(False, *names, metavar="", **kwargs)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"llmopt {version('llmopt')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            print("llmopt (not installed)")
        raise typer.Exit(0)


@app.callback()
def _options(
    quiet: bool = flag("--quiet", "-q", help="Only errors, the final verdict and results (for CI)."),
    verbose: bool = flag("--verbose", "-v", help="Also the libraries' own warnings, notices and "
                                 "progress bars (transformers, optimum, onnxruntime), hidden by default."),
    version: bool = flag("--version", callback=_print_version, is_eager=True,
                                 help="Print llmopt's version and exit."),
) -> None:
    """Options for every command: `llmopt -q optimize ...`."""
    from llmopt.cli.render import NORMAL, QUIET, VERBOSE, set_verbosity

    if quiet and verbose:
        from llmopt.errors import RecipeError

        raise RecipeError("-q (quiet) and -v (verbose) cannot be used together.", "Choose one.")
    set_verbosity(QUIET if quiet else VERBOSE if verbose else NORMAL)


recipes_app = typer.Typer(help="List and show the recipes shipped with llmopt.", invoke_without_command=True)
app.add_typer(recipes_app, name="recipes")

OVERRIDE_HELP = "Overrides the recipe's"


@app.command()
def optimize(
    recipe: str = typer.Argument(..., help="Recipe YAML file, or the name of a shipped recipe (see `llmopt recipes`)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=f"{OVERRIDE_HELP} model: folder, .gguf, hub id or 'demo'."),
    output: Path = typer.Option(..., "--output", "-o", help="Artifact folder to write (with report.json/.md)."),
    format: Optional[str] = typer.Option(None, "--format", "-f", help=f"{OVERRIDE_HELP} export.format: onnx or safetensors."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help=f"{OVERRIDE_HELP} evaluation.data."),
    force: bool = flag("--force", help="Replace an existing output (swapped in only when complete)."),
    resume: bool = flag("--resume", help="Continue a run on this --output that was killed (SIGKILL, "
                                "out of memory) after some passes, from its last completed pass: the same artifact as "
                                "an uninterrupted run. Without a checkpoint it starts afresh; a checkpoint of another "
                                "recipe, model or version is refused (exit 2). Ctrl-C and errors remove checkpoints."),
    allow_pickle: bool = flag("--allow-pickle", help="Allow pickle checkpoints (unsafe)."),
    trust_remote_code: bool = flag("--trust-remote-code", help="Allow the model's own Python code."),
    as_json: bool = flag("--json", help="Print the report as JSON on stdout."),
    dry_run: bool = flag("--dry-run", help="Validate, resolve the model, print the plan and stop."),
    junit_xml: Optional[Path] = typer.Option(None, "--junit-xml", help="Also write the checks (and any error) as "
                                             "JUnit XML, for CI systems that display test results."),
) -> None:
    """Run a recipe on a model: passes, export, validation, evaluation, report."""
    from llmopt.api import plan, run
    from llmopt.artifact import check_destination
    from llmopt.cli.render import ConsoleProgress, console, err_console, quiet
    from llmopt.evaluation.junit import junit_xml as to_junit
    from llmopt.pipeline import plan_inputs
    from llmopt.write_safety import Input, check_file_output, real, write_file

    if dry_run:
        _print_plan(recipe, as_json, model=model, output=output, format=format, eval_data=eval_data,
                    allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, force=force, junit_xml=junit_xml)
        return

    # The JUnit file may land in no input and not in the artifact: checked before the run, written after it.
    junit_inputs = [Input("the output folder", real(output))]
    if junit_xml is not None:
        check_file_output(junit_xml, junit_inputs)
    try:
        if not force:  # cheap checks first: an existing output before any loading (--force: checked with the inputs)
            check_destination(output, force, dry_run=True)
        with ConsoleProgress() as progress:
            # Something on screen at once: planning reads the model's config (a GGUF's metadata takes seconds).
            progress.step("check the recipe against the model")
            started = time.perf_counter()
            the_plan = plan(recipe, output=output, model=model, format=format, eval_data=eval_data,
                            allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
            junit_inputs += plan_inputs(the_plan)
            if junit_xml is not None:
                check_file_output(junit_xml, junit_inputs)
            progress.done("check the recipe against the model", time.perf_counter() - started)
            result = run(the_plan, force=force, progress=progress, resume=resume)
    except LlmoptError as exc:
        if junit_xml is not None:
            write_file(junit_xml, to_junit(None, exc), junit_inputs)
        raise
    if junit_xml is not None:
        write_file(junit_xml, to_junit(result.report), junit_inputs)
    if as_json:
        print(result.report.model_dump_json(indent=2))
    elif not quiet():
        _print_summary(result.report, console)
    if not result.passed:
        failed = "; ".join(f"{c.name}: {c.value if c.value is None else round(c.value, 4)} vs {c.threshold}"
                           for c in result.failed_checks)
        err_console.print(f"[bold red]Quality checks failed[/] (exit 1): {failed}. The artifact and its report are "
                          f"in {result.output} for inspection.", soft_wrap=True)
    if not as_json:
        console.print(verdict(result), soft_wrap=True)
    if not result.passed:
        raise typer.Exit(ExitCode.CHECK_FAILED)


def verdict(result) -> str:
    """The run's last line: checks passed or failed, the headline figures, and where the report is."""
    report = result.report
    b, o = report.baseline, report.optimized
    figures = []
    if b.perplexity and o.perplexity:
        figures.append(f"perplexity {b.perplexity:.2f} → {o.perplexity:.2f} ({(o.perplexity / b.perplexity - 1):+.1%})")
    if b.size_bytes and o.size_bytes:
        given = report.model.get("input_bytes")
        figures.append(f"size {b.size_bytes / 1e6:.1f} → {o.size_bytes / 1e6:.1f} MB"
                       + (f" (the input's files: {given / 1e6:.1f} MB)" if given else ""))
    if b.decode_tokens_per_s and o.decode_tokens_per_s:
        figures.append(f"decode {b.decode_tokens_per_s:.1f} → {o.decode_tokens_per_s:.1f} tokens/s")
    checks = report.checks
    if not checks:
        status = "[bold]DONE[/] (the recipe has no quality checks)"
    elif result.passed:
        status = f"[bold green]PASSED[/] ({len(checks)} of {len(checks)} checks)"
    else:
        status = f"[bold red]FAILED[/] ({len(result.failed_checks)} of {len(checks)} checks failed)"
    page = result.output / "report.html"
    where = f"report: {page}" if page.is_file() else f"artifact and report: {result.output}"
    return f"{status}: " + ", ".join(figures) + ("; " if figures else "") + where


def _print_summary(report, console) -> None:
    from llmopt.cli.render import table
    from llmopt.evaluation.report import headline_rows

    def fmt(v):
        return "–" if v is None else (f"{v:,.3f}" if isinstance(v, float) else f"{v:,}")

    rows = [[name, fmt(a), fmt(b)] for name, a, b in headline_rows(report)]
    if report.quality:
        rows += [["KL divergence (nats/token)", "", f"{report.quality.kl_divergence:.4f}"],
                 ["top-1 agreement", "", f"{report.quality.top1_agreement:.2%}"]]
    for check in report.checks:
        sense = "≤" if check.name.startswith("max_") else "≥"  # max_* gates are upper bounds, min_* lower ones
        rows.append([f"check {check.name} {sense} {check.threshold}", "", "pass" if check.passed else "FAIL"])
    name = report.model.get("name") or report.model["spec"]
    console.print(table(f"llmopt — {name} → {report.export['format']}", ["metric", "baseline", "optimized"], rows))
    for note in report.notes:
        console.print(f"note: {note}", soft_wrap=True)


@app.command()
def validate(
    recipe: str = typer.Argument(..., help="Recipe YAML file or shipped recipe name."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=f"{OVERRIDE_HELP} model."),
    format: Optional[str] = typer.Option(None, "--format", "-f", help=f"{OVERRIDE_HELP} export.format."),
    allow_pickle: bool = flag("--allow-pickle"),
    trust_remote_code: bool = flag("--trust-remote-code"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also check this artifact folder as "
                                          "`optimize --output` would (writable, overlapping no input or artifact)."),
    force: bool = flag("--force", help="With --output: check it as `optimize --force` would."),
    as_json: bool = flag("--json", help="Print the plan as JSON."),
) -> None:
    """Check a recipe and the pass order on the model's architecture, without loading weights."""
    from llmopt.api import validate as run_validate
    from llmopt.artifact import check_destination
    from llmopt.cli.render import console
    from llmopt.pipeline import plan_inputs

    the_plan = run_validate(recipe, model=model, format=format, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if output is not None:
        check_destination(output, force, plan_inputs(the_plan), dry_run=True)
    summary = {
        "recipe": the_plan.recipe.source, "model": the_plan.source.spec, "model_type": the_plan.arch.model_type,
        "passes": [p.type for p in the_plan.passes], "export": the_plan.recipe.export.format,
    }
    if as_json:
        print(json.dumps({"valid": True, **summary}))
        return
    passes = " → ".join(summary["passes"]) or "(no passes)"
    console.print(f"[green]valid[/]: {summary['recipe']} on {summary['model']} ({summary['model_type']}): "
                  f"{passes} → {summary['export']}")


def _print_plan(recipe: str, as_json: bool, *, output: Path, force: bool, junit_xml: Path | None,
                **overrides) -> None:
    from llmopt import preflight
    from llmopt.api import validate as run_validate
    from llmopt.artifact import check_destination
    from llmopt.cli.render import console
    from llmopt.devices import device_name
    from llmopt.pipeline import plan_inputs
    from llmopt.write_safety import Input, check_file_output, real

    the_plan = run_validate(recipe, **overrides)
    check_destination(output, force, plan_inputs(the_plan), dry_run=True)  # every output check; creates nothing
    if junit_xml is not None:
        check_file_output(junit_xml, [Input("the output folder", real(output)), *plan_inputs(the_plan)])
    r = the_plan.recipe
    need = preflight.estimate(the_plan, output)
    parameters, memory = need.parameters, need.memory_bytes
    plan = {
        "model": the_plan.source.spec, "source": the_plan.source.kind, "model_type": the_plan.arch.model_type,
        "parameters": parameters, "output": str(output),
        "passes": [p.config.model_dump(mode="json") for p in the_plan.passes],
        "calibration": r.calibration.model_dump() if any(p.needs_calibration for p in the_plan.passes) else None,
        "export": r.export.model_dump(mode="json", by_alias=True),
        "evaluation": r.evaluation.model_dump() if r.evaluation.enabled else None,
        "checks": {k: v for k, v in r.checks.model_dump().items() if v is not None},
        "estimated_peak_memory_mb": round(memory / 1e6, 1),
        "available_memory_mb": round(need.available_memory_bytes / 1e6, 1),
        "estimated_disk_mb": round(need.disk_bytes / 1e6, 1),
        "fits": need.fits_memory and need.fits_disk,
        "device": device_name(the_plan.provider),
        "kv_cache_bytes_per_token": {"before": the_plan.arch.kv_cache_bytes_per_token(),
                                     "after": the_plan.planned_arch.kv_cache_bytes_per_token()},
    }
    if as_json:
        print(json.dumps(plan, indent=2))
        preflight.check(need)
        return
    console.print(f"[bold]Plan[/] for {plan['model']} ({plan['model_type']}, {parameters:,} parameters) -> {output}")
    for i, p in enumerate(the_plan.passes):
        # The settings as the recipe gives them (what it leaves to the defaults is not repeated).
        given = p.config.model_dump(mode="json", exclude_unset=True)
        settings = ", ".join(f"{k}: {json.dumps(v)}" for k, v in given.items() if k != "type")
        console.print(f"  {i + 1}. {p.type}" + (f" ({settings})" if settings else ""), soft_wrap=True)
    if plan["calibration"]:
        c = plan["calibration"]
        console.print(f"  calibration: {c['data']}, {c['samples']} x {c['seq_len']} tokens")
    console.print(f"  export: {r.export.format}; evaluated on {plan['device']}; evaluation: "
                  + (f"{r.evaluation.data}, {r.evaluation.max_tokens} tokens" if r.evaluation.enabled else "off"))
    gates = ", ".join(f"{k} {'≤' if k.startswith('max_') else '≥'} {v}" for k, v in plan["checks"].items())
    console.print(f"  checks: {gates or 'none'}")
    console.print(f"  estimated peak memory: {plan['estimated_peak_memory_mb']:,.0f} MB (float32 copies in memory at once; "
                  f"{plan['available_memory_mb']:,.0f} MB available), disk: {plan['estimated_disk_mb']:,.0f} MB")
    console.print("Dry run: nothing was loaded or written.")
    preflight.check(need)  # a plan that cannot fit fails the dry run too (exit 5), after showing it


def _can_ask() -> bool:
    return sys.stdin.isatty()


@app.command()
def init(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Folder, .gguf file, hub id or 'demo' (asked for "
                                        "when missing on a terminal)."),
    goal: Optional[str] = typer.Option(None, "--goal", "-g", help="A shipped recipe to start from, e.g. int4-onnx "
                                       "(`llmopt recipes` lists them; asked for when missing on a terminal)."),
    output: Path = typer.Option(Path("recipe.yaml"), "--output", "-o", help="Recipe file to write."),
    force: bool = flag("--force", help="Replace an existing file."),
    allow_pickle: bool = flag("--allow-pickle"),
    trust_remote_code: bool = flag("--trust-remote-code"),
) -> None:
    """Write a starting recipe for a model: a shipped recipe with `model:` set, checked against the model's config."""
    from llmopt.cli.render import console
    from llmopt.errors import RecipeError
    from llmopt.init import init_recipe, write_new_file
    from llmopt.recipe import recipe_summary, shipped_recipe_names

    if model is None or goal is None:
        if not _can_ask():
            raise RecipeError("llmopt init needs --model and --goal when it cannot ask (no terminal, e.g. in CI).",
                              f"For example: llmopt init --model demo --goal int4-onnx. Goals: "
                              f"{', '.join(shipped_recipe_names())}.")
        if model is None:
            model = typer.prompt("Model (folder, .gguf file, hub id or 'demo')")
        if goal is None:
            _print_recipes(console, {name: recipe_summary(name) for name in shipped_recipe_names()}, indent="  ")
            goal = typer.prompt("Goal (one of the recipes above)", default="int4-onnx")
    from llmopt.model import resolve_model
    from llmopt.write_safety import Input, real

    text = init_recipe(model, goal, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    source = resolve_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    write_new_file(output, text, force, [Input("the model", real(source.read_root))])
    console.print(f"Wrote {output} ({goal} for {model}); run it with `llmopt optimize {output} --output out/`.")


@app.command()
def inspect(
    model: str = typer.Argument(..., help="Folder, .gguf file, hub id or 'demo'."),
    allow_pickle: bool = flag("--allow-pickle"),
    trust_remote_code: bool = flag("--trust-remote-code"),
    as_json: bool = flag("--json", help="Print as JSON."),
) -> None:
    """Architecture, parameters by module type, dtypes, size, KV cache, and which passes apply — no weights loaded."""
    from llmopt.cli.render import console, table
    from llmopt.inspect import inspect_model

    info = inspect_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    a = info["architecture"]
    console.print(f"[bold]{model}[/] ({info['source']}): {a['model_type']}, {a['num_layers']} layers, hidden "
                  f"{a['hidden_size']}, MLP {a['intermediate_size']}, {a['num_heads']} heads / {a['num_kv_heads']} KV "
                  f"heads of {a['head_dim']}, vocab {a['vocab_size']}, tied embeddings: {'yes' if a['tie_word_embeddings'] else 'no'}")
    rows = [[kind, f"{n:,}", f"{n / info['parameters']:.1%}"] for kind, n in info["parameters_by_module_type"].items()]
    console.print(table(f"{info['parameters']:,} parameters, {info['size_bytes'] / 1e6:.1f} MB on disk",
                        ["module type", "parameters", "share"], rows))
    console.print("dtypes: " + ", ".join(f"{k} {v:,}" for k, v in info["dtypes"].items()))
    console.print(f"KV cache per token: {info['kv_cache_bytes_per_token_fp32']:,} bytes (fp32), "
                  f"{info['kv_cache_bytes_per_token_fp16']:,} bytes (fp16)")
    for name, verdict in {**info["passes"], **info["exporters"]}.items():
        console.print(f"  {name}: {verdict}", soft_wrap=True)


@app.command()
def schema(
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
    docs: bool = flag("--docs", help="Write the pass reference (Markdown) instead of the JSON schema."),
    report: bool = flag("--report", help="The JSON schema of report.json instead of recipes."),
) -> None:
    """JSON schema of recipes (for editor validation and completion, see README) or of reports; or the pass reference."""
    from llmopt.schema import passes_markdown, recipe_json_schema, report_json_schema

    if docs:
        text = passes_markdown()
    else:
        text = json.dumps(report_json_schema() if report else recipe_json_schema(), indent=2) + "\n"
    if output is None:
        print(text, end="")
    else:
        from llmopt.write_safety import write_file

        write_file(output, text)


@app.command()
def compare(
    reports: list[Path] = typer.Argument(..., help="Two or more report.json files or artifact folders; the first is the "
                                                   "reference."),
    format: str = typer.Option("table", "--format", "-f", help="table, md, json or html."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
    as_json: bool = flag("--json", help="Print as JSON (the same as --format json, as every other "
                                                       "command spells it)."),
) -> None:
    """Metrics of several runs side by side: change against the first, significance, and the Pareto front."""
    from llmopt.errors import RecipeError
    from llmopt.evaluation.compare import compare_many, comparison_to_markdown, format_value as fmt

    if as_json:
        if format not in ("table", "json"):
            raise RecipeError(f"--json and --format {format} ask for two formats.", "Give one of them.")
        format = "json"

    if format not in ("table", "md", "json", "html"):
        raise RecipeError(f"Unknown --format '{format}'.", "Use table, md, json or html.")
    if len(reports) < 2:
        raise RecipeError("compare needs at least two reports.", "Give a reference and one or more runs to compare.")
    names = _unique_names(reports)
    c = compare_many(reports, names)
    if format == "table":
        from llmopt.cli.render import console, table

        body = []
        for i, row in enumerate(c.rows[0]):
            cells = [row.metric, fmt(row.a)]
            for rows in c.rows:
                r = rows[i]
                pct = "" if r.change_pct is None or not r.change else f" {r.change_pct:+.1f}%{'*' if r.significant else ''}"
                colour = "" if r.better is None or not r.significant else ("green" if r.better else "red")
                cells.append(f"[{colour}]{fmt(r.b)}{pct}[/]" if colour else f"{fmt(r.b)}{pct}")
            body.append(cells)
        console.print(table(f"{names[0]} → " + ", ".join(names[1:]), ["metric", *names], body))
        front = [n for n, p in zip(c.names, c.pareto) if p]
        console.print("* significant: beyond the 95% intervals (quality), the spread over runs (speed), or any change "
                      f"(exact metrics). Pareto front on perplexity, size and decode speed: {', '.join(front) or '–'}",
                      soft_wrap=True)
        return
    if format == "json":
        text = json.dumps(c.as_dict(), indent=2) + "\n"
    elif format == "md":
        text = comparison_to_markdown(c)
    else:
        from llmopt.evaluation.html import render_compare_html

        text = render_compare_html(list(zip(c.names, c.reports)))
    if output is None:
        print(text, end="")
    else:
        from llmopt.write_safety import Input, real, write_file

        write_file(output, text, [Input("a compared report", real(p)) for p in reports])


def _unique_names(paths: list[Path]) -> list[str]:
    """Short names for the runs: the artifact folder's name, or the full path when two would clash."""
    short = [_short_name(p) for p in paths]
    return short if len(set(short)) == len(short) else [str(p) for p in paths]


@app.command()
def bench(
    model: str = typer.Argument(..., help="The model to speed up: folder (safetensors), .gguf file, hub id or 'demo'."),
    assistant: str = typer.Option(..., "--assistant", "-a", help="Draft model with the same tokenizer, e.g. an "
                                  "artifact of the draft-model recipe exported as safetensors."),
    new_tokens: int = typer.Option(64, "--new-tokens", min=2, help="Tokens generated per prompt."),
    draft_tokens: int = typer.Option(5, "--draft-tokens", min=1, help="Tokens the draft proposes per step."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: torch's)."),
    allow_pickle: bool = flag("--allow-pickle"),
    trust_remote_code: bool = flag("--trust-remote-code"),
    as_json: bool = flag("--json", help="Print as JSON."),
) -> None:
    """Speculative decoding with a draft model: acceptance rate, tokens/s with and without it, output equality."""
    from llmopt.api import bench as run_bench
    from llmopt.cli.render import console, table

    s = run_bench(model, assistant=assistant, new_tokens=new_tokens, draft_tokens=draft_tokens, threads=threads,
                  allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if as_json:
        print(json.dumps(s.as_dict(), indent=2))
        return
    rows = [["acceptance rate (per drafted token)", f"{s.acceptance_rate:.1%}"],
            [f"expected tokens per target step (k = {s.draft_tokens})", f"{s.expected_tokens_per_step:.2f}"],
            ["tokens/s, model alone", f"{s.tokens_per_s_plain:.1f}"],
            ["tokens/s, with the draft", f"{s.tokens_per_s_assisted:.1f}"],
            ["speed-up", f"{s.speedup:.2f}x"],
            ["greedy outputs identical", "yes" if s.outputs_equal else "NO"]]
    console.print(table(f"{model} assisted by {assistant}: {s.prompts} prompts x {s.new_tokens} greedy tokens, "
                        f"{s.threads} threads", ["metric", "value"], rows))


@app.command()
def verify(
    artifact: Path = typer.Argument(..., help="Artifact folder written by `llmopt optimize`."),
    as_json: bool = flag("--json", help="Print as JSON."),
) -> None:
    """Check every file of an artifact against the sha256 and size in its manifest.json (exit 4 if any differs).

    This proves integrity against accidents, not authenticity: a manifest re-hashed after tampering matches
    too. Sign manifest.json with an external tool (sigstore, gpg) to prove who wrote it."""
    from llmopt.artifact import verify_manifest
    from llmopt.errors import InputError, ResultValidationError

    if not artifact.is_dir():
        raise InputError(f"'{artifact}' is not a folder.", "Give the artifact folder that holds manifest.json.")
    problems = verify_manifest(artifact)
    if as_json:
        print(json.dumps({"artifact": str(artifact), "intact": not problems, "problems": problems}, indent=2))
    if problems:
        raise ResultValidationError(f"Artifact '{artifact}' does not match its manifest: {'; '.join(problems)}.",
                                    "Re-run `llmopt optimize` to rebuild it, or restore the files from a good copy.")
    if not as_json:
        from llmopt.cli.render import console

        files = len(json.loads((artifact / "manifest.json").read_text(encoding="utf-8"))["files"])
        console.print(f"intact: {files} files match the sha256 and size in {artifact / 'manifest.json'}")


def _short_name(path: Path) -> str:
    return path.parent.name if path.name == "report.json" else path.name


@recipes_app.callback()
def recipes_list(ctx: typer.Context,
                 as_json: bool = flag("--json", help="Print as JSON.")) -> None:
    """List shipped recipes (usable by name in `llmopt optimize NAME`)."""
    if ctx.invoked_subcommand:
        return
    from llmopt.cli.render import console
    from llmopt.recipe import recipe_summary, shipped_recipe_names

    summaries = {name: recipe_summary(name) for name in shipped_recipe_names()}
    if as_json:
        print(json.dumps(summaries, indent=2))
        return
    _print_recipes(console, summaries)


def _print_recipes(console, summaries: dict[str, str], indent: str = "") -> None:
    """Names in one column, whole descriptions beside them (wrapped under the description on a terminal)."""
    from rich.table import Table

    listing = Table.grid(padding=(0, 2))
    listing.add_column(style="bold", no_wrap=True)
    listing.add_column()
    for name, summary in summaries.items():
        listing.add_row(f"{indent}{name}", summary)
    console.print(listing)


@recipes_app.command("show")
def recipes_show(name: str = typer.Argument(..., help="Shipped recipe name.")) -> None:
    """Print a shipped recipe."""
    from llmopt.recipe import find_shipped_recipe, load_recipe

    load_recipe(name)  # a clear error for an unknown name
    print(find_shipped_recipe(name).read_text(encoding="utf-8"), end="")


def main() -> None:
    """Entry point: run the app, turning library errors into one paragraph and an exit code."""
    # Only an explicit yes turns debugging on: LLMOPT_DEBUG=0 or an empty value must not turn user errors into
    # tracebacks.
    debug = os.environ.get("LLMOPT_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")
    terminated: list[int] = []

    def on_sigterm(signum, frame) -> None:
        # SIGTERM (a CI job cancelled, `kill`) unwinds like Ctrl-C, so partial work is removed the same way.
        terminated.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        # Without standalone mode click returns typer.Exit's code instead of raising it.
        code = app(standalone_mode=False)
        if code == ExitCode.INTERRUPTED:  # typer turns Ctrl-C into this code without a word
            raise KeyboardInterrupt
    except LlmoptError as exc:
        if debug:
            raise
        from llmopt.cli.render import print_error

        print_error(exc)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        what = "Terminated (SIGTERM)" if terminated else "Interrupted"
        print(f"{what}: nothing was written to the output (partial work is removed).", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Not sys.exit: when the interrupt arrived inside a C-level PyRun call (torch does some), CPython keeps
        # a flag that makes the process kill itself with SIGINT at exit, whatever code it exits with. The
        # pipeline's `finally` blocks have removed the partial work by now.
        os._exit(ExitCode.TERMINATED if terminated else ExitCode.INTERRUPTED)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click's own usage errors and real bugs
        try:  # typer >= 0.20 vendors click as typer._click; older typer depends on click itself
            from typer._click.exceptions import ClickException
        except ImportError:
            from click.exceptions import ClickException

        if isinstance(exc, ClickException):
            exc.show()
            sys.exit(ExitCode.USAGE)
        if isinstance(exc, typer.Abort):
            sys.exit(ExitCode.INTERRUPTED)
        if debug:
            raise
        from llmopt.errors import translate

        typed = translate(exc)  # a full disk, a permission, a damaged file: the user's to fix, not a bug
        if typed is not None:
            from llmopt.cli.render import print_error

            print_error(typed)
            sys.exit(typed.exit_code)
        print(f"Internal error: {type(exc).__name__}: {exc}\nThis is a bug in llmopt; rerun with LLMOPT_DEBUG=1 for "
              "the traceback and report it.", file=sys.stderr)
        sys.exit(70)
    else:
        sys.exit(code if isinstance(code, int) else 0)
