"""Report schema, checks semantics and compare on synthetic reports (no model needed)."""

from __future__ import annotations

import json

import pytest

from llmopt.errors import InputError
from llmopt.evaluation.checks import evaluate_checks
from llmopt.evaluation.compare import compare_reports, rows_to_markdown
from llmopt.evaluation.report import ModelMetrics, QualityReport, Report, read_report
from llmopt.recipe import ChecksConfig


def make_report(ppl: float = 11.0, size: int = 100_000_000, decode: float = 30.0) -> Report:
    base = ModelMetrics(runtime="onnxruntime", parameters=1000, size_bytes=500_000_000, perplexity=10.0,
                        decode_tokens_per_s=20.0, prefill_ms=50.0, kv_cache_bytes_per_token=4096)
    opt = base.model_copy(update={"size_bytes": size, "perplexity": ppl, "decode_tokens_per_s": decode})
    quality = QualityReport(data="builtin", tokens=512, windows=2, window=256, kl_divergence=0.05,
                            top1_agreement=0.9, perplexity_increase_pct=(ppl / 10.0 - 1) * 100)
    return Report(llmopt_version="t", created="now", model={"spec": "m"}, recipe={}, export={"format": "onnx"},
                  baseline=base, optimized=opt, quality=quality, passes=[], environment={}, total_seconds=1.0)


def test_checks_pass_and_fail_on_the_right_side_of_the_threshold():
    report = make_report(ppl=10.5, size=100_000_000, decode=30.0)
    checks = ChecksConfig(max_perplexity_increase_pct=6.0, min_top1_agreement=0.95, max_kl=0.1,
                          min_decode_speedup=1.5, max_size_mb=100.0, max_size_ratio=0.19)
    results = {c.name: (round(c.value, 6), c.passed) for c in evaluate_checks(checks, report)}
    assert results == {
        "max_perplexity_increase_pct": (5.0, True),
        "min_top1_agreement": (0.9, False),
        "max_kl": (0.05, True),
        "min_decode_speedup": (1.5, True),  # exactly at the bound passes
        "max_size_mb": (100.0, True),
        "max_size_ratio": (0.2, False),
    }


def test_a_missing_measurement_fails_its_check():
    report = make_report().model_copy(update={"quality": None})
    [result] = evaluate_checks(ChecksConfig(min_top1_agreement=0.5), report)
    assert result.value is None and not result.passed


