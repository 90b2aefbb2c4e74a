"""The HTML report: one self-contained file, written next to report.json and report.md.

Inline CSS and inline SVG charts drawn here (no scripts, no web fonts, no external URL: the file opens offline).
Every piece of text from a report goes through `_e` (control characters made visible, then `html.escape`).

- `render_html(report)`: baseline vs optimized for one run — bar charts, headline table, quality with confidence
  intervals, per-layer error, the distillation loss curve, a precision map, checks, passes, generation samples.
- `render_compare_html([(name, report), ...])`: N runs — a metrics table, quality vs size scatter with the Pareto
  front marked, and one bar chart per metric.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Sequence
from typing import Any

from llmopt.evaluation.compare import dominates, pareto_front
from llmopt.evaluation.report import Report, headline_rows

__all__ = ["render_compare_html", "render_html"]

BASE_COLOR = "#94a3b8"
OPT_COLOR = "#2563eb"
GOOD = "#15803d"
BAD = "#b91c1c"
INK = "#0f172a"
MUTED = "#64748b"
GRID = "#e2e8f0"
# One colour per run on the compare page (colour-blind-friendly order, Tableau 10).
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac"]
MAX_TEXT = 2000  # characters of a generation sample shown
MAX_VALUE = 90  # characters of one pass-info value shown

# Control characters are shown as \xNN (the samples of a small or damaged model are full of them; the Unicode
# "control pictures" are missing from common fonts) and lone surrogates as U+FFFD, which would fail the UTF-8 write.
_CONTROLS: dict[int, Any] = {i: f"\\x{i:02x}" for i in [*range(32), *range(0x7F, 0xA0)] if i not in (9, 10)}
_CONTROLS.update({13: None})
_CONTROLS.update({i: 0xFFFD for i in range(0xD800, 0xE000)})


def _e(text: Any) -> str:
    """Text, made safe to put anywhere in the document (element content or a quoted attribute)."""
    return html.escape(str(text).translate(_CONTROLS), quote=True)


def _num(value: Any, sig: int = 4) -> str:
    """A number for people: thousands separators for big ones, `sig` significant digits otherwise."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        magnitude = abs(value)
        if magnitude == 0:
            return "0"
        if magnitude >= 10 ** sig:
            return f"{value:,.0f}"
        if magnitude < 1e-3:
            return f"{value:.3g}"
        return f"{value:.{sig}g}"
    return str(value)


def _pct(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or a == 0:
        return None
    return (b - a) / abs(a) * 100


def _spread(*spreads: float | None) -> float:
    """How far two medians may differ by chance: the sum of the two runs' spreads (0 when not measured)."""
    return float(sum(s for s in spreads if s))


def _higher_is_better(metric: str) -> bool:
    return any(word in metric.lower() for word in ("tokens/s", "tok/s", "agreement", "speedup"))


# Memory figures move by this much between two runs of the same model (allocator, page cache): a smaller
# change is no finding, whatever its ratio (0.1 -> 0.6 MB is not "6x worse").
MEMORY_NOISE_MB = 1.0


def _noise(metric: str) -> float:
    return MEMORY_NOISE_MB if "(MB)" in metric and "memory" in metric.lower() else 0.0


def _change_html(a: Any, b: Any, higher_better: bool, noise: float = 0.0) -> str:
    """"+10.0%" coloured green when the change is an improvement, red when it is a regression, muted when it is
    within `noise` (an absolute difference the measurement cannot tell from zero)."""
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return "–"
    pct = _pct(float(a), float(b))
    if pct is None:
        return "–"
    if abs(pct) < 0.05:
        return '<span class="muted">±0%</span>'
    if abs(float(b) - float(a)) <= noise:
        return f'<span class="muted">{pct:+.1f}% (within noise)</span>'
    better = (pct > 0) == higher_better
    return f'<span class="{"good" if better else "bad"}">{pct:+.1f}%</span>'


def _interval(quality: Any, metric: str) -> list[float] | None:
    if quality is None:
        return None
    value = (getattr(quality, "intervals", None) or {}).get(metric)
    return list(value) if value and len(value) == 2 and None not in value else None


def _level(quality: Any) -> str:
    level = getattr(quality, "confidence_level", None)
    return f"{level:.0%}" if level else "95%"


# ---------------------------------------------------------------- SVG primitives


def _ticks(lo: float, hi: float, count: int = 5) -> tuple[float, float, list[float]]:
    """Round axis bounds enclosing [lo, hi] and ticks at a 1/2/2.5/5 x 10^k step."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        lo, hi = 0.0, 1.0
    if hi <= lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = (lo - pad if lo - pad >= 0 or lo < 0 else 0.0), hi + pad
    raw = (hi - lo) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if raw <= m * magnitude * (1 + 1e-9))
    start, end = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    ticks = [start + i * step for i in range(round((end - start) / step) + 1)]
    return start, end, ticks


def _tick_label(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e5 or magnitude < 1e-3:
        return f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{value:,.6g}" if magnitude >= 1e4 else f"{value:.6g}"


def _svg(width: int, height: int, body: str, label: str) -> str:
    return (f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="{_e(label)}">{body}</svg>')


def _text(x: float, y: float, text: str, *, size: int = 12, anchor: str = "start", fill: str = INK,
          weight: str = "normal", extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{fill}" '
            f'font-weight="{weight}"{extra}>{_e(text)}</text>')


def _bar_pair(title: str, base: float | None, opt: float | None, *, higher_better: bool,
              opt_interval: list[float] | None = None, noise: float = 0.0) -> str:
    """Two bars (baseline, optimized) from zero, value labels, the change under the title, a CI whisker. A change
    within `noise` (the runs' spread, or a memory floor) is shown, not judged."""
    values = [v for v in (base, opt) if v is not None]
    if not values:
        return ""
    width, height, left, right, top, bottom = 240, 220, 46, 10, 56, 30
    tops = values + ([opt_interval[1]] if opt_interval else [])
    lo, hi, ticks = _ticks(min(0.0, *values), max(tops) * 1.08 if max(tops) > 0 else 1.0, 4)
    plot_h, plot_w = height - top - bottom, width - left - right

    def y(v: float) -> float:
        return top + plot_h * (1 - (v - lo) / (hi - lo))

    parts = [_text(8, 18, title, size=13, weight="600")]
    pct = _pct(base, opt)
    if pct is not None:
        if abs(pct) < 0.05:
            parts.append(_text(8, 36, "no change", fill=MUTED))
        elif base is not None and opt is not None and abs(opt - base) <= noise:
            parts.append(_text(8, 36, f"{pct:+.1f}%, within the spread of the runs (±{noise:.3g})", fill=MUTED))
        else:
            good = (pct > 0) == higher_better
            ratio = (opt / base if higher_better else base / opt) if base and opt else None
            ratio = max(ratio, 1 / ratio) if ratio else None  # "3.4× worse", not "0.29× worse"
            extra = f" · {ratio:.2f}×" if ratio and ratio >= 1.1 else ""
            parts.append(_text(8, 36, f"{pct:+.1f}%{extra} {'better' if good else 'worse'}",
                               fill=GOOD if good else BAD, weight="600"))
    for t in ticks:
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="{GRID}"/>')
        parts.append(_text(left - 6, y(t) + 4, _tick_label(t), size=10, anchor="end", fill=MUTED))
    bar_w = 54
    for i, (name, value, color) in enumerate((("baseline", base, BASE_COLOR), ("optimized", opt, OPT_COLOR))):
        cx = left + plot_w * (0.27 + 0.46 * i)
        parts.append(_text(cx, height - 10, name, size=11, anchor="middle", fill=MUTED))
        if value is None:
            parts.append(_text(cx, y(lo) - 6, "n/a", size=11, anchor="middle", fill=MUTED))
            continue
        y0, y1 = y(max(lo, 0.0)), y(value)
        parts.append(f'<rect x="{cx - bar_w / 2:.1f}" y="{min(y0, y1):.1f}" width="{bar_w}" '
                     f'height="{max(abs(y0 - y1), 0.5):.1f}" rx="3" fill="{color}"><title>{_e(name)}: '
                     f'{_e(_num(value))}</title></rect>')
        label_y = y1
        if i == 1 and opt_interval:
            ylo, yhi = y(opt_interval[0]), y(opt_interval[1])
            parts.append(f'<g stroke="{INK}" stroke-width="1.5"><line x1="{cx:.1f}" x2="{cx:.1f}" y1="{ylo:.1f}" '
                         f'y2="{yhi:.1f}"/><line x1="{cx - 8:.1f}" x2="{cx + 8:.1f}" y1="{ylo:.1f}" y2="{ylo:.1f}"/>'
                         f'<line x1="{cx - 8:.1f}" x2="{cx + 8:.1f}" y1="{yhi:.1f}" y2="{yhi:.1f}"/></g>')
            label_y = min(label_y, yhi)
        parts.append(_text(cx, label_y - 5, _num(value), size=11, anchor="middle", weight="600"))
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(max(lo, 0.0)):.1f}" y2="{y(max(lo, 0.0)):.1f}" '
                 f'stroke="{MUTED}"/>')
    return _svg(width, height, "".join(parts), title)


