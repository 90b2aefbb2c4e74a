"""Which device evaluation runs on: the CUDA execution provider when a GPU is there (or asked for), else the CPU."""

from __future__ import annotations

from typing import Literal

from llmopt.errors import ResourceError

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def ort_providers() -> list[str]:
    """onnxruntime's execution providers; none when no onnxruntime is installed (a safetensors-only setup)."""
    if not onnxruntime_installed():
        return []
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def onnxruntime_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def require_onnxruntime(what: str) -> None:
    """A plan-time RecipeError when no ONNX runtime is installed: it is an extra the user picks."""
    if not onnxruntime_installed():
        from llmopt.errors import RecipeError

        raise RecipeError(f"{what} needs onnxruntime, and none is installed.",
                          "Install one of llmopt's runtime extras: `pip install '.[cpu]'` (onnxruntime, which "
                          "onnxruntime-genai uses too) or `pip install '.[gpu]'` (onnxruntime-gpu, NVIDIA GPUs); "
                          "not both. Or export safetensors (`--format safetensors`).")


def resolve_provider(requested: Literal["auto", "cpu", "cuda"]) -> str:
    """The onnxruntime execution provider for `export.execution_provider`.

    onnxruntime-gpu lists CUDAExecutionProvider whether or not a GPU is present, so a GPU is also asked of
    torch (which needs the driver to answer).
    """
    if requested == "cpu":
        return CPU
    gpu = cuda_available()
    if not gpu and requested == "auto":
        return CPU  # without importing onnxruntime at plan time (it writes a telemetry file on import)
    providers = ort_providers()
    usable = gpu and CUDA in providers
    if requested == "cuda" and not usable:
        why = ("torch sees no CUDA GPU (torch.cuda.is_available() is False)" if not gpu
               else "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
        raise ResourceError(f"export.execution_provider: cuda was asked for, but {why}.",
                            "Run on a machine with an NVIDIA GPU and its driver, or set execution_provider: auto "
                            "(the GPU when there is one, else the CPU) or cpu.")
    return CUDA if usable else CPU


def torch_device(provider: str) -> str:
    return "cuda" if provider == CUDA else "cpu"


def device_name(provider: str) -> str:
    """E.g. 'cuda (NVIDIA H100 80GB HBM3)' or 'cpu (AMD EPYC)', for the report."""
    if provider == CUDA:
        import torch

        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({cpu_name()})"


def cpu_name() -> str:
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
