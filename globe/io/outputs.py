"""Output locations: checked before any work, written under a temporary name, renamed when complete.

Why: a fit or an export can run for hours; finding out at the end that the destination is read-only,
not ours, or full wastes all of it and used to end in an OSError traceback. `check_writable` proves
the destination (or its nearest existing parent) accepts a new file and, when the size is known, has
the room; `staging_dir` gives a temporary directory beside the destination that is renamed onto it
only when everything was written (removed on any error), so nothing half-written is ever left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import GlobeError

DISK_MARGIN = 1.02  # keep 2% slack beyond the computed size


def _existing_parent(path: Path) -> Path:
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return p


def check_writable(path: str | os.PathLike, need_bytes: int | None = None, what: str = "output") -> Path:
    """Raise a one-line GlobeError unless `path` (a directory, existing or to be created) can be written
    and its file system has `need_bytes` free. Returns the expanded path."""
    out = Path(path).expanduser()
    if out.is_symlink() and not out.exists():  # the final rename would fail after all the work
        raise GlobeError(f"{what} {out} is a symbolic link to a missing target ({os.readlink(out)}); remove it or "
                         "give another path")
    base = _existing_parent(out.absolute())
    if base.exists() and not base.is_dir():
        raise GlobeError(f"{what} {out}: {base} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".globe-write-test-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise GlobeError(f"{what} {out} cannot be written ({base}: {e.strerror or e})") from None
    if need_bytes is not None:
        free = shutil.disk_usage(base).free
        if free < need_bytes * DISK_MARGIN:
            raise GlobeError(f"{what} {out}: not enough disk space: need {need_bytes / 1e9:.2f} GB, "
                             f"{free / 1e9:.2f} GB free on {base}")
    return out


def check_file_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Like check_writable for a single output file (its directory must exist and accept files)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise GlobeError(f"{what} {p} is a directory; give a file name")
    if not p.parent.is_dir():
        raise GlobeError(f"{what} directory does not exist: {p.parent}")
    check_writable(p.parent, what=what)
    return p


def scratch_dir(parent: str | os.PathLike) -> Path:
    """A fresh hidden directory `.globe-write-*` inside `parent` for files that are renamed into place
    when complete (a family file, a rank's adapter rows); the caller removes it."""
    return Path(tempfile.mkdtemp(prefix=".globe-write-", dir=parent))


@contextlib.contextmanager
def staging_dir(out: Path, replace: bool = False) -> Iterator[Path]:
    """A temporary directory next to `out`, renamed onto it at the end; on any error it is removed and
    `out` is left as it was. `out` must be absent or empty, unless `replace` (then an existing `out` is
    deleted just before the rename: e.g. a report rendered again)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any directory
    try:
        yield tmp
        if out.exists():
            if replace:
                shutil.rmtree(out)
            else:
                out.rmdir()  # empty (checked by the caller), so the rename can take its place
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
