"""N runs side by side: a metrics table, quality vs size scatter with the Pareto front marked, and one bar chart
per metric."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llmopt.evaluation.compare import dominates, pareto_front
from llmopt.evaluation.html.charts import MUTED, PALETTE, _e, _hbars, _num, _scatter
from llmopt.evaluation.html.report_page import _interval, _page, _section, _table
from llmopt.evaluation.report import Report


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
