"""Files and directories written atomically get the usual permissions (umask), not mkstemp's 0600/0700."""

from __future__ import annotations

import os
from pathlib import Path

from globe.artifacts import atomic_write
from globe.io.outputs import staging_dir


def test_atomic_write_and_staging_dir_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", lambda q: Path(q).write_text("{}"))
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
        with staging_dir(tmp_path / "out") as d:
            (d / "x").write_text("x")
        assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    finally:
        os.umask(old)
