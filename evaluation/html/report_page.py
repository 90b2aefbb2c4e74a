"""The report of one run: baseline vs optimized — cards, bar charts, headline table, quality with confidence
intervals, per-layer error, the distillation loss curve, the precision map of a mixed-precision pass, checks,
passes, generation samples, notes and environment."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any

from llmopt.evaluation.html.charts import MUTED, OPT_COLOR, _bar_pair, _e, _line_chart, _num, _pct, _svg, _text
from llmopt.evaluation.report import Report, headline_rows

CSS = resources.files("llmopt.evaluation.html").joinpath("report.css").read_text(encoding="utf-8")

MAX_TEXT = 2000  # characters of a generation sample shown
MAX_VALUE = 90  # characters of one pass-info value shown


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
