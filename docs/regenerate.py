"""Rewrite the generated parts of the docs from the code, after adding or changing a pass, a recipe or a family:

    python docs/regenerate.py

- README.md's blocks between `<!-- NAME -->` and `<!-- /NAME -->`: the family × pass table (families), the
  recipe table (recipes), the pass list (passes);
- docs/passes.md, the pass reference, and docs/report.schema.json, the schema of report.json.

The tests compare each with what the code generates (tests/cli/test_usability.py, tests/core/test_architectures.py,
tests/recipes/test_shipped_recipes.py), so a stale doc fails CI and this script is the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_blocks() -> dict[str, str]:
    from llmopt.architectures import support_markdown
    from llmopt.recipe import recipes_markdown
    from llmopt.schema import pass_list_markdown

    return {"families": support_markdown(), "recipes": recipes_markdown(), "passes": pass_list_markdown()}


def with_blocks(readme: str, blocks: dict[str, str]) -> str:
    for name, text in blocks.items():
        start, end = f"<!-- {name} -->\n", f"<!-- /{name} -->"
        head, rest = readme.split(start, 1)
        readme = head + start + text + end + rest.split(end, 1)[1]
    return readme


def main() -> None:
    from llmopt.schema import passes_markdown, report_json_schema

    readme = ROOT / "README.md"
    readme.write_text(with_blocks(readme.read_text(encoding="utf-8"), readme_blocks()), encoding="utf-8")
    (ROOT / "docs" / "passes.md").write_text(passes_markdown(), encoding="utf-8")
    (ROOT / "docs" / "report.schema.json").write_text(json.dumps(report_json_schema(), indent=2) + "\n",
                                                      encoding="utf-8")
    print("README.md, docs/passes.md and docs/report.schema.json regenerated")


if __name__ == "__main__":
    main()
