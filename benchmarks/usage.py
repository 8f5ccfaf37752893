"""Shared by the benchmark scripts: bad command-line input is one `error: ...` line and exit status 2,
as for the `globe` command (sys.exit("text") would exit 1; argparse prints its usage block first)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn


def die(msg: str) -> NoReturn:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse whose errors (a wrong type, an unknown choice or flag) are one line and exit 2."""

    def error(self, message: str) -> NoReturn:
        die(message)


def check_out(path: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse, before any work, an output file that is a directory or whose directory cannot be written
    (globe.io.outputs.check_writable: a file in the way, no permission, a dangling link)."""
    from globe.errors import GlobeError
    from globe.io.outputs import check_writable

    p = Path(path).expanduser()
    if p.is_dir():
        die(f"{flag} {path} is a directory; give a file path")
    try:
        check_writable(p.parent, what=flag)
    except GlobeError as e:
        die(str(e))


def check_threads(n: int, flag: str = "--threads") -> None:
    """1 <= n <= the CPUs this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not 1 <= n <= cpus:
        die(f"{flag} must be between 1 and the {cpus} CPUs available, got {n}")


def check_device(name: str, flag: str = "--device"):
    """A torch device this machine has (cpu, or cuda when available): the torch.device."""
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError:
        die(f"{flag} {name!r} is not a torch device (cpu, cuda, cuda:1, ...)")
    if dev.type not in ("cpu", "cuda") or (dev.type == "cuda" and not torch.cuda.is_available()):
        die(f"{flag} {name}: not available here (cpu{', cuda' if torch.cuda.is_available() else ''})")
    return dev


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it, with the bf16 matrix extensions it reports (amx_bf16,
    avx512_bf16): bf16 GEMM speed (prefill) differs by an order of magnitude with and without them, so
    figures from different machines are only compared as ratios measured in the same run."""
    import platform

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    ext = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return f"{name or platform.machine()} ({', '.join(ext) if ext else 'no bf16 matrix extensions'})"
