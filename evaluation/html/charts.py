"""The pieces of the HTML pages: text made safe, numbers for people, and the inline SVG charts (bars, lines,
a scatter), drawn here because the page must open offline with no script or chart library."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

# Control characters are shown as \xNN (the samples of a small or damaged model are full of them; the Unicode
# "control pictures" are missing from common fonts) and lone surrogates as U+FFFD, which would fail the UTF-8 write.
_CONTROLS: dict[int, Any] = {i: f"\\x{i:02x}" for i in [*range(32), *range(0x7F, 0xA0)] if i not in (9, 10)}
_CONTROLS.update({13: None})
_CONTROLS.update({i: 0xFFFD for i in range(0xD800, 0xE000)})

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
