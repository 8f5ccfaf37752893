"""SIGTERM during an export: the CLI exits 143 and leaves neither the output nor its hidden staging dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from globe.testing.artifacts import random_artifacts

SLOW_EXPORT = """
import sys, time
import globe.runtime.export as ex
real = ex._cast
def slow(*a, **k):
    time.sleep(0.05)  # long enough for the test to see the staging dir and send SIGTERM
    return real(*a, **k)
ex._cast = slow
from globe.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_export_cleans_up(tiny_dirs, tmp_path):
    model, src = tiny_dirs["qwen2_moe"]
    arts = tmp_path / "fit"
    random_artifacts(model).save(arts)
    out = tmp_path / "export"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, "export", f"model.path={src}", f"artifacts={arts}",
                             f"output_dir={out}", "export.format=dense"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".export.tmp-*")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the export never staged its output"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated" in err
    assert not out.exists()
    assert not list(tmp_path.glob(".export.tmp-*")), sorted(p.name for p in Path(tmp_path).iterdir())
