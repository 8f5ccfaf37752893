"""One device resolver and one dtype table for every verb (fit, export, eval, generate, load).

Why: `device=auto` must pick the same device everywhere (CUDA, then MPS, then CPU) and a forced device
that the machine lacks must fail in one line naming the config key; dtype names ("bf16", "fp16",
"fp32", "auto") map to torch dtypes in exactly one place.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import GlobeError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def to_dtype(name: str | torch.dtype | None, default: torch.dtype | None = None) -> torch.dtype | None:
    """'bf16' | 'fp16' | 'fp32' | 'auto' | torch.dtype -> torch.dtype ('auto'/None -> default)."""
    if name is None or name == "auto":
        return default
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise GlobeError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def has_mps() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | torch.device | None = "auto", key: str = "device") -> torch.device:
    """'auto' (or None) -> cuda | mps | cpu, the first available; a forced device must exist.

    key: the config key named in the error (e.g. "train.device"). Raises GlobeError.
    """
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps() else "cpu")
    base = str(name).split(":")[0]
    if base == "cuda" and not torch.cuda.is_available():
        raise GlobeError(f"{key}=cuda but no CUDA device is available")
    if base == "mps" and not has_mps():
        raise GlobeError(f"{key}=mps but no MPS device is available")
    if base not in ("cpu", "cuda", "mps"):
        raise GlobeError(f"unknown {key} {name!r}; choose auto|cpu|cuda|mps")
    return torch.device(name)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on CUDA with bf16 support (else fp16), fp16 on MPS, fp32 on CPU (bf16 matmuls are
    slow on many CPUs); otherwise the named dtype."""
    if name in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    return to_dtype(name)  # type: ignore[return-value]


def sync(device: torch.device) -> None:
    """Wait for queued kernels so wall-clock timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def check_type(x: Any, cls: type, what: str) -> Any:
    """x itself when it is a `cls` (or None); else ValueError naming the argument (a dict or a GlobeConfig
    passed where a narrow config belongs fails here, not deep inside a verb)."""
    if x is not None and not isinstance(x, cls):
        article = "an" if cls.__name__[:1] in "AEIOU" else "a"
        raise ValueError(f"{what}: expected {article} {cls.__name__}, got {type(x).__name__}")
    return x


def count_non_finite(t: torch.Tensor, chunk: int = 1 << 24) -> int:
    """Number of NaN/inf values in a floating tensor (0 for other dtypes). One aminmax reduction first (NaN
    propagates through it, inf shows as an extreme; no temporary, unlike isfinite's boolean tensor, and
    several times faster on the CPU); only a tensor that fails it is counted, `chunk` elements at a time."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    flat = t.reshape(-1)
    try:
        lo, hi = torch.aminmax(flat)
        if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
            return 0
    except (RuntimeError, NotImplementedError):  # a dtype without aminmax (float8): count below
        pass
    return sum(int((~torch.isfinite(flat[j:j + chunk].float())).sum()) for j in range(0, flat.numel(), chunk))


def has_zero_row(t: torch.Tensor) -> bool:
    """Whether any row of t (rows = first dim, the rest flattened; e.g. the banks of (G, m, r, d)) is all
    zeros. One aminmax reduction per row: no temporary of t's size (a bank of 128 atoms of 704 x 2048, Qwen1.5's
    recipe, holds 185 M numbers)."""
    lo, hi = torch.aminmax(t.reshape(t.shape[0], -1), dim=1)
    return bool(((lo == 0) & (hi == 0)).any())
