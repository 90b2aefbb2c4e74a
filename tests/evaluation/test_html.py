"""The HTML report and compare page on synthetic reports: content, escaping, the Pareto front, and a render in
headless Chromium (screenshot and DOM)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from llmopt.evaluation.html import render_compare_html, render_html
from llmopt.evaluation.report import CheckResult, ModelMetrics, PassRecord, QualityReport, Report

CHROMIUM = Path("/usr/bin/chromium")


def make_report(ppl: float = 11.0, size: int = 100_000_000, decode: float = 30.0, *, full: bool = True) -> Report:
    """Like tests/evaluation/test_report.py's, plus (when `full`) intervals, checks, a distill pass with a loss curve, a
    precision map, per-layer errors, samples and a note that tries to inject markup."""
    base = ModelMetrics(runtime="onnxruntime", parameters=1000, size_bytes=500_000_000, perplexity=10.0,
                        decode_tokens_per_s=20.0, prefill_ms=50.0, kv_cache_bytes_per_token=4096)
    opt = base.model_copy(update={"size_bytes": size, "perplexity": ppl, "decode_tokens_per_s": decode,
                                  "prefill_ms": 41.5})
    increase = (ppl / 10.0 - 1) * 100
    quality = QualityReport(data="builtin", tokens=512, windows=2, window=256, kl_divergence=0.05,
                            top1_agreement=0.9, perplexity_increase_pct=increase, confidence_level=0.95,
                            intervals={"perplexity": [ppl * 0.97, ppl * 1.04],
                                       "perplexity_increase_pct": [increase - 2.5, increase + 3.0],
                                       "kl_divergence": [0.04, 0.061], "top1_agreement": [0.87, 0.93]})
    report = Report(llmopt_version="t", created="now", model={"spec": "m"}, recipe={"passes": [{"type": "distill"}]},
                    export={"format": "onnx"}, baseline=base, optimized=opt, quality=quality, passes=[],
                    environment={"python": "3.11", "torch": "2.13"}, total_seconds=1.0, kv_cache_context_tokens=2048)
    if not full:
        return report
    curve = [[s, 3.0 - 0.02 * s, (2.9 - 0.018 * s) if s % 20 == 0 else None] for s in range(0, 101, 5)]
    # What quantize with target_bits_per_weight records: the bits each Linear got.
    layers = {f"model.layers.{i}.{m}": (4 if (i + j) % 3 else 8) for i in range(6)
              for j, m in enumerate(["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"])}
    layers["lm_head"] = 8
    passes = [
        PassRecord(type="distill", seconds=12.34, info={"steps": 100, "steps_done": 100, "best_step": 80,
                                                         "best_eval_loss": 1.46, "loss_curve": curve,
                                                         "big_list": list(range(500)), "long": "x" * 5000}),
        PassRecord(type="quantize", seconds=0.5, info={"method": "rtn", "bits": 4, "bits_per_layer": layers}),
    ]
    checks = [CheckResult(name="max_perplexity_increase_pct", threshold=5.0, value=increase, passed=False,
                          interval=[increase - 2.5, increase + 3.0]),
              CheckResult(name="max_size_mb", threshold=200.0, value=size / 1e6, passed=True)]
    samples = [{"prompt": "The capital of France is", "baseline": " Paris, a city of", "optimized": " Paris, the city"},
               {"prompt": "2 + 2 =", "baseline": " 4\x15", "optimized": " 4\x15"}]
    report = report.model_copy(update={"passes": passes, "checks": checks,
                                       "notes": ["a <script>alert(1)</script> & note"]})
    # Fields being added to the schema (layer errors, samples, peak memory split): set them either way.
    report = report.model_copy(update={"layer_errors": [0.001, 0.003, 0.01, 0.02, 0.05, 0.2], "samples": samples})
    return report.model_copy(update={"optimized": opt.model_copy(update={"peak_load_mb": 180.0,
                                                                         "peak_decode_mb": 60.0}),
                                     "baseline": base.model_copy(update={"peak_load_mb": 610.0,
                                                                         "peak_decode_mb": 75.0})})


def runs() -> list[tuple[str, Report]]:
    return [("int8", make_report(ppl=10.1, size=130_000_000, decode=28.0)),
            ("int4-rtn", make_report(ppl=11.5, size=70_000_000, decode=34.0)),
            ("int4-gptq", make_report(ppl=10.6, size=70_000_000, decode=34.0)),  # beats int4-rtn
            ("pruned <b>", make_report(ppl=13.0, size=60_000_000, decode=26.0))]


def test_report_html_holds_the_numbers_and_nothing_external():
    page = render_html(make_report())
    assert page.startswith("<!DOCTYPE html>") and "<title>llmopt report — m</title>" in page
    assert 'id="headline"' in page and "size on disk (MB)" in page
    for number in ("500", "100", "+10.0%", "0.05", "90.00%", "10.67 to 11.44", "+7.50% to +13.00%"):
        assert number in page, number
    assert "<svg" in page and "polyline" in page  # bar charts, per-layer error and loss curve
    assert "Distillation loss" in page and "Per-layer error" in page and "Precision map" in page
    assert "int8: 7 tensors" in page and "int4: 12 tensors" in page  # the mixed pass's bits_per_layer, counted
    assert "peak memory, load (MB)" in page and "610" in page
    assert "FAIL" in page and "pass" in page and "Paris, " in page
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; note" in page
    assert "\x15" not in page and "4\\x15" in page  # control characters shown as \\xNN
    assert "… (500 items)" in page and "x" * 200 not in page  # long pass info truncated
    # Without the optional sections, the page still renders and leaves them out.
    plain = render_html(make_report(full=False))
    assert "Distillation loss" not in plain and "Precision map" not in plain and 'id="headline"' in plain


def test_compare_html_table_scatter_and_pareto():
    unmeasured = make_report(ppl=9.0, size=50_000_000)  # best and smallest, but no speed: left out of the front
    unmeasured = unmeasured.model_copy(update={"optimized": unmeasured.optimized.model_copy(
        update={"decode_tokens_per_s": None})})
    page = render_compare_html([*runs(), ("no speed", unmeasured)])
    assert "not rated" in page
    assert 'id="compare-table"' in page and "Quality vs size" in page and "<circle" in page
    assert "int4-gptq" in page and "pruned &lt;b&gt;" in page and "pruned <b>" not in page
    assert page.count("★ Pareto") == 3 and "beaten by int4-gptq" in page
    assert "http://" not in page and "https://" not in page


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    if not CHROMIUM.exists():
        if os.environ.get("LLMOPT_REQUIRE_CHROMIUM"):
            pytest.fail(f"{CHROMIUM} is missing although .ci/run installed Debian's chromium.")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium); the HTML render check needs it.")
    profile = tmp_path / "profile"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


@pytest.mark.parametrize("kind", ["report", "compare"])
@pytest.mark.slow
def test_renders_in_headless_chromium(tmp_path, kind):
    page = render_html(make_report()) if kind == "report" else render_compare_html(runs())
    path = tmp_path / f"{kind}.html"
    path.write_text(page, encoding="utf-8")
    shot = tmp_path / "shot.png"
    done = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", path.as_uri())
    assert shot.exists() and shot.stat().st_size > 10_000, done.stderr[-2000:]
    dom = _chromium(tmp_path, "--dump-dom", path.as_uri()).stdout
    if kind == "report":
        assert re.search(r"<h1>llmopt report — m</h1>", dom)
        assert '<table id="headline">' in dom and "size on disk (MB)" in dom
    else:
        assert "<h1>llmopt compare — 4 runs</h1>" in dom and '<table id="compare-table">' in dom
    if os.environ.get("LLMOPT_KEEP_SHOTS"):  # look at them: LLMOPT_KEEP_SHOTS=/some/folder
        keep = Path(os.environ["LLMOPT_KEEP_SHOTS"])
        keep.mkdir(parents=True, exist_ok=True)
        (keep / f"{kind}.png").write_bytes(shot.read_bytes())
        (keep / f"{kind}.html").write_text(page, encoding="utf-8")


def test_report_html_shows_task_scores():
    report = make_report().model_copy(update={"tasks": {"arc_easy": {"metric": "acc_norm,none", "baseline": 0.61,
                                                                     "optimized": 0.58}}})
    page = render_html(report)
    assert "Tasks (lm-eval-harness)" in page and "arc_easy" in page and "acc_norm,none" in page
    assert "Tasks (lm-eval-harness)" not in render_html(make_report())


def test_changes_within_noise_are_shown_not_judged():
    """A sub-megabyte memory change or a speed change inside the runs' spread is no finding: muted, not red."""
    from llmopt.evaluation.html.charts import _bar_pair
    from llmopt.evaluation.html.report_page import _change_html, _noise

    assert _change_html(0.1, 0.62, False, _noise("peak memory added (MB)")) == \
        '<span class="muted">+520.0% (within noise)</span>'
    assert _change_html(100.0, 300.0, False, _noise("peak memory added (MB)")) == '<span class="bad">+200.0%</span>'
    assert _change_html(0.1, 0.62, False, _noise("size on disk (MB)")) == '<span class="bad">+520.0%</span>'
    within = _bar_pair("prefill latency (ms)", 100.0, 90.0, higher_better=False, noise=12.0)
    assert "within the spread of the runs (±12)" in within and "better" not in within
    beyond = _bar_pair("prefill latency (ms)", 100.0, 80.0, higher_better=False, noise=12.0)
    assert "-20.0% · 1.25× better" in beyond
