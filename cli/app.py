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

from llmopt.cli.summaries import print_version
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


@app.callback()
def _options(
    quiet: bool = flag("--quiet", "-q", help="Only errors, the final verdict and results (for CI)."),
    verbose: bool = flag("--verbose", "-v", help="Also the libraries' own warnings, notices and "
                                 "progress bars (transformers, optimum, onnxruntime), hidden by default."),
    version: bool = flag("--version", callback=print_version, is_eager=True,
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
    from llmopt.cli.render import ConsoleProgress, console, err_console, quiet, verbose
    from llmopt.cli.summaries import print_plan, print_summary, verdict
    from llmopt.evaluation.junit import junit_xml as to_junit
    from llmopt.pipeline import plan_inputs
    from llmopt.write_safety import Input, check_file_output, real, write_file

    if dry_run:
        print_plan(recipe, as_json, model=model, output=output, format=format, eval_data=eval_data,
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
            # The libraries' messages are in the artifact's llmopt.log; on the terminal with -v only.
            result = run(the_plan, force=force, progress=progress, resume=resume, echo_library_messages=verbose())
    except LlmoptError as exc:
        if junit_xml is not None:
            write_file(junit_xml, to_junit(None, exc), junit_inputs)
        raise
    if junit_xml is not None:
        write_file(junit_xml, to_junit(result.report), junit_inputs)
    if as_json:
        print(result.report.model_dump_json(indent=2))
    elif not quiet():
        print_summary(result.report, console)
    if not result.passed:
        failed = "; ".join(f"{c.name}: {c.value if c.value is None else round(c.value, 4)} vs {c.threshold}"
                           for c in result.failed_checks)
        err_console.print(f"[bold red]Quality checks failed[/] (exit 1): {failed}. The artifact and its report are "
                          f"in {result.output} for inspection.", soft_wrap=True)
    if not as_json:
        console.print(verdict(result), soft_wrap=True)
    if not result.passed:
        raise typer.Exit(ExitCode.CHECK_FAILED)


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
            from llmopt.cli.summaries import print_recipes

            print_recipes(console, {name: recipe_summary(name) for name in shipped_recipe_names()}, indent="  ")
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
    from llmopt.evaluation.compare import compare_many, comparison_to_markdown

    if as_json:
        if format not in ("table", "json"):
            raise RecipeError(f"--json and --format {format} ask for two formats.", "Give one of them.")
        format = "json"

    if format not in ("table", "md", "json", "html"):
        raise RecipeError(f"Unknown --format '{format}'.", "Use table, md, json or html.")
    if len(reports) < 2:
        raise RecipeError("compare needs at least two reports.", "Give a reference and one or more runs to compare.")
    from llmopt.cli.summaries import unique_names

    names = unique_names(reports)
    c = compare_many(reports, names)
    if format == "table":
        from llmopt.cli.summaries import print_comparison

        print_comparison(c, names)
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

    s = run_bench(model, assistant=assistant, new_tokens=new_tokens, draft_tokens=draft_tokens, threads=threads,
                  allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if as_json:
        print(json.dumps(s.as_dict(), indent=2))
        return
    from llmopt.cli.summaries import print_speculative

    print_speculative(s, model, assistant)


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
    from llmopt.cli.summaries import print_recipes

    print_recipes(console, summaries)


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
