"""Shared by the bad-input tests: run the CLI in-process and require one `error:` line and exit 2."""

from __future__ import annotations

from globe.cli.main import main


def one_line(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err and err[-1].startswith("error: "), err
    assert "Traceback" not in "\n".join(err)
    return err[-1]