def _line_chart(series: Sequence[tuple[str, str, Sequence[tuple[float, float]]]], *, x_label: str, y_label: str,
                log_y: bool | None = None, integer_x: bool = False, marks: Sequence[tuple[float, str]] = (),
                width: int = 980, height: int = 300) -> str:
    """Lines (name, colour, [(x, y)]) on shared axes; log y when the values span two decades or more."""
    points = [(x, y) for _, _, pts in series for x, y in pts]
    if not points:
        return ""
    ys = [y for _, y in points]
    if log_y is None:
        log_y = min(ys) > 0 and max(ys) / min(ys) >= 100
    left, right, top, bottom = 64, 16, 30 if len(series) > 1 else 14, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    ty = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    if log_y:
        lo, hi = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
        hi = hi if hi > lo else lo + 1
        step = max(1, math.ceil((hi - lo) / 6))
        yticks = [float(t) for t in range(lo, hi + 1, step)]
        ylo, yhi = float(lo), float(hi)
    else:
        ylo, yhi, yticks = _ticks(min(0.0, min(ys)) if min(ys) >= 0 and min(ys) < 0.25 * max(ys) else min(ys),
                                  max(ys), 5)
    xs = [x for x, _ in points]
    xlo, xhi, xticks = _ticks(min(xs), max(xs), 6)
    if integer_x:  # layers, steps: whole-number ticks inside the data, half a unit of margin
        step = max(1, round(xticks[1] - xticks[0]) if len(xticks) > 1 else 1)
        first, last = math.ceil(min(xs) / step) * step, math.floor(max(xs))
        xticks = [float(t) for t in range(first, last + 1, step)]
        xlo, xhi = min(xs) - 0.5, max(xs) + 0.5

    def px(x: float) -> float:
        return left + plot_w * (x - xlo) / (xhi - xlo)

    def py(v: float) -> float:
        return top + plot_h * (1 - (ty(v) - ylo) / (yhi - ylo))

    parts = []
    for t in yticks:
        yy = top + plot_h * (1 - (t - ylo) / (yhi - ylo))
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="{GRID}"/>')
        parts.append(_text(left - 6, yy + 4, _tick_label(10 ** t if log_y else t), size=10, anchor="end",
                           fill=MUTED))
    for t in xticks:
        parts.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" '
                     f'stroke="{MUTED}"/>')
        parts.append(_text(px(t), top + plot_h + 16, _tick_label(t), size=10, anchor="middle", fill=MUTED))
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="{MUTED}"/>')
    parts.append(_text(left + plot_w / 2, height - 6, x_label, size=11, anchor="middle", fill=MUTED))
    parts.append(_text(14, top + plot_h / 2, y_label + (" (log scale)" if log_y else ""), size=11, anchor="middle",
                       fill=MUTED, extra=f' transform="rotate(-90 14 {top + plot_h / 2:.1f})"'))
    for x, label in marks:
        parts.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{top}" y2="{top + plot_h}" stroke="{MUTED}" '
                     f'stroke-dasharray="4 3"/>')
        parts.append(_text(px(x) + 4, top + 10, label, size=10, fill=MUTED))
    for name, color, pts in series:
        if not pts:
            continue
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2" '
                     f'stroke-linejoin="round"/>')
        if len(pts) <= 80:
            parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"><title>{_e(name)} '
                      f'{_e(_tick_label(x))}: {_e(_num(y))}</title></circle>' for x, y in pts]
    if len(series) > 1:
        x = width - right
        for name, color, _ in reversed(series):
            x -= 12 + 7 * len(name) + 18
            parts.append(f'<rect x="{x:.1f}" y="8" width="12" height="12" rx="2" fill="{color}"/>')
            parts.append(_text(x + 16, 18, name, size=11))
    return _svg(width, height, "".join(parts), y_label)


