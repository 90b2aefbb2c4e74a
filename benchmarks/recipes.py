"""Benchmark: every shipped recipe on the demo model (SmolLM2-135M-Instruct), one after the other, in one table.

    python benchmarks/recipes.py [--only NAME ...] [--threads N] [--model demo] [--output DIR]

Each recipe runs through the Python API (`llmopt.optimize`, the path `llmopt optimize NAME --model demo`
takes) with its own settings, so every row is what a user gets from the shipped recipe; the exit column is
the code the CLI would return (0 passed, 1 a quality gate failed, 2-5 an llmopt error, 70 a crash). Rows are
printed as they finish and the table is rewritten to OUTPUT/table.md after each recipe, so an interrupted
run keeps its finished rows.

Budget, 2-core CPU: an export-only recipe takes one load, export and two evaluations of 4,096 tokens: int4-onnx
4 to 5 minutes on an idle VM (the README's first command), 10.5 min and int4-fused-onnx 24 min measured by this
script on the shared VM at a load average of about 10; int4-mixed-onnx, which first measures each of the 211
Linears' sensitivity with its own forward passes and then runs GPTQ, was still running after 56 min there
(load 4 to 10). The three recipes that train add 100 distillation
steps of batch 4 x 256 tokens: ~9 s a step for draft-model (15 layers, its recipe's note), so ~15 min of
training; gqa-distill (attention weights only) and prune-width-distill (every weight but the embedding) run
the full model forward and back each step, so expect 15 to 30 min each (estimated from those step times, not
measured). Run it on an idle machine, or expect the wall column to say how busy it was.

fp16-onnx-gpu asks for `execution_provider: auto`: without a GPU the artifact runs on onnxruntime's CPU
provider, which runs fp16 graphs slowly; the device and the report's notes are printed under the table.
"""

from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path

import llmopt
from llmopt.errors import ExitCode, LlmoptError
from llmopt.recipe import load_recipe, shipped_recipe_names

CRASH_EXIT_CODE = 70  # what the CLI exits with on an unexpected exception

HEADER = ("recipe", "exit", "wall", "size MB (base → opt)", "perplexity (base → opt)", "KL", "top-1",
          "decode tok/s (base → opt)", "quality gate", "device")


def with_threads(recipe, threads: int | None):
    """The recipe with its speed measurement pinned to `threads` (None: the recipe's own setting)."""
    if threads is None:
        return recipe
    speed = recipe.evaluation.speed.model_copy(update={"threads": threads})
    return recipe.model_copy(update={"evaluation": recipe.evaluation.model_copy(update={"speed": speed})})


def arrow(before: float | None, after: float | None, fmt: str) -> str:
    if before is None or after is None:
        return "–"
    return f"{before:{fmt}} → {after:{fmt}}"


def gate(checks) -> str:
    if not checks:
        return "none in recipe"
    parts = []
    for check in checks:
        value = "–" if check.value is None else f"{check.value:.3g}"
        parts.append(f"{check.name} {value} vs {check.threshold:g} {'pass' if check.passed else 'FAIL'}")
    return "; ".join(parts)


def report_row(name: str, code: int, seconds: float, report) -> tuple[str, ...]:
    b, o, q = report.baseline, report.optimized, report.quality
    perplexity = arrow(b.perplexity, o.perplexity, ".2f")
    if q is not None:
        perplexity += f" ({q.perplexity_increase_pct:+.1f}%)"
    return (name, str(code), f"{seconds / 60:.1f} min",
            f"{b.size_bytes / 1e6:.1f} → {o.size_bytes / 1e6:.1f}", perplexity,
            "–" if q is None else f"{q.kl_divergence:.3f}", "–" if q is None else f"{q.top1_agreement:.1%}",
            arrow(b.decode_tokens_per_s, o.decode_tokens_per_s, ".1f"), gate(report.checks),
            report.environment.get("device", "?"))


def table(rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these recipes, in this order (default: all)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and onnxruntime CPU threads (default: all cores, as the recipes do)")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--output", type=Path, default=Path.home() / ".cache" / "llmopt-bench" / "recipes",
                        help="one artifact folder per recipe is written (and replaced) here")
    args = parser.parse_args()

    names = args.only or shipped_recipe_names()
    unknown = [n for n in names if n not in shipped_recipe_names()]
    if unknown:
        parser.error(f"not shipped recipes: {', '.join(unknown)}; choose from {', '.join(shipped_recipe_names())}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # the passes (calibration, GPTQ, distillation) and PyTorch evaluation
    args.output.mkdir(parents=True, exist_ok=True)

    rows, notes, environment = [], [], {}
    for name in names:
        print(f"--- {name}", flush=True)
        start = time.perf_counter()
        try:
            result = llmopt.optimize(with_threads(load_recipe(name), args.threads), model=args.model,
                                     output=args.output / name, force=True)
        except LlmoptError as exc:
            seconds = time.perf_counter() - start
            rows.append((name, str(exc.exit_code), f"{seconds / 60:.1f} min", *["–"] * (len(HEADER) - 5),
                         exc.title, "–"))
            notes.append(f"{name}: {exc.title}: {exc}")
        except Exception as exc:  # noqa: BLE001 - a crash in one recipe must not lose the other rows
            seconds = time.perf_counter() - start
            traceback.print_exc()
            rows.append((name, str(CRASH_EXIT_CODE), f"{seconds / 60:.1f} min", *["–"] * (len(HEADER) - 5),
                         "crashed", "–"))
            notes.append(f"{name}: crashed: {type(exc).__name__}: {exc}")
        else:
            seconds = time.perf_counter() - start
            report = result.report
            code = ExitCode.OK if result.passed else ExitCode.CHECK_FAILED
            rows.append(report_row(name, code, seconds, report))
            environment = report.environment
            notes += [f"{name}: {note}" for note in report.notes]
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        (args.output / "table.md").write_text(table(rows) + "\n" + "".join(f"\n- {n}" for n in notes) + "\n")

    print(f"\nSmolLM2-135M-Instruct ({args.model}) on {environment.get('cpu', '?')}, "
          f"{environment.get('threads', '?')} threads; each recipe's own evaluation settings; "
          f"artifacts in {args.output}\n")
    print(table(rows))
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
