"""Quality gates from the recipe's `checks:`, evaluated on a finished report."""

from __future__ import annotations

from llmopt.evaluation.report import CheckResult, Report
from llmopt.recipe import ChecksConfig


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a in (None, 0) or b is None else b / a


def evaluate_checks(checks: ChecksConfig, report: Report) -> list[CheckResult]:
    """One result per configured check; a missing measurement fails its check (never passes silently).

    Quality metrics are estimates from a sample of text: such a check fails only when its whole confidence
    interval is beyond the threshold (the measured value is then beyond it with that confidence), so a CI
    gate does not flap on evaluation noise. Without an interval the point value decides.
    """
    q, b, o = report.quality, report.baseline, report.optimized
    intervals = q.intervals if q else {}
    measured = {
        # name: (value, passes-when, the metric's interval key)
        "max_perplexity_increase_pct": (q.perplexity_increase_pct if q else None, "le", "perplexity_increase_pct"),
        "min_top1_agreement": (q.top1_agreement if q else None, "ge", "top1_agreement"),
        "max_kl": (q.kl_divergence if q else None, "le", "kl_divergence"),
        "min_decode_speedup": (_ratio(b.decode_tokens_per_s, o.decode_tokens_per_s), "ge", None),
        "max_size_mb": (o.size_bytes / 1e6, "le", None),
        "max_size_ratio": (_ratio(b.size_bytes, o.size_bytes), "le", None),
    }
    results = []
    for name, threshold in checks.model_dump().items():
        if threshold is None:
            continue
        value, sense, key = measured[name]
        interval = intervals.get(key) if key else None
        if value is None:
            passed = False
        elif interval:  # fail only when the whole interval is on the wrong side
            passed = interval[0] <= threshold if sense == "le" else interval[1] >= threshold
        else:
            passed = value <= threshold if sense == "le" else value >= threshold
        results.append(CheckResult(name=name, threshold=threshold, value=value, passed=passed,
                                   interval=list(interval) if interval else None))
    return results
