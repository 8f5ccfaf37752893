"""Reading a user's text file (eval text, calibration text): UTF-8, non-empty, one-line errors."""

from __future__ import annotations

from pathlib import Path

from ..errors import GlobeError


def load_text(path: str | Path, what: str = "eval text") -> str:
    """Read a UTF-8 text file; missing, unreadable, not UTF-8 (e.g. binary) or empty -> GlobeError naming
    `what` and the path."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise GlobeError(f"{what} {p} is a directory, not a text file")
    if not p.is_file():
        raise GlobeError(f"{what} file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GlobeError(f"cannot read {what} file {p}: {e}") from None
    if not text.strip():
        raise GlobeError(f"{what} file is empty: {p}")
    return text
