"""`globe inspect ... | head`: a reader that leaves early is not an error (no BrokenPipeError traceback)."""

from __future__ import annotations

import os
import subprocess
import sys

from globe.fixtures import FIXTURE_DIR


def test_closed_stdout_is_not_a_traceback():
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write
    try:
        proc = subprocess.run([sys.executable, "-m", "globe.cli.main", "inspect", str(FIXTURE_DIR)], stdout=w,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 0
