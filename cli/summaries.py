"""What `optimize` and `validate --dry-run` print: the run's summary table and verdict line, the plan, the recipe
listing. rich loads inside them: `llmopt --help` and `--version` import this module (start-up time)."""

from __future__ import annotations

import json
from pathlib import Path


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


def print_summary(report, console) -> None:
    from llmopt.cli.render import table
    from llmopt.evaluation.report import headline_rows, timing_spreads

    def fmt(v, spread=None):
        text = "–" if v is None else (f"{v:,.3f}" if isinstance(v, float) else f"{v:,}")
        return text + (f" ±{spread:.3g}" if v is not None and spread is not None else "")

    spreads = timing_spreads(report)
    rows = [[name, fmt(a, spreads.get(name, (None, None))[0]), fmt(b, spreads.get(name, (None, None))[1])]
            for name, a, b in headline_rows(report)]
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


def print_plan(recipe: str, as_json: bool, *, output: Path, force: bool, junit_xml: Path | None,
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
    streamed = ", streamed layer by layer" if r.export.streaming else ""
    console.print(f"  export: {r.export.format}{streamed}; evaluated on {plan['device']}; evaluation: "
                  + (f"{r.evaluation.data}, {r.evaluation.max_tokens} tokens" if r.evaluation.enabled else "off"))
    gates = ", ".join(f"{k} {'≤' if k.startswith('max_') else '≥'} {v}" for k, v in plan["checks"].items())
    console.print(f"  checks: {gates or 'none'}")
    how = "layer by layer" if r.export.streaming else "float32 copies in memory at once"
    console.print(f"  estimated peak memory: {plan['estimated_peak_memory_mb']:,.0f} MB ({how}; "
                  f"{plan['available_memory_mb']:,.0f} MB available), disk: {plan['estimated_disk_mb']:,.0f} MB")
    console.print("Dry run: nothing was loaded or written.")
    preflight.check(need)  # a plan that cannot fit fails the dry run too (exit 5), after showing it


def print_recipes(console, summaries: dict[str, str], indent: str = "") -> None:
    """Names in one column, whole descriptions beside them (wrapped under the description on a terminal)."""
    from rich.table import Table

    listing = Table.grid(padding=(0, 2))
    listing.add_column(style="bold", no_wrap=True)
    listing.add_column()
    for name, summary in summaries.items():
        listing.add_row(f"{indent}{name}", summary)
    console.print(listing)


def print_comparison(c, names: list[str]) -> None:
    """`llmopt compare`'s table: each run against the first, changes beyond the spread coloured, the Pareto front."""
    from llmopt.cli.render import console, table
    from llmopt.evaluation.compare import format_value as fmt

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


def unique_names(paths: list[Path]) -> list[str]:
    """Short names for the runs: the artifact folder's name, or the full path when two would clash."""
    short = [_short_name(p) for p in paths]
    return short if len(set(short)) == len(short) else [str(p) for p in paths]


def _short_name(path: Path) -> str:
    return path.parent.name if path.name == "report.json" else path.name


def print_speculative(s, model: str, assistant: str) -> None:
    """`llmopt bench`'s table (llmopt.evaluation.speculative's summary)."""
    from llmopt.cli.render import console, table

    rows = [["acceptance rate (per drafted token)", f"{s.acceptance_rate:.1%}"],
            [f"expected tokens per target step (k = {s.draft_tokens})", f"{s.expected_tokens_per_step:.2f}"],
            ["tokens/s, model alone", f"{s.tokens_per_s_plain:.1f}"],
            ["tokens/s, with the draft", f"{s.tokens_per_s_assisted:.1f}"],
            ["speed-up", f"{s.speedup:.2f}x"],
            ["greedy outputs identical", "yes" if s.outputs_equal else "NO"]]
    console.print(table(f"{model} assisted by {assistant}: {s.prompts} prompts x {s.new_tokens} greedy tokens, "
                        f"{s.threads} threads", ["metric", "value"], rows))


def print_version(value: bool) -> None:
    """`llmopt --version` (an eager option: it prints and exits before any command)."""
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"llmopt {version('llmopt')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            print("llmopt (not installed)")
        import typer

        raise typer.Exit(0)