# ---------------------------------------------------------------- sections of the single-run report


def _section(title: str, body: str, anchor: str = "") -> str:
    ident = f' id="{_e(anchor)}"' if anchor else ""
    return f'<section{ident}><h2>{_e(title)}</h2>{body}</section>'


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = (), ident: str = "") -> str:
    """rows hold HTML already escaped; columns in `numeric` are right-aligned."""
    def cls(i: int) -> str:
        return ' class="n"' if i in numeric else ""

    head = "".join(f"<th{cls(i)}>{_e(h)}</th>" for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(row)) + "</tr>" for row in rows)
    ident = f' id="{_e(ident)}"' if ident else ""
    return f'<div class="scroll"><table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _cards(report: Report) -> str:
    b, o, q = report.baseline, report.optimized, report.quality
    cards = []
    if b.size_bytes and o.size_bytes:
        ratio = b.size_bytes / o.size_bytes
        big = f"{ratio:.2f}× smaller" if ratio >= 1 else f"{1 / ratio:.2f}× larger"
        cards.append(("size on disk", big, f"{_num(b.size_bytes / 1e6)} → {_num(o.size_bytes / 1e6)} MB",
                      "good" if ratio > 1.01 else ("bad" if ratio < 0.99 else "")))
    if q is not None:
        ci = _interval(q, "perplexity_increase_pct")
        small = f"{_level(q)} CI {ci[0]:+.2f}% to {ci[1]:+.2f}%" if ci else f"{_num(b.perplexity)} → {_num(o.perplexity)}"
        cards.append(("perplexity change", f"{q.perplexity_increase_pct:+.2f}%", small,
                      "bad" if q.perplexity_increase_pct > 1 else ("good" if q.perplexity_increase_pct <= 0 else "")))
        cards.append(("top-1 agreement", f"{q.top1_agreement:.1%}", f"KL {_num(q.kl_divergence)} nats/token", ""))
    elif b.perplexity is not None and o.perplexity is not None:
        cards.append(("perplexity", f"{_num(o.perplexity)}", f"baseline {_num(b.perplexity)}", ""))
    if b.decode_tokens_per_s and o.decode_tokens_per_s:
        ratio = o.decode_tokens_per_s / b.decode_tokens_per_s
        cards.append(("decode speed", f"{ratio:.2f}× faster" if ratio >= 1 else f"{1 / ratio:.2f}× slower",
                      f"{_num(b.decode_tokens_per_s)} → {_num(o.decode_tokens_per_s)} tokens/s",
                      "good" if ratio > 1.02 else ("bad" if ratio < 0.98 else "")))
    if report.checks:
        passed = sum(c.passed for c in report.checks)
        cards.append(("checks", f"{passed} of {len(report.checks)} passed",
                      ", ".join(c.name for c in report.checks if not c.passed) or "all passed",
                      "good" if passed == len(report.checks) else "bad"))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="label">{_e(label)}</div><div class="big {cls}">{_e(big)}</div>'
        f'<div class="small">{_e(small)}</div></div>' for label, big, small, cls in cards) + "</div>"


def _headline(report: Report) -> str:
    b, o, q = report.baseline, report.optimized, report.quality
    memory = [("peak memory, load (MB)", getattr(b, "peak_load_mb", None), getattr(o, "peak_load_mb", None)),
              ("peak memory, decode (MB)", getattr(b, "peak_decode_mb", None), getattr(o, "peak_decode_mb", None))]
    charts = [
        _bar_pair("size on disk (MB)", b.size_bytes / 1e6, o.size_bytes / 1e6, higher_better=False),
        _bar_pair("perplexity", b.perplexity, o.perplexity, higher_better=False,
                  opt_interval=_interval(q, "perplexity")),
        _bar_pair("decode (tokens/s)", b.decode_tokens_per_s, o.decode_tokens_per_s, higher_better=True,
                  noise=_spread(b.decode_tokens_per_s_spread, o.decode_tokens_per_s_spread)),
        _bar_pair("prefill latency (ms)", b.prefill_ms, o.prefill_ms, higher_better=False,
                  noise=_spread(b.prefill_ms_spread, o.prefill_ms_spread)),
    ] + [_bar_pair(name, vb, vo, higher_better=False, noise=MEMORY_NOISE_MB)
         for name, vb, vo in memory if vb is not None or vo is not None]
    rows = []
    for name, a, bb in headline_rows(report):
        if a is None and bb is None:
            continue
        indent = len(name) - len(name.lstrip())  # "  of which ...": a sub-row of the one above
        label = f'<span class="subrow">{_e(name.strip())}</span>' if indent else _e(name)
        rows.append([label, _e(_num(a)), _e(_num(bb)), _change_html(a, bb, _higher_is_better(name), _noise(name))])
    caption = ""
    if _interval(q, "perplexity"):
        caption = (f'<p class="caption">Whisker: {_level(q)} confidence interval of the optimized model\'s '
                   "perplexity (paired bootstrap over evaluation windows).</p>")
    return _section("Baseline vs optimized",
                    f'<div class="charts">{"".join(c for c in charts if c)}</div>{caption}'
                    + _table(["metric", "baseline", "optimized", "change"], rows, numeric=(1, 2, 3), ident="headline"),
                    "summary")


def _quality(report: Report) -> str:
    q = report.quality
    if q is None:
        return ""
    rows = []
    for label, metric, value, fmt in [
        ("perplexity (optimized)", "perplexity", report.optimized.perplexity, lambda v: _num(v)),
        ("perplexity change", "perplexity_increase_pct", q.perplexity_increase_pct, lambda v: f"{v:+.2f}%"),
        ("KL divergence (baseline ‖ optimized), nats/token", "kl_divergence", q.kl_divergence,
         lambda v: f"{v:.4g}"),
        ("top-1 next-token agreement", "top1_agreement", q.top1_agreement, lambda v: f"{v:.2%}"),
    ]:
        if value is None:
            continue
        ci = _interval(q, metric)
        rows.append([_e(label), _e(fmt(value)), _e(f"{fmt(ci[0])} to {fmt(ci[1])}") if ci else "–"])
    body = _table(["metric", "value", f"{_level(q)} interval"], rows, numeric=(1, 2), ident="quality-table")
    body += (f'<p class="caption">Data: {_e(q.data)}; {_num(q.tokens)} tokens in {_num(q.windows)} windows of '
             f'{_num(q.window)}. Baseline perplexity {_e(_num(report.baseline.perplexity))}.')
    if q.intervals:
        body += (f" Intervals: paired percentile bootstrap over the {_num(q.windows)} windows; few windows give wide "
                 "intervals.")
    body += "</p>"
    if report.speed_setup:
        s = report.speed_setup
        body += (f'<p class="caption">Speed: batch 1, KV cache, prompt {s.prompt_tokens} tokens, {s.new_tokens} new '
                 f"tokens, median of {s.runs} runs, {s.threads} threads.</p>")
    v = report.validation
    if v is not None:
        status = '<span class="badge pass">passed</span>' if v.passed else '<span class="badge fail">FAILED</span>'
        decode = (f", {v.decode_top1_agreement:.1%} over {v.decode_tokens} tokens decoded with the KV cache"
                  if v.decode_top1_agreement is not None else "")
        body += (f'<p class="caption">Artifact validation: {v.prompts} prompts and one sequence of {v.long_tokens} '
                 f"tokens, artifact vs in-memory optimized model: max |Δlogit| {_e(_num(v.max_abs_logit_diff))}, "
                 f"top-1 agreement {v.top1_agreement:.1%}{decode} {status}</p>")
    return _section("Quality against the baseline", body, "quality")


