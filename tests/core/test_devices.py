"""Device choice: the CUDA execution provider when a GPU is there or asked for. No GPU here: detection is mocked."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import llmopt
from llmopt import devices
from llmopt.cli.app import app
from llmopt.errors import ResourceError
from tests.cli.test_exit_codes import run_main

WITH_GPU = (["CUDAExecutionProvider", "CPUExecutionProvider"], True)
GPU_LIBRARY_ONLY = (["CUDAExecutionProvider", "CPUExecutionProvider"], False)  # onnxruntime-gpu, no GPU
CPU_PACKAGE = (["CPUExecutionProvider"], False)


def _machine(monkeypatch, providers, gpu):
    monkeypatch.setattr(devices, "ort_providers", lambda: providers)
    monkeypatch.setattr(devices, "cuda_available", lambda: gpu)
    monkeypatch.setattr(devices, "device_name", lambda p: "cuda (Mock GPU)" if p == devices.CUDA else "cpu (Mock CPU)")


@pytest.mark.parametrize("machine, requested, expected", [
    (WITH_GPU, "auto", devices.CUDA), (WITH_GPU, "cuda", devices.CUDA), (WITH_GPU, "cpu", devices.CPU),
    (GPU_LIBRARY_ONLY, "auto", devices.CPU), (CPU_PACKAGE, "auto", devices.CPU),
])
def test_the_provider_follows_the_machine_and_the_recipe(machine, requested, expected, monkeypatch):
    _machine(monkeypatch, *machine)
    assert devices.resolve_provider(requested) == expected


@pytest.mark.parametrize("machine, reason", [(GPU_LIBRARY_ONLY, "torch sees no CUDA GPU"),
                                             ((["CPUExecutionProvider"], True), "install onnxruntime-gpu")])
def test_cuda_without_a_gpu_is_refused_with_the_reason(machine, reason, monkeypatch):
    _machine(monkeypatch, *machine)
    with pytest.raises(ResourceError, match=reason) as exc:
        devices.resolve_provider("cuda")
    assert "execution_provider: auto" in exc.value.hint


def test_dry_run_names_the_device_and_refuses_cuda_early(tiny_model_dir, fast_recipe, tmp_path, monkeypatch, capsys):
    recipe = fast_recipe("export: {format: onnx, execution_provider: cuda}\n")
    _machine(monkeypatch, *WITH_GPU)
    result = CliRunner().invoke(app, ["optimize", str(recipe), "--model", str(tiny_model_dir), "-o",
                                      str(tmp_path / "o"), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["device"] == "cuda (Mock GPU)"

    _machine(monkeypatch, *GPU_LIBRARY_ONLY)
    code, err = run_main(monkeypatch, capsys, "optimize", str(recipe), "--model", str(tiny_model_dir), "-o",
                         str(tmp_path / "o"), "--dry-run")
    assert code == 5 and "torch sees no CUDA GPU" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_gpu_run_that_falls_back_to_the_cpu_says_so(tiny_model_dir, fast_recipe, tmp_path, monkeypatch):
    """Detection says GPU; onnxruntime cannot load CUDA here, runs on the CPU, and the report tells the truth."""
    _machine(monkeypatch, *WITH_GPU)
    result = llmopt.optimize(fast_recipe(), model=str(tiny_model_dir), output=tmp_path / "o")
    report = result.report
    assert report.export["execution_provider"] == devices.CUDA
    assert report.environment["device"] == "cpu (Mock CPU)"
    assert any("CUDAExecutionProvider was chosen but the artifact ran on CPUExecutionProvider" in n for n in report.notes)


@pytest.mark.slow
def test_on_the_cpu_the_report_names_the_processor(tiny_model_dir, fast_recipe, tmp_path):
    result = llmopt.optimize(fast_recipe("export: {format: onnx, execution_provider: cpu}\n"),
                             model=str(tiny_model_dir), output=tmp_path / "o")
    assert result.report.environment["device"] == f"cpu ({devices.cpu_name()})"
    assert not any("was chosen but" in n for n in result.report.notes)


def test_onnx_without_an_onnx_runtime_is_refused_at_plan_time(tiny_model_dir, fast_recipe, monkeypatch):
    """The runtime is an extra ([cpu] or [gpu]); without one an ONNX recipe fails at plan time, saying which to
    install, and a safetensors recipe still plans."""
    import llmopt
    from llmopt.errors import RecipeError

    monkeypatch.setattr(devices, "onnxruntime_installed", lambda: False)
    with pytest.raises(RecipeError, match="needs onnxruntime, and none is installed") as refused:
        llmopt.validate(fast_recipe("export: {format: onnx}\n"), model=str(tiny_model_dir))
    assert "'.[cpu]'" in refused.value.hint and "'.[gpu]'" in refused.value.hint
    plan = llmopt.validate(fast_recipe("export: {format: safetensors}\n", name="s.yaml"), model=str(tiny_model_dir))
    assert plan.provider == devices.CPU
