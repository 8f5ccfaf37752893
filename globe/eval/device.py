"""Device and dtype resolution shared by the eval verbs.

Why: `eval.device=auto` must pick CUDA, then MPS, then CPU, and `eval.dtype=auto` a dtype that is fast
and safe there (bf16 on CUDA when supported, fp16 on MPS, fp32 on CPU, where bf16 matmuls are slow on
many CPUs). Forced values are checked against what the machine has so the user gets one clear line.
"""

from __future__ import annotations

import torch

from ..errors import GlobeError

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda | mps | cpu (first available); a forced device must exist."""
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps is not None and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if has_mps else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GlobeError("eval.device=cuda but no CUDA device is available")
    if name == "mps" and not has_mps:
        raise GlobeError("eval.device=mps but MPS is not available")
    if name not in ("cpu", "cuda", "mps"):
        raise GlobeError(f"unknown device {name!r}; choose auto|cpu|cuda|mps")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on CUDA with bf16 support (else fp16), fp16 on MPS, fp32 on CPU."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if name not in DTYPE_NAMES:
        raise GlobeError(f"unknown dtype {name!r}; choose auto|fp32|bf16|fp16")
    return DTYPE_NAMES[name]


def dtype_name(dtype: torch.dtype) -> str:
    for k, v in DTYPE_NAMES.items():
        if v == dtype:
            return k
    return str(dtype).replace("torch.", "")


def sync(device: torch.device) -> None:
    """Wait for queued kernels so wall-clock timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