def _layer_errors(report: Report) -> str:
    errors = getattr(report, "layer_errors", None)
    points = [(float(i), float(e)) for i, e in enumerate(errors or []) if e is not None and math.isfinite(e)]
    if not points:
        return ""
    worst = max(points, key=lambda p: p[1])
    chart = _line_chart([("relative MSE", OPT_COLOR, points)], x_label="decoder layer", y_label="relative MSE",
                        integer_x=True)
    return _section("Per-layer error", f'<p class="caption">Relative mean squared error of each decoder layer\'s '
                    f"output against the baseline's, on the same input. Largest: layer {int(worst[0])} "
                    f"({_e(_num(worst[1]))}).</p>{chart}", "layer-errors")


def _loss_curves(report: Report) -> str:
    curves = []
    for p in report.passes:
        if not isinstance(p.info.get("loss_curve"), list):
            continue
        train, held = [], []
        for row in p.info["loss_curve"]:
            if not isinstance(row, (list, tuple)) or len(row) < 2 or not isinstance(row[0], (int, float)):
                continue
            if isinstance(row[1], (int, float)) and math.isfinite(row[1]):
                train.append((float(row[0]), float(row[1])))
            if len(row) > 2 and isinstance(row[2], (int, float)) and math.isfinite(row[2]):
                held.append((float(row[0]), float(row[2])))
        if train or held:
            curves.append((p, train, held))
    blocks = []
    for n, (p, train, held) in enumerate(curves, 1):
        series = [s for s in (("train", OPT_COLOR, train), ("held-out", "#f28e2b", held)) if s[2]]
        best = p.info.get("best_step")
        marks = [(float(best), "best")] if isinstance(best, (int, float)) and held else []
        facts = [f"{k.replace('_', ' ')} {_num(p.info[k])}" for k in ("steps_done", "best_eval_loss", "tokens_seen")
                 if p.info.get(k) is not None]
        if p.info.get("stopped_early"):
            facts.append("stopped early")
        title = f"{p.type} pass" + (f" {n}" if len(curves) > 1 else "")
        blocks.append(f'<h3>{_e(title)}</h3><p class="caption">{_e(" · ".join(facts))}</p>'
                      + _line_chart(series, x_label="step", y_label="loss", log_y=False, marks=marks,
                                                  integer_x=True))
    return _section("Distillation loss", "".join(blocks), "loss-curve") if blocks else ""


def _precision_color(precision: str) -> str:
    found = re.search(r"\d+", str(precision))
    if not found:
        return "#cbd5e1"
    bits = int(found.group())
    for limit, color in ((2, "#991b1b"), (3, "#dc2626"), (4, "#f97316"), (6, "#facc15"), (8, "#84cc16"),
                         (16, "#38bdf8"), (32, "#1d4ed8")):
        if bits <= limit:
            return color
    return "#1e3a8a"


def _precision_key(precision: str) -> tuple[int, str]:
    found = re.search(r"\d+", str(precision))
    return (int(found.group()) if found else 999, str(precision))


