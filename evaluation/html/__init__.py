"""The HTML report: one self-contained file, written next to report.json and report.md.

Inline CSS and inline SVG charts (no scripts, no web fonts, no external URL: the file opens offline). Every piece
of text from a report goes through `charts._e` (control characters made visible, then `html.escape`).

- `render_html(report)` (report_page.py): baseline vs optimized for one run.
- `render_compare_html([(name, report), ...])` (compare_page.py): N runs side by side.
- charts.py: the SVG charts and formatting both pages use; report.css: the pages' style.
"""

from llmopt.evaluation.html.compare_page import render_compare_html
from llmopt.evaluation.html.report_page import render_html

__all__ = ["render_compare_html", "render_html"]
