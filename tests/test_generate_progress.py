"""`globe generate` on a big model reports progress per new token (at full size a token takes seconds)."""

from __future__ import annotations

import logging

import globe.progress as progress
from globe.cli.main import main
from globe.fixtures import FIXTURE_DIR


def test_generate_progress_on_big_models(monkeypatch, caplog, capsys):
    monkeypatch.setattr(progress, "BIG_PARAMS", 0)  # the fixture counts as big
    monkeypatch.setattr(progress, "DEFAULT_EVERY_S", 0.0)
    monkeypatch.setattr(logging.getLogger("globe"), "propagate", True)
    caplog.set_level(logging.INFO, logger="globe")
    assert main(["generate", f"model.path={FIXTURE_DIR}", "prompt=def f(", "max_new_tokens=5"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("generate:")]
    assert lines[0] == "generate: started of 5 tokens" and "5/5 tokens" in " ".join(lines)
    assert lines[-1].startswith("generate: done")
    assert capsys.readouterr().out.startswith("def f(")


def test_lru_warmup_progress_on_big_models(monkeypatch, caplog):
    """The lru warm-up pass (silent for 41 s at full size before) reports progress on big models."""
    from globe.runtime.patch import warmup
    from globe.testing.models import tiny_model

    monkeypatch.setattr(progress, "BIG_PARAMS", 0)
    monkeypatch.setattr(logging.getLogger("globe"), "propagate", True)
    caplog.set_level(logging.INFO, logger="globe")
    warmup(tiny_model("qwen2_moe", seed=0), tokens=10, chunk=4)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lru warm-up:")]
    assert lines[0] == "lru warm-up: started of 10 tokens" and lines[-1].startswith("lru warm-up: done")
