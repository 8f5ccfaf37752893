"""Shared by the benchmark scripts: bad command-line input is one `error: ...` line and exit status 2,
as for the `globe` command (sys.exit("text") would exit 1)."""

from __future__ import annotations

import sys
from typing import NoReturn


def die(msg: str) -> NoReturn:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)
