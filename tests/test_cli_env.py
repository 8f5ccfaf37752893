"""The CLI bounds oneDNN's primitive cache (memory at full size) unless the user chose a size."""

from __future__ import annotations

import os

import pytest

from globe.cli.main import main
from globe.cli.process import ONEDNN_CACHE_CAPACITY
from globe.fixtures import FIXTURE_DIR

VAR = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def test_cli_sets_a_bounded_onednn_cache(monkeypatch, capsys):
    monkeypatch.delenv(VAR, raising=False)
    assert main(["inspect", str(FIXTURE_DIR)]) == 0
    assert os.environ[VAR] == str(ONEDNN_CACHE_CAPACITY) == "128"


def test_cli_keeps_the_users_onednn_cache_size(monkeypatch, capsys):
    monkeypatch.setenv(VAR, "7")
    assert main(["inspect", str(FIXTURE_DIR)]) == 0
    assert os.environ[VAR] == "7"


# A child process allocates and frees an 8 MiB block with the C library's malloc (glibc then raises its mmap
# threshold to 8 MiB), then allocates 1 MiB and prints how many mmapped blocks that added: 0 when the
# threshold moved (the block came from the heap), 1 when bound_malloc froze it at 128 KiB.
CHILD = """
import ctypes, sys
from globe.cli.process import bound_malloc
class MI(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks "
                                               "fordblks keepcost").split()]
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MI
applied = bound_malloc() if sys.argv[1] == "1" else False
libc.free(libc.malloc(8 << 20))
before = libc.mallinfo2().hblks
q = libc.malloc(1 << 20)
print(applied, libc.mallinfo2().hblks - before)
"""


def _child(bound: bool, env: dict[str, str] | None = None) -> str:
    import subprocess
    import sys

    full = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", CHILD, "1" if bound else "0"], env={**full, **(env or {})},
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _glibc_mallinfo2() -> bool:
    import ctypes
    import sys

    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_bound_malloc_freezes_the_mmap_threshold():
    assert _child(False) == "False 0"  # glibc's dynamic threshold: the 1 MiB block came from the heap
    assert _child(True) == "True 1"  # frozen at 128 KiB: mmapped, so given back to the system when freed
    # the user's own setting wins: bound_malloc leaves it alone (the variable sets 16 MiB here)
    assert _child(True, {"MALLOC_MMAP_THRESHOLD_": str(16 << 20)}) == "False 0"


@pytest.mark.skipif(not _glibc_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_an_empty_malloc_variable_is_no_setting():
    assert _child(True, {"MALLOC_MMAP_THRESHOLD_": ""}) == "True 1"


def test_an_empty_onednn_variable_is_no_setting(monkeypatch, capsys):
    monkeypatch.setenv(VAR, "")
    assert main(["inspect", str(FIXTURE_DIR)]) == 0
    assert os.environ[VAR] == "128"


def _omp_spin(env: dict[str, str]) -> tuple[str, str]:
    """(OMP_WAIT_POLICY, GOMP_SPINCOUNT) as libgomp reports them (OMP_DISPLAY_ENV=VERBOSE) in a child that
    applies the CLI's setting, then loads torch."""
    import re
    import subprocess
    import sys

    code = ("from globe.cli.process import quiet_openmp; quiet_openmp(); import torch; torch.set_num_threads(2); "
            "torch.ones(256, 256) @ torch.ones(256, 256)")
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env={**full, "OMP_DISPLAY_ENV": "VERBOSE", **env},
                         capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    policy, spin = re.search(r"OMP_WAIT_POLICY = '(\w+)'", text), re.search(r"GOMP_SPINCOUNT = '(\d+)'", text)
    if policy is None or spin is None:
        pytest.skip("torch's OpenMP runtime does not display its environment (not GNU libgomp)")
    return policy.group(1), spin.group(1)


def test_cli_shortens_the_openmp_spin_unless_the_user_chose():
    from globe.cli.process import SPIN_COUNT

    assert _omp_spin({})[1] == str(SPIN_COUNT) == "3000"
    assert _omp_spin({"GOMP_SPINCOUNT": "77"})[1] == "77"  # the user's own values win
    assert _omp_spin({"OMP_WAIT_POLICY": "ACTIVE"})[0] == "ACTIVE"
    assert _omp_spin({"OMP_WAIT_POLICY": "ACTIVE"})[1] != str(SPIN_COUNT)
