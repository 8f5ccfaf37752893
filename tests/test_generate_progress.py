"""`globe generate` on a big model reports progress per new token (at full size a token takes seconds)."""

from __future__ import annotations

import logging

import globe.eval.perplexity as perplexity
import globe.progress as progress
from globe.cli.main import main
from globe.fixtures import FIXTURE_DIR


def test_generate_progress_on_big_models(monkeypatch, caplog, capsys):
    monkeypatch.setattr(perplexity, "BIG_PARAMS", 0)  # the fixture counts as big
    monkeypatch.setattr(progress, "DEFAULT_EVERY_S", 0.0)
    monkeypatch.setattr(logging.getLogger("globe"), "propagate", True)
    caplog.set_level(logging.INFO, logger="globe")
    assert main(["generate", f"model.path={FIXTURE_DIR}", "prompt=def f(", "max_new_tokens=5"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("generate:")]
    assert lines[0] == "generate: started of 5 tokens" and "5/5 tokens" in " ".join(lines)
    assert lines[-1].startswith("generate: done")
    assert capsys.readouterr().out.startswith("def f(")