def _precision_maps(report: Report) -> str:
    """The bits each Linear got, where a pass chose them per layer (quantize with target_bits_per_weight)."""
    maps = [(p.type, {name: f"int{bits}" for name, bits in p.info["bits_per_layer"].items()})
            for p in report.passes if isinstance(p.info.get("bits_per_layer"), dict)]
    blocks = []
    for source, pmap in maps:
        if not pmap:
            continue
        pmap = {str(k): str(v) for k, v in pmap.items()}
        counts: dict[str, int] = {}
        for v in pmap.values():
            counts[v] = counts.get(v, 0) + 1
        layered: dict[str, dict[int, str]] = {}
        others: list[tuple[str, str]] = []
        for name, precision in pmap.items():
            m = re.match(r"^(?:.*?\.)?(\d+)\.(.+)$", name)
            if m:
                layered.setdefault(m.group(2), {})[int(m.group(1))] = precision
            else:
                others.append((name, precision))
        parts = []
        if layered:
            layers = sorted({i for row in layered.values() for i in row})
            cell = max(6, min(40, 760 // max(len(layers), 1)))
            label_w = min(220, 12 + 7 * max(len(k) for k in layered))
            width, height = label_w + cell * len(layers) + 10, 22 + 18 * len(layered) + 4
            svg = []
            for j, layer in enumerate(layers):
                if len(layers) <= 32 or j % max(1, len(layers) // 16) == 0 or j == len(layers) - 1:
                    svg.append(_text(label_w + cell * (j + 0.5), 14, str(layer), size=9, anchor="middle", fill=MUTED))
            for r, (suffix, row) in enumerate(sorted(layered.items())):
                yy = 22 + 18 * r
                svg.append(_text(label_w - 6, yy + 12, suffix, size=11, anchor="end"))
                for j, layer in enumerate(layers):
                    if layer in row:
                        svg.append(f'<rect x="{label_w + cell * j + 0.5:.1f}" y="{yy}" width="{cell - 1}" '
                                   f'height="16" fill="{_precision_color(row[layer])}"><title>layer {layer} '
                                   f'{_e(suffix)}: {_e(row[layer])}</title></rect>')
            parts.append('<p class="caption">Columns are decoder layers, rows the modules inside a layer.</p>'
                         + _svg(width, height, "".join(svg), "precision map"))
        if others:
            parts.append('<div class="chips">' + "".join(
                f'<span class="chip"><span class="swatch" style="background:{_precision_color(v)}"></span>'
                f"<b>{_e(k)}</b> {_e(v)}</span>" for k, v in others[:200]) + "</div>")
        legend = '<div class="chips legend">' + "".join(
            f'<span class="chip"><span class="swatch" style="background:{_precision_color(p)}"></span>{_e(p)}: '
            f"{counts[p]} {'tensor' if counts[p] == 1 else 'tensors'}</span>"
            for p in sorted(counts, key=_precision_key)) + "</div>"
        listing = _table(["layer", "precision"], [[_e(k), _e(v)] for k, v in list(pmap.items())[:5000]])
        title = f"from the {source} pass"
        blocks.append(f"<h3>{_e(title.capitalize())}</h3>{legend}{''.join(parts)}"
                      f"<details><summary>every layer ({len(pmap)})</summary>{listing}</details>")
    return _section("Precision map", "".join(blocks), "precision-map") if blocks else ""


def _checks(report: Report) -> str:
    if not report.checks:
        return ""
    rows = []
    for c in report.checks:
        interval = "–" if not c.interval else f"[{_num(c.interval[0])}, {_num(c.interval[1])}]"
        badge = '<span class="badge pass">pass</span>' if c.passed else '<span class="badge fail">FAIL</span>'
        rows.append([_e(c.name), _e(_num(c.threshold)), _e(_num(c.value)), _e(interval), badge])
    return _section("Checks", _table(["check", "threshold", "value", "interval", "result"], rows, numeric=(1, 2, 3),
                                     ident="checks-table")
                    + '<p class="caption">A quality check (perplexity, KL, top-1) fails only when its whole confidence '
                      "interval is beyond the threshold; size and speed checks compare the measured value.</p>",
                    "checks")


def _compact(value: Any, depth: int = 0) -> str:
    """A pass-info value in one short line: long lists and strings truncated, nested dicts inline."""
    if isinstance(value, (float, int)):
        return _num(value)
    if isinstance(value, dict):
        if depth >= 2 or len(value) > 8:
            return f"{{{len(value)} entries}}"
        return "{" + ", ".join(f"{k}: {_compact(v, depth + 1)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        if len(value) > 6 or depth >= 2:
            head = ", ".join(_compact(v, depth + 1) for v in value[:3])
            text = f"[{head}, … ({len(value)} items)]" if len(value) > 3 else f"[{head}]"
        else:
            text = "[" + ", ".join(_compact(v, depth + 1) for v in value) + "]"
    else:
        text = str(value)
    return text if len(text) <= MAX_VALUE else text[:MAX_VALUE - 1] + "…"


def _passes(report: Report) -> str:
    if not report.passes:
        return ""
    rows = []
    for p in report.passes:
        chips = []
        for key, value in p.info.items():
            if key == "loss_curve" and isinstance(value, list):
                shown = f"{len(value)} point{'s' if len(value) != 1 else ''} (chart above)"
            elif key == "precision_map" and isinstance(value, dict):
                shown = f"{len(value)} layers (map above)"
            else:
                shown = _compact(value)
            chips.append(f'<span class="chip"><b>{_e(key.replace("_", " "))}</b> {_e(shown)}</span>')
        rows.append([f"<b>{_e(p.type)}</b>", _e(f"{p.seconds:.1f}"), f'<div class="chips">{"".join(chips)}</div>'])
    return _section("Passes", _table(["pass", "seconds", "details"], rows, numeric=(1,)), "passes")


def _marked(text: str, same: int) -> str:
    """A generation, its part after the first `same` characters (where the two models diverge) highlighted."""
    head, tail = text[:min(same, MAX_TEXT)], text[same:MAX_TEXT] if same < MAX_TEXT else ""
    cut = "…" if len(text) > MAX_TEXT else ""
    return _e(head) + (f"<mark>{_e(tail)}</mark>" if tail else "") + cut


def _samples(report: Report) -> str:
    samples = [s for s in (getattr(report, "samples", None) or []) if isinstance(s, dict)]
    if not samples:
        return ""
    blocks = []
    for s in samples:
        base, opt = str(s.get("baseline") or ""), str(s.get("optimized") or "")
        same = 0
        while same < min(len(base), len(opt)) and base[same] == opt[same]:
            same += 1
        badge = ('<span class="badge pass">identical</span>' if base == opt
                 else f'<span class="badge warn">diverges after {same} character{"" if same == 1 else "s"}</span>')

        blocks.append(f'<div class="sample"><div class="prompt"><span class="label">prompt</span> {badge}'
                      f'<pre>{_e(str(s.get("prompt", ""))[:MAX_TEXT])}</pre></div><div class="cols">'
                      f'<div><span class="label">baseline</span><pre>{_marked(base, same)}</pre></div>'
                      f'<div><span class="label">optimized</span><pre>{_marked(opt, same)}</pre></div></div></div>')
    return _section("Generation samples", '<p class="caption">Greedy decoding from each model; the part after the '
                    "first difference is highlighted. Control characters are shown as \\xNN.</p>"
                    + "".join(blocks), "samples")


def _tasks(report: Report) -> str:
    tasks = getattr(report, "tasks", None) or {}
    if not tasks:
        return ""
    rows = [[_e(task), _e(t.get("metric") or "–"), _num(t.get("baseline")), _num(t.get("optimized")),
             _change_html(t.get("baseline"), t.get("optimized"), True)] for task, t in tasks.items()]
    return _section("Tasks (lm-eval-harness)", _table(["task", "metric", "baseline", "optimized", "change"], rows,
                                                      numeric=(2, 3, 4)), "tasks")


def _notes(report: Report) -> str:
    if not report.notes:
        return ""
    return _section("Notes", '<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in report.notes) + "</ul>",
                    "notes")


def _environment(report: Report) -> str:
    export = report.export or {}
    facts = [(k, v) for k, v in export.items() if k not in ("files", "notes")]
    body = '<h3>Artifact</h3><div class="chips">' + "".join(
        f'<span class="chip"><b>{_e(k.replace("_", " "))}</b> {_e(_compact(v))}</span>' for k, v in facts) + "</div>"
    files = export.get("files")
    if isinstance(files, list) and files:
        body += (f"<details><summary>files ({len(files)})</summary><pre>"
                 + _e("\n".join(str(f) for f in files[:500])) + ("\n…" if len(files) > 500 else "") + "</pre></details>")
    if report.environment:
        body += '<h3>Environment</h3><div class="chips">' + "".join(
            f'<span class="chip"><b>{_e(k)}</b> {_e(v)}</span>' for k, v in report.environment.items()) + "</div>"
    if report.recipe:
        text = json.dumps(report.recipe, indent=2, default=str, ensure_ascii=False)
        text = text if len(text) <= 20_000 else text[:20_000] + "\n…"
        body += f"<details><summary>recipe</summary><pre>{_e(text)}</pre></details>"
    body += (f'<p class="caption">Total time {report.total_seconds:.0f} s. Created {_e(report.created)} by llmopt '
             f"{_e(report.llmopt_version)}; report schema {report.schema_version}.</p>")
    return _section("Artifact and environment", body, "environment")


CSS = """
:root{--fg:#0f172a;--muted:#64748b;--line:#e2e8f0;--bg:#f4f6fa;--card:#fff;--good:#15803d;--bad:#b91c1c}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
 font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue","Liberation Sans","DejaVu Sans",Arial,sans-serif}
main{max-width:1140px;margin:0 auto;padding:28px 24px 40px}
header h1{font-size:25px;margin:0 0 4px;word-break:break-word}
h2{font-size:18px;margin:0 0 12px}
h3{font-size:15px;margin:14px 0 6px}
.sub{color:var(--muted);margin:0}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:18px 20px;margin:16px 0;
 box-shadow:0 1px 2px rgba(15,23,42,.05)}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(190px,1fr));gap:12px;margin:18px 0}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 16px;
 box-shadow:0 1px 2px rgba(15,23,42,.05)}
.label{font-size:11px;text-transform:uppercase;letter-spacing:.05em;color:var(--muted);font-weight:600}
.card .big{font-size:21px;white-space:nowrap;font-weight:650;font-variant-numeric:tabular-nums;margin:2px 0}
.card .small{font-size:13px;color:var(--muted);overflow-wrap:anywhere}
.subrow{padding-left:18px;color:#475569}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums;font-size:14px}
th,td{padding:6px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{font-size:11px;text-transform:uppercase;letter-spacing:.05em;color:var(--muted);font-weight:600}
td.n,th.n{text-align:right}td.n{white-space:nowrap}
.run{white-space:nowrap}
.ci{color:var(--muted);font-size:12px;font-weight:normal}
tbody tr:nth-child(even){background:#f8fafc}
tbody tr:hover{background:#eef2ff}
.small{font-size:12px}
.good{color:var(--good)}.bad{color:var(--bad)}.muted{color:var(--muted)}
.badge{display:inline-block;white-space:nowrap;padding:0 8px;border-radius:999px;font-size:12px;font-weight:600;line-height:20px}
.badge.pass{background:#dcfce7;color:#166534}.badge.fail{background:#fee2e2;color:#991b1b}
.badge.warn{background:#fef3c7;color:#92400e}.badge.front{background:#dbeafe;color:#1e40af}
.charts{display:flex;flex-wrap:wrap;gap:8px 18px;margin-bottom:8px}
svg{max-width:100%;height:auto;font-family:inherit;overflow:visible}
.caption{color:var(--muted);font-size:13px;margin:6px 0}
.chips{display:flex;flex-wrap:wrap;gap:5px}
.chip{background:#f1f5f9;border-radius:6px;padding:1px 8px;font-size:13px;white-space:nowrap;max-width:100%;
 overflow:hidden;text-overflow:ellipsis}
.chip b{font-weight:600;color:#475569}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px;vertical-align:-1px}
.legend{margin:6px 0 10px}
pre{white-space:pre-wrap;word-break:break-word;margin:2px 0 0;font:13px/1.45 ui-monospace,"DejaVu Sans Mono",Menlo,
 Consolas,monospace}
.sample{border:1px solid var(--line);border-radius:8px;margin:10px 0;overflow:hidden}
.sample .prompt{background:#f1f5f9;padding:8px 12px}
.sample .cols{display:grid;grid-template-columns:1fr 1fr}
.sample .cols>div{padding:8px 12px;min-width:0}
.sample .cols>div+div{border-left:1px solid var(--line)}
mark{background:#fde68a;color:inherit;border-radius:2px}
ul.notes{margin:0;padding-left:20px}ul.notes li{margin:4px 0}
details{margin-top:10px}details summary{cursor:pointer;color:#334155;font-size:14px}
.warning{background:#fffbeb;border:1px solid #fde68a;border-radius:8px;padding:8px 12px;color:#92400e;font-size:14px}
footer{color:var(--muted);font-size:12px;margin-top:20px;text-align:center}
"""


def _page(title: str, subtitle: str, body: str, version: str = "") -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta name="generator" content="llmopt {_e(version)}"><title>{_e(title)}</title>'
            f"<style>{CSS}</style></head><body><main><header><h1>{_e(title)}</h1>"
            f'<p class="sub">{subtitle}</p></header>{body}<footer>Written by llmopt {_e(version)}. One self-contained '
            "file: no scripts and nothing loaded from the network.</footer></main></body></html>\n")


def render_html(report: Report) -> str:
    """The report of one run as a self-contained HTML document (write it with encoding='utf-8')."""
    spec = report.model.get("spec", "model")
    export = report.export or {}
    subtitle = (f"Format <b>{_e(export.get('format', '?'))}</b> on {_e(report.optimized.runtime)}; baseline = the "
                f"input model in float32 on the same runtime. Created {_e(report.created)} by llmopt "
                f"{_e(report.llmopt_version)}.")
    body = "".join([_cards(report), _headline(report), _quality(report), _tasks(report), _checks(report),
                    _layer_errors(report),
                    _loss_curves(report), _precision_maps(report), _samples(report), _notes(report), _passes(report),
                    _environment(report)])
    return _page(f"llmopt report — {spec}", subtitle, body, report.llmopt_version)


# ---------------------------------------------------------------- comparing N runs


def _hbars(title: str, items: Sequence[tuple[str, float | None, str]], *, higher_better: bool) -> str:
    """One horizontal bar per run, from zero, the best one's value in bold."""
    known = [v for _, v, _ in items if v is not None]
    if not known:
        return ""
    label_w = min(170, 14 + 7 * max(len(name) for name, _, _ in items))
    width, row, top = 500, 22, 28
    height = top + row * len(items) + 6
    _, hi, _ = _ticks(0.0, max(known) if max(known) > 0 else 1.0, 4)
    best = (max(known) if higher_better else min(known)) if len(set(known)) > 1 else None
    plot_w = width - label_w - 70
    parts = [_text(0, 16, title + (" — higher is better" if higher_better else " — lower is better"), size=13,
                   weight="600")]
    for i, (name, value, color) in enumerate(items):
        yy = top + row * i
        short = name if len(name) <= 24 else name[:23] + "…"
        parts.append(_text(label_w - 8, yy + 14, short, size=11, anchor="end"))
        if value is None:
            parts.append(_text(label_w, yy + 14, "n/a", size=11, fill=MUTED))
            continue
        w = max(1.0, plot_w * max(value, 0.0) / hi)
        parts.append(f'<rect x="{label_w}" y="{yy + 3}" width="{w:.1f}" height="{row - 7}" rx="2" fill="{color}">'
                     f"<title>{_e(name)}: {_e(_num(value))}</title></rect>")
        parts.append(_text(label_w + w + 5, yy + 14, _num(value), size=11,
                           weight="700" if value == best else "normal"))
    return _svg(width, height, "".join(parts), title)


def _scatter(points: Sequence[dict[str, Any]], *, x_label: str, y_label: str, zero_line: str = "") -> str:
    """Quality (y, with CI whiskers) vs size (x); radius grows with decode speed; Pareto points outlined."""
    shown = [p for p in points if p["x"] is not None and p["y"] is not None]
    if not shown:
        return ""
    width, height, left, right, top, bottom = 1000, 420, 70, 30, 20, 50
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [p["x"] for p in shown]
    ys = [v for p in shown for v in (p["y"], *(p.get("ci") or ()))] + ([0.0] if zero_line else [])
    xlo, xhi, xticks = _ticks(0.0, max(xs) * 1.05 if max(xs) > 0 else 1.0, 6)
    span = (max(ys) - min(ys)) or abs(max(ys)) * 0.1 or 1.0
    ylo, yhi, yticks = _ticks(min(ys) - 0.08 * span, max(ys) + 0.08 * span, 5)

    def px(x: float) -> float:
        return left + plot_w * (x - xlo) / (xhi - xlo)

    def py(y: float) -> float:
        return top + plot_h * (1 - (y - ylo) / (yhi - ylo))

    parts = []
    for t in yticks:
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="{GRID}"/>')
        parts.append(_text(left - 6, py(t) + 4, _tick_label(t), size=10, anchor="end", fill=MUTED))
    for t in xticks:
        parts.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top}" y2="{top + plot_h}" stroke="{GRID}"/>')
        parts.append(_text(px(t), top + plot_h + 16, _tick_label(t), size=10, anchor="middle", fill=MUTED))
    parts.append(_text(left + plot_w / 2, height - 8, x_label, size=12, anchor="middle", fill=MUTED))
    parts.append(_text(16, top + plot_h / 2, y_label, size=12, anchor="middle", fill=MUTED,
                       extra=f' transform="rotate(-90 16 {top + plot_h / 2:.1f})"'))
    parts.append(_text(width - right, top + 12, "↙ better: smaller and lower", size=11,
                       anchor="end", fill=MUTED))
    if zero_line and ylo <= 0 <= yhi:
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{py(0):.1f}" y2="{py(0):.1f}" stroke="{MUTED}" '
                     f'stroke-dasharray="5 4"/>')
        parts.append(_text(left + 4, py(0) - 5, zero_line, size=10, fill=MUTED))
    speeds = [p["speed"] for p in shown if p.get("speed")]
    top_speed = max(speeds) if speeds else None
    placed: list[tuple[float, float, float, float]] = []
    for p in sorted(shown, key=lambda p: p.get("front", False)):  # front points drawn last, on top
        x, y = px(p["x"]), py(p["y"])
        r = 5 + 7 * math.sqrt(p["speed"] / top_speed) if p.get("speed") and top_speed else 5
        if p.get("ci"):
            lo, hi = py(p["ci"][0]), py(p["ci"][1])
            parts.append(f'<g stroke="{p["color"]}" stroke-width="1.5" opacity="0.8"><line x1="{x:.1f}" x2="{x:.1f}" '
                         f'y1="{lo:.1f}" y2="{hi:.1f}"/><line x1="{x - 5:.1f}" x2="{x + 5:.1f}" y1="{lo:.1f}" '
                         f'y2="{lo:.1f}"/><line x1="{x - 5:.1f}" x2="{x + 5:.1f}" y1="{hi:.1f}" y2="{hi:.1f}"/></g>')
        if p.get("reference"):
            style = f'fill="#fff" stroke="{MUTED}" stroke-width="2"'
        elif p.get("front"):
            style = f'fill="{p["color"]}" stroke="{INK}" stroke-width="2"'
        else:
            style = f'fill="{p["color"]}" fill-opacity="0.55" stroke="{p["color"]}" stroke-width="1"'
        tip = f'{p["label"]}: {x_label} {_num(p["x"])}, {y_label} {_num(p["y"])}'
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" {style}><title>{_e(tip)}</title></circle>')
        label = ("★ " if p.get("front") else "") + p["label"]
        label = label if len(label) <= 28 else label[:27] + "…"
        w = 6.6 * len(label) + 4
        right_side = x + r + 4 + w <= width - right + 20
        lx = x + r + 4 if right_side else x - r - 4 - w
        ly = y + 4
        if p.get("reference"):  # the baseline sits on the dashed zero line: label it above
            lx, ly = x - w / 2, y - r - 6
        for _ in range(12):  # step down past labels already placed
            if not any(lx < bx + bw and bx < lx + w and abs(ly - by) < 13 for bx, by, bw, _ in placed):
                break
            ly += 13
        placed.append((lx, ly, w, 13))
        parts.append(_text(lx, ly, label, size=11, weight="600" if p.get("front") else "normal",
                           fill=INK if not p.get("reference") else MUTED))
    return _svg(width, height, "".join(parts), f"{y_label} vs {x_label}")


def render_compare_html(named_reports: Sequence[tuple[str, Report]]) -> str:
    """N runs side by side: metrics table, quality vs size scatter with the Pareto front, a bar chart per metric."""
    runs = list(named_reports)
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(runs))]
    # As in `llmopt compare`'s text output: a run without all three figures is left out of the front (None).
    keys = [(r.optimized.perplexity, r.optimized.size_bytes / 1e6, r.optimized.decode_tokens_per_s) for _, r in runs]
    rated = [i for i, k in enumerate(keys) if None not in k]
    front: list[bool | None] = [None] * len(runs)
    for i, on_front in zip(rated, pareto_front([keys[i] for i in rated])):
        front[i] = on_front

    warnings = []
    if len({str(r.model.get("spec")) for _, r in runs}) > 1:
        warnings.append("The runs start from different models: their perplexities are not comparable.")
    evals = {(r.quality.data, r.quality.tokens, r.quality.window) if r.quality else None for _, r in runs}
    if len(evals) > 1:
        warnings.append("The runs were evaluated on different data or windows: compare their quality with care.")
    speed = {(s.prompt_tokens, s.new_tokens, s.threads) if (s := r.speed_setup) else None for _, r in runs}
    if len(speed) > 1:
        warnings.append("The runs measured speed with different settings (prompt, new tokens or threads).")

    columns: list[tuple[str, Any, bool, Any]] = [  # header, getter, higher is better, formatter
        ("size (MB)", lambda r: r.optimized.size_bytes / 1e6, False, _num),
        ("perplexity", lambda r: r.optimized.perplexity, False, _num),
        ("perplexity change", lambda r: r.quality.perplexity_increase_pct if r.quality else None, False,
         lambda v: f"{v:+.2f}%"),
        ("KL (nats/token)", lambda r: r.quality.kl_divergence if r.quality else None, False, lambda v: f"{v:.4g}"),
        ("top-1 agreement", lambda r: r.quality.top1_agreement if r.quality else None, True, lambda v: f"{v:.2%}"),
        ("decode (tokens/s)", lambda r: r.optimized.decode_tokens_per_s, True, _num),
        ("prefill (ms)", lambda r: r.optimized.prefill_ms, False, _num),
    ]
    ci_of = {"perplexity": "perplexity", "perplexity change": "perplexity_increase_pct",
             "KL (nats/token)": "kl_divergence", "top-1 agreement": "top1_agreement"}
    values = {h: [get(r) for _, r in runs] for h, get, _, _ in columns}
    rows = []
    for i, (name, r) in enumerate(runs):
        cells = [(f'<span class="run"><span class="swatch" style="background:{colors[i]}"></span><b>{_e(name)}</b>'
                  "</span>"), f'<span title="{_e(r.optimized.runtime)}">{_e((r.export or {}).get("format", "?"))}</span>']
        for header, _, higher, fmt in columns:
            v = values[header][i]
            if v is None:
                cells.append("–")
                continue
            known = [x for x in values[header] if x is not None]
            best = len(set(known)) > 1 and v == (max(known) if higher else min(known))
            text = _e(fmt(v))
            ci = _interval(r.quality, ci_of[header]) if header in ci_of else None
            if ci:
                text += f'<br><span class="ci">{_e(fmt(ci[0]))} to {_e(fmt(ci[1]))}</span>'
            cells.append(f"<b>{text}</b>" if best else text)
        if front[i] is None:
            cells.append('<span class="muted" title="needs perplexity, size and decode speed">not rated</span>')
        elif front[i]:
            cells.append('<span class="badge front">★ Pareto</span>')
        else:
            by = next(runs[j][0] for j in rated if j != i and dominates(keys[j], keys[i]))  # type: ignore[arg-type]
            cells.append(f'<span class="muted">beaten by {_e(by)}</span>')
        rows.append(cells)
    table = _table(["run", "format", *[h for h, _, _, _ in columns], "front"], rows,
                   numeric=tuple(range(2, 2 + len(columns))), ident="compare-table")

    all_quality = all(r.quality is not None for _, r in runs)
    if all_quality:
        y_label, y_get, y_ci, zero = "perplexity change (%)", lambda r: r.quality.perplexity_increase_pct, \
            "perplexity_increase_pct", "baseline quality"
    else:
        y_label, y_get, y_ci, zero = "perplexity", lambda r: r.optimized.perplexity, "perplexity", ""
    points = [{"label": name, "x": r.optimized.size_bytes / 1e6, "y": y_get(r), "ci": _interval(r.quality, y_ci),
               "speed": r.optimized.decode_tokens_per_s, "color": colors[i], "front": bool(front[i])}
              for i, (name, r) in enumerate(runs)]
    base_sizes = {round(r.baseline.size_bytes / 1e6, 1) for _, r in runs}
    if runs and all_quality and len(base_sizes) == 1 and len({str(r.model.get("spec")) for _, r in runs}) == 1:
        points.append({"label": "baseline (float32)", "x": runs[0][1].baseline.size_bytes / 1e6, "y": 0.0,
                       "speed": runs[0][1].baseline.decode_tokens_per_s, "color": MUTED, "reference": True})
    scatter = _scatter(points, x_label="size on disk (MB)", y_label=y_label, zero_line=zero)
    missing = [p["label"] for p in points if p["y"] is None]
    caption = ("Each point is a run; the bigger the point, the faster it decodes. Outlined points marked ★ are on the "
               "Pareto front: no other run is at least as good on perplexity, size and decode speed and better on one; a "
               "run missing one of the three is not rated. Whiskers: confidence intervals.")
    if missing:
        caption += " Not shown (no quality figures): " + ", ".join(missing) + "."
    bars = [
        _hbars("size on disk (MB)", [(n, r.optimized.size_bytes / 1e6, colors[i]) for i, (n, r) in enumerate(runs)],
               higher_better=False),
        _hbars("perplexity", [(n, r.optimized.perplexity, colors[i]) for i, (n, r) in enumerate(runs)], higher_better=False),
        _hbars("decode (tokens/s)", [(n, r.optimized.decode_tokens_per_s, colors[i]) for i, (n, r) in enumerate(runs)],
               higher_better=True),
        _hbars("prefill latency (ms)", [(n, r.optimized.prefill_ms, colors[i]) for i, (n, r) in enumerate(runs)], higher_better=False),
    ]
    specs = sorted({str(r.model.get("spec")) for _, r in runs})
    body = ("".join(f'<p class="warning">{_e(w)}</p>' for w in warnings)
            + _section("Runs", table + '<p class="caption">Best value of each column in bold. Figures are for the '
                       "optimized model of each run; quality is measured against each run's own baseline.</p>",
                       "runs")
            + _section("Quality vs size", (scatter or '<p class="caption">No run has the figures to plot.</p>')
                       + f'<p class="caption">{_e(caption)}</p>', "scatter")
            + _section("Per metric", f'<div class="charts">{"".join(b for b in bars if b)}</div>', "bars"))
    subtitle = (f"{len(runs)} runs of {_e(', '.join(specs))}" if len(specs) == 1
                else f"{len(runs)} runs of {len(specs)} models")
    versions = sorted({r.llmopt_version for _, r in runs})
    return _page(f"llmopt compare — {len(runs)} runs", subtitle, body, ", ".join(versions))