def test_report_round_trips_and_checks_its_schema_version(tmp_path):
    report = make_report()
    report.write(tmp_path)
    assert read_report(tmp_path) == report
    assert "| perplexity | 10.000 | 11.000 | +10.0% |" in (tmp_path / "report.md").read_text()
    data = json.loads((tmp_path / "report.json").read_text())
    data["schema_version"] = 99
    (tmp_path / "report.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="schema version 99"):
        read_report(tmp_path)


def test_compare_marks_direction_per_metric():
    rows = {r.metric: r for r in compare_reports(make_report(ppl=11.0, decode=30.0), make_report(ppl=12.0, decode=40.0))}
    assert rows["perplexity"].change == pytest.approx(1.0) and rows["perplexity"].better is False
    assert rows["decode (tokens/s)"].change_pct == pytest.approx(100 / 3) and rows["decode (tokens/s)"].better is True
    assert rows["size on disk (MB)"].change == 0 and rows["size on disk (MB)"].better is None
    md = rows_to_markdown(list(rows.values()), "a", "b")
    assert "| perplexity | 11 | 12 | 1 | +9.1% ⚠️ |" in md


def test_quality_checks_fail_only_when_the_whole_interval_is_beyond_the_threshold():
    report = make_report(ppl=10.5)  # +5% measured
    for interval, threshold, passed in [([3.0, 7.0], 6.0, True),  # straddles: noise cannot fail the job
                                        ([6.5, 9.0], 6.0, False),  # all of it above: fails
                                        ([1.0, 5.9], 6.0, True)]:
        quality = report.quality.model_copy(update={"intervals": {"perplexity_increase_pct": interval},
                                                    "confidence_level": 0.95})
        [result] = evaluate_checks(ChecksConfig(max_perplexity_increase_pct=threshold),
                                   report.model_copy(update={"quality": quality}))
        assert (result.passed, result.interval) == (passed, interval)
    quality = report.quality.model_copy(update={"intervals": {"top1_agreement": [0.85, 0.93]}})
    [result] = evaluate_checks(ChecksConfig(min_top1_agreement=0.95), report.model_copy(update={"quality": quality}))
    assert not result.passed  # 0.93 < 0.95: the whole interval is below the minimum


def _with_intervals(report: Report, ppl_ci: list[float], decode_spread: float = 2.0) -> Report:
    quality = report.quality.model_copy(update={"intervals": {"perplexity": ppl_ci}, "confidence_level": 0.95})
    optimized = report.optimized.model_copy(update={"decode_tokens_per_s_spread": decode_spread})
    return report.model_copy(update={"quality": quality, "optimized": optimized})


def test_compare_of_a_report_with_itself_shows_no_significant_change():
    report = _with_intervals(make_report(), [10.5, 11.5])
    rows = compare_reports(report, report)
    assert all(r.change in (0, None) and not r.significant for r in rows)


def test_significance_needs_disjoint_intervals_or_an_exact_metric():
    a = _with_intervals(make_report(ppl=11.0, decode=30.0), [10.5, 11.5])
    close = _with_intervals(make_report(ppl=11.3, decode=31.0, size=90_000_000), [10.8, 11.8])
    far = _with_intervals(make_report(ppl=14.0, decode=45.0), [13.2, 14.8])
    rows = {r.metric: r for r in compare_reports(a, close)}
    assert rows["perplexity"].significant is False and rows["decode (tokens/s)"].significant is False
    assert rows["size on disk (MB)"].significant is True  # sizes are exact: any change is real
    rows = {r.metric: r for r in compare_reports(a, far)}
    assert rows["perplexity"].significant is True and rows["decode (tokens/s)"].significant is True
    assert rows["KL divergence (nats/token)"].significant is None  # no interval recorded for it here


def test_pareto_front_keeps_only_undominated_runs():
    from llmopt.evaluation.compare import pareto_front

    # (perplexity, size, decode tokens/s): c is worse than a on everything; d trades quality for size.
    points = [(10.0, 500.0, 20.0), (12.0, 100.0, 30.0), (11.0, 600.0, 19.0), (15.0, 90.0, 30.0), (12.0, 100.0, 30.0)]
    assert pareto_front(points) == [True, True, False, True, True]  # equal runs do not dominate each other
    assert pareto_front([]) == [] and pareto_front([(1.0, 1.0, 1.0)]) == [True]


def test_compare_many_in_markdown_marks_significance_and_the_front(tmp_path):
    from llmopt.evaluation.compare import compare_many, comparison_to_markdown

    paths = []
    for name, report in [("fp32", _with_intervals(make_report(ppl=10.0, size=500_000_000, decode=20.0), [9.6, 10.4])),
                         ("int8", _with_intervals(make_report(ppl=10.1, size=250_000_000, decode=24.0), [9.7, 10.5])),
                         ("bad", _with_intervals(make_report(ppl=13.0, size=600_000_000, decode=18.0), [12.5, 13.5]))]:
        (tmp_path / name).mkdir()
        report.write(tmp_path / name)
        paths.append(tmp_path / name)
    c = compare_many(paths, ["fp32", "int8", "bad"])
    assert c.pareto == [True, True, False]
    md = comparison_to_markdown(c)
    assert "| metric | fp32 | int8 | bad |" in md and "Pareto front on perplexity, size and decode speed: fp32, int8." in md
    assert "| perplexity | 10 | 10.1 (+1.0%) | 13 (+30.0%*) |" in md


def test_the_markdown_report_shows_the_spreads_and_names_a_change_it_cannot_tell_from_noise():
    from llmopt.evaluation.report import render_markdown

    report = make_report(decode=21.0)
    spread = {"prefill_ms_spread": 3.0, "decode_tokens_per_s_spread": 1.0, "peak_memory_mb": 200.0}
    report = report.model_copy(update={
        "baseline": report.baseline.model_copy(update=spread),
        "optimized": report.optimized.model_copy(update={**spread, "prefill_ms": 40.0, "peak_memory_mb": 200.4})})
    rows = {line.split(" | ")[0].lstrip("| "): line for line in render_markdown(report).splitlines()
            if line.startswith("| ")}
    # decode 20 -> 21 with spreads of 1 each: within; prefill 50 -> 40 with spreads of 3 each: a real change.
    assert rows["decode (tokens/s)"] == "| decode (tokens/s) | 20.000 ±1 | 21.000 ±1 | +5.0% (within the runs' spread) |"
    assert rows["time to first token (prefill, ms)"].endswith("| 50.000 ±3 | 40.000 ±3 | -20.0% |")
    assert rows["peak memory added (MB)"].endswith("| +0.2% (under 1 MB) |")
    assert rows["size on disk (MB)"].endswith("| -80.0% |")  # sizes are exact: always a change
