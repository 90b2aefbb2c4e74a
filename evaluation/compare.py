"""`llmopt compare`: every metric of two or more reports side by side, with change, significance and the Pareto front."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from llmopt.evaluation.report import Report, read_report

# (label, path into the report, higher is better?) — the metrics a reader compares runs on.
METRICS: list[tuple[str, tuple[str, ...], bool]] = [
    ("parameters", ("optimized", "parameters"), False),
    ("size on disk (MB)", ("optimized", "size_bytes"), False),
    ("perplexity", ("optimized", "perplexity"), False),
    ("baseline perplexity", ("baseline", "perplexity"), False),
    ("KL divergence (nats/token)", ("quality", "kl_divergence"), False),
    ("top-1 agreement", ("quality", "top1_agreement"), True),
    ("perplexity increase (%)", ("quality", "perplexity_increase_pct"), False),
    ("prefill latency (ms)", ("optimized", "prefill_ms"), False),
    ("decode (tokens/s)", ("optimized", "decode_tokens_per_s"), True),
    ("baseline decode (tokens/s)", ("baseline", "decode_tokens_per_s"), True),
    ("peak memory added (MB)", ("optimized", "peak_memory_mb"), False),
    ("KV cache (bytes/token)", ("optimized", "kv_cache_bytes_per_token"), False),
    ("total time (s)", ("total_seconds",), False),
]


# Metrics measured exactly (a change is real), estimated with a confidence interval, or timed with a spread.
EXACT = {"parameters", "size on disk (MB)", "KV cache (bytes/token)"}
INTERVALS = {"perplexity": "perplexity", "KL divergence (nats/token)": "kl_divergence",
             "top-1 agreement": "top1_agreement", "perplexity increase (%)": "perplexity_increase_pct"}
SPREADS = {"prefill latency (ms)": ("optimized", "prefill_ms"), "decode (tokens/s)": ("optimized", "decode_tokens_per_s"),
           "baseline decode (tokens/s)": ("baseline", "decode_tokens_per_s")}


@dataclass
class CompareRow:
    metric: str
    a: float | None
    b: float | None
    change: float | None
    change_pct: float | None
    better: bool | None  # is B better than A on this metric (None when equal or unknown)
    # Is the change more than measurement noise? Exact metrics: any change. Quality: the two 95% intervals do
    # not overlap. Speed: the ranges median ± spread (spread = max - min over runs) do not overlap.
    # None when the reports carry no interval or spread for it.
    significant: bool | None = None


def format_value(v: float | None) -> str:
    """A metric for a table: '–' when missing, thousands separators for large values, 4 significant digits."""
    return "–" if v is None else (f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}")


def _range(report: Report, metric: str) -> tuple[float, float] | None:
    if metric in INTERVALS and report.quality is not None:
        interval = report.quality.intervals.get(INTERVALS[metric])
        return tuple(interval) if interval else None  # type: ignore[return-value]
    if metric in SPREADS:
        side, field = SPREADS[metric]
        metrics = getattr(report, side)
        median, spread = getattr(metrics, field), getattr(metrics, f"{field}_spread")
        return None if median is None or spread is None else (median - spread, median + spread)
    return None


def _significant(metric: str, ra: Report, rb: Report, change: float | None) -> bool | None:
    if change is None:
        return None
    if metric in EXACT:
        return change != 0
    a, b = _range(ra, metric), _range(rb, metric)
    if a is None or b is None:
        return None
    return a[1] < b[0] or b[1] < a[0]


def _get(report: Report, path: tuple[str, ...]) -> float | None:
    value: object = report
    for part in path:
        value = getattr(value, part, None)
        if value is None:
            return None
    if path[-1] == "size_bytes":
        value = value / 1e6  # type: ignore[operator]
    return float(value)  # type: ignore[arg-type]


def compare_reports(a: str | Path | Report, b: str | Path | Report) -> list[CompareRow]:
    ra = a if isinstance(a, Report) else read_report(a)
    rb = b if isinstance(b, Report) else read_report(b)
    rows = []
    for label, path, higher_better in METRICS:
        va, vb = _get(ra, path), _get(rb, path)
        change = None if va is None or vb is None else vb - va
        pct = None if change is None or not va else change / abs(va) * 100
        better = None if not change else (change > 0) == higher_better
        rows.append(CompareRow(label, va, vb, change, pct, better, _significant(label, ra, rb, change)))
    return rows


def dominates(p: tuple[float, float, float], q: tuple[float, float, float]) -> bool:
    """p is at least as good as q on (perplexity, size, decode speed) and strictly better on one of them."""
    at_least = p[0] <= q[0] and p[1] <= q[1] and p[2] >= q[2]
    return at_least and (p[0] < q[0] or p[1] < q[1] or p[2] > q[2])


def pareto_front(points: list[tuple[float, float, float]]) -> list[bool]:
    """Which runs no other run dominates: lower perplexity, lower size, higher decode speed (points in that order)."""
    return [not any(dominates(p, q) for j, p in enumerate(points) if j != i) for i, q in enumerate(points)]


@dataclass
class Comparison:
    """Runs compared with the first (the reference), and the Pareto front over all of them."""

    names: list[str]
    reports: list[Report]
    rows: list[list[CompareRow]]  # rows[i]: run i + 1 against run 0
    pareto: list[bool | None]  # None for a run without perplexity, size and decode speed

    def as_dict(self) -> dict:
        return {"reference": self.names[0],
                "runs": [{"name": n, "pareto": p} for n, p in zip(self.names, self.pareto)],
                "comparisons": [{"a": self.names[0], "b": self.names[i + 1], "rows": rows_to_dicts(rows)}
                                for i, rows in enumerate(self.rows)]}


def compare_many(paths: list[str | Path], names: list[str] | None = None) -> Comparison:
    reports = [read_report(p) for p in paths]
    names = names or [str(p) for p in paths]
    rows = [compare_reports(reports[0], r) for r in reports[1:]]
    points = [(r.optimized.perplexity, r.optimized.size_bytes, r.optimized.decode_tokens_per_s) for r in reports]
    complete = [p for p in points if None not in p]
    front = iter(pareto_front(complete))  # type: ignore[arg-type]
    pareto = [None if None in p else next(front) for p in points]
    return Comparison(names, reports, rows, pareto)


def rows_to_markdown(rows: list[CompareRow], name_a: str, name_b: str) -> str:
    fmt = format_value
    lines = [f"| metric | {name_a} | {name_b} | change | change % |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        mark = "" if r.better is None else (" ✅" if r.better else " ⚠️")
        pct = "–" if r.change_pct is None else f"{r.change_pct:+.1f}%"
        noise = " (within noise)" if r.significant is False and r.change else ""
        lines.append(f"| {r.metric} | {fmt(r.a)} | {fmt(r.b)} | {fmt(r.change)} | {pct}{mark}{noise} |")
    return "\n".join(lines) + "\n"


def comparison_to_markdown(c: Comparison) -> str:
    """One table for N runs: each value with its change against the first; * marks a significant change."""
    fmt = format_value
    lines = ["| metric | " + " | ".join(c.names) + " |", "|---|" + "---:|" * len(c.names)]
    for i, (label, _, _) in enumerate(METRICS):
        cells = [fmt(c.rows[0][i].a)] if c.rows else []
        for rows in c.rows:
            r = rows[i]
            pct = "" if r.change_pct is None or not r.change else f" ({r.change_pct:+.1f}%{'*' if r.significant else ''})"
            cells.append(fmt(r.b) + pct)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    front = [n for n, p in zip(c.names, c.pareto) if p]
    lines += ["", "\\* significant: beyond the 95% intervals (quality), the spread over runs (speed), or any change "
              "(exact metrics).", f"Pareto front on perplexity, size and decode speed: {', '.join(front) or '–'}."]
    return "\n".join(lines) + "\n"


def rows_to_dicts(rows: list[CompareRow]) -> list[dict]:
    return [asdict(r) for r in rows]
