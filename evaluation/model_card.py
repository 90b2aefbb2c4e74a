"""The artifact's README.md: a Hugging Face model card with the base model, recipe and headline figures."""

from __future__ import annotations

import yaml

from llmopt.evaluation.report import Report, headline_rows


def _fmt(value) -> str:
    if value is None:
        return "–"
    return f"{value:,.3f}" if isinstance(value, float) else f"{value:,}"


def render_model_card(report: Report) -> str:
    model = report.model
    fmt = report.export["format"]
    meta: dict = {"library_name": "onnxruntime" if fmt == "onnx" else "transformers",
                  "tags": ["llmopt", fmt] + sorted({p.type for p in report.passes})}
    if model.get("kind") == "hub":
        meta["base_model"] = str(model["spec"]).split("@", 1)[0]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {model.get('name') or model['spec']} — optimized with llmopt", "",
             f"Base model: {model.get('name') or model['spec']} (`{model['spec']}`, {model.get('model_type')}). "
             f"Format: **{fmt}** for "
             f"{report.export.get('runtime', '')}. Passes: {', '.join(p.type for p in report.passes) or 'none'}.", "",
             "| metric | base (float32) | this model |", "|---|---:|---:|"]
    lines += [f"| {name} | {_fmt(a)} | {_fmt(b)} |" for name, a, b in headline_rows(report)]
    if model.get("input_bytes"):
        lines += ["", f"The input model's weight files take {model['input_bytes'] / 1e6:.1f} MB on disk (the base "
                      f"column above is its float32 export)."]
    if report.quality:
        lines += ["", f"Top-1 next-token agreement with the base model: {report.quality.top1_agreement:.1%}; "
                      f"KL divergence {report.quality.kl_divergence:.4f} nats/token on {report.quality.data}."]
    lines += ["", "Full figures: `report.md` / `report.json`; file checksums: `manifest.json`.", "",
              "## Recipe", "", "```yaml", yaml.safe_dump(report.recipe, sort_keys=False).strip(), "```", ""]
    if fmt == "onnx":
        lines += ["## Use", "", "With optimum's ORTModelForCausalLM (`pip install optimum-onnx`, which needs "
                  "transformers < 4.58):", "", "```python", "from optimum.onnxruntime import ORTModelForCausalLM",
                  "from transformers import AutoTokenizer", "model = ORTModelForCausalLM.from_pretrained(PATH)",
                  "tokenizer = AutoTokenizer.from_pretrained(PATH)", "```", ""]
        if any("genai" in runtime for runtime in report.export.get("runtimes", [])):
            lines += ["or with onnxruntime-genai (`genai_config.json`; the KV cache is updated in place):", "",
                      "```python", "import onnxruntime_genai as og", "model = og.Model(PATH)",
                      "tokenizer = og.Tokenizer(model)", "```", ""]
    else:
        lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(PATH)",
                  "tokenizer = AutoTokenizer.from_pretrained(PATH)", "```", ""]
    return "\n".join(lines)
