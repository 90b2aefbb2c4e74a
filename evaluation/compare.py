"""`llmopt compare`: every metric of two reports side by side, with absolute and relative change."""

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


@dataclass
class CompareRow:
    metric: str
    a: float | None
    b: float | None
    change: float | None
    change_pct: float | None
    better: bool | None  # is B better than A on this metric (None when equal or unknown)


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
        rows.append(CompareRow(label, va, vb, change, pct, better))
    return rows


def rows_to_markdown(rows: list[CompareRow], name_a: str, name_b: str) -> str:
    def fmt(v: float | None) -> str:
        return "–" if v is None else (f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}")

    lines = [f"| metric | {name_a} | {name_b} | change | change % |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        mark = "" if r.better is None else (" ✅" if r.better else " ⚠️")
        pct = "–" if r.change_pct is None else f"{r.change_pct:+.1f}%"
        lines.append(f"| {r.metric} | {fmt(r.a)} | {fmt(r.b)} | {fmt(r.change)} | {pct}{mark} |")
    return "\n".join(lines) + "\n"


def rows_to_dicts(rows: list[CompareRow]) -> list[dict]:
    return [asdict(r) for r in rows]
