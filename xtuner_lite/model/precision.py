"""Which floating-point type a model computes in on this machine."""

from __future__ import annotations

from typing import Literal

import torch

Precision = Literal["fp32", "bf16", "auto"]


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (oneDNN on AVX512/AMX); without it
    (AVX2-only CPUs) torch falls back to reference loops, which lose to fp32's oneDNN kernels."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2")


BF16_CAPABILITY = (8, 0)  # Ampere: NVIDIA's first GPUs with bf16 (the 20 series, T4, V100: none)


def cuda_capability(index: int = 0) -> tuple[int, int]:
    """The compute capability of CUDA device ``index`` (the one query tests simulate)."""
    return tuple(torch.cuda.get_device_capability(index))


def inference_dtype(precision: Precision) -> str:
    """The torch dtype name to load a model in for inference: ``auto`` is bf16 on a CUDA GPU
    with bf16 (fp16 on one without: the 20 series, T4, V100) or a CPU with native bf16 (it halves
    the bytes a decode step reads), fp32 elsewhere."""
    if precision == "auto" and torch.cuda.is_available():
        precision = "bf16" if cuda_capability() >= BF16_CAPABILITY else "fp16"
    elif precision == "auto":
        precision = "bf16" if cpu_has_fast_bf16() else "fp32"
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]


__all__ = [
    "BF16_CAPABILITY",
    "Precision",
    "cpu_has_fast_bf16",
    "cuda_capability",
    "inference_dtype",
]
