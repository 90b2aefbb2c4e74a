"""Quality gates from the recipe's `checks:`, evaluated on a finished report."""

from __future__ import annotations

from llmopt.evaluation.report import CheckResult, Report
from llmopt.recipe import ChecksConfig


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a in (None, 0) or b is None else b / a


def evaluate_checks(checks: ChecksConfig, report: Report) -> list[CheckResult]:
    """One result per configured check; a missing measurement fails its check (never passes silently)."""
    q, b, o = report.quality, report.baseline, report.optimized
    measured = {
        # name: (value, passes-when)
        "max_perplexity_increase_pct": (q.perplexity_increase_pct if q else None, "le"),
        "min_top1_agreement": (q.top1_agreement if q else None, "ge"),
        "max_kl": (q.kl_divergence if q else None, "le"),
        "min_decode_speedup": (_ratio(b.decode_tokens_per_s, o.decode_tokens_per_s), "ge"),
        "max_size_mb": (o.size_bytes / 1e6, "le"),
        "max_size_ratio": (_ratio(b.size_bytes, o.size_bytes), "le"),
    }
    results = []
    for name, threshold in checks.model_dump().items():
        if threshold is None:
            continue
        value, sense = measured[name]
        passed = value is not None and (value <= threshold if sense == "le" else value >= threshold)
        results.append(CheckResult(name=name, threshold=threshold, value=value, passed=passed))
    return results
