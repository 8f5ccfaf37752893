"""Shared by the bad-input tests: run the CLI in-process and require one `error:` line and exit 2; copies of
model directories with an edited config.json or safetensors file."""

from __future__ import annotations

import json
import shutil

from globe.cli.main import main


def one_line(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err and err[-1].startswith("error: "), err
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def edit_config(src, dst, edit):
    """A copy of model directory src at dst whose config.json dict went through edit(cfg) (in place)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def edit_weights(src, dst, edit, file: str = "model.safetensors"):
    """A copy of directory src at dst whose safetensors `file` went through edit(state_dict) (in place)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(str(dst / file))
    edit(sd)
    save_file(sd, str(dst / file), metadata={"format": "pt"})
    return dst
