"""Progress of `globe fit` when stderr is not a terminal: periodic log lines for every long phase."""

from __future__ import annotations

import logging
import re

import pytest

from globe.config import GlobeConfig
from globe.testing.models import fixture_path


@pytest.fixture
def lines(monkeypatch, caplog):
    """Every phase logs as if the model were full size, one line per update (no 20 s wait)."""
    import globe.fit.init as init
    import globe.progress as progress

    monkeypatch.setattr(progress, "DEFAULT_EVERY_S", 0.0)
    monkeypatch.setattr(init, "QUIET_NUMEL", 0)
    monkeypatch.setattr(logging.getLogger("globe"), "propagate", True)
    caplog.set_level(logging.INFO, logger="globe")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "globe"]


def test_fit_logs_progress_of_every_phase_without_a_tty(tmp_path, lines):
    from globe.fit.run import run_fit

    text = tmp_path / "calib.txt"
    text.write_text((fixture_path() / "eval.txt").read_text()[:4000])
    cfg = GlobeConfig.from_dict({
        "model": {"path": str(fixture_path())}, "output_dir": str(tmp_path / "o"),
        "bank": {"m_up": 4, "r": 8}, "sparsity": {"target_support": 2},
        "train": {"steps": 6, "batch_size": 8, "eval_every": 3, "families": ["up"], "objective": "activation",
                  "calib_text": str(text), "calib_tokens": 300, "calib_row_weights": True,
                  "baseline_mobe": True, "baseline_steps": 2}})
    run_fit(cfg, progress=False)  # what run_fit does when stderr is not a TTY
    got = lines()
    # the optimisation loop: step, rate, ETA, loss, support, temperature on one line
    step = [ln for ln in got if ln.startswith("fit up: ") and "/6 steps" in ln]
    assert step, got
    assert any(re.search(r"fit up: \d+/6 steps \(\d+%\), [\d.e+-]+ steps/s, ETA \S+, elapsed \S+, "
                         r"loss=[\d.e+-]+, err=[\d.e+-]+, sup=\d+, T=[\d.e+-]+", ln) for ln in step), step
    for phase in ("calibration: ", "read up experts: ", "warm start up: common row space: ",
                  "warm start up: spectra and proxies: ", "initial evaluation up: ", "evaluation up at step 3: ",
                  "prune and refit A up: ", "SVD baseline up: spectra: ",
                  "MoBE-style baseline up: "):
        mine = [ln for ln in got if ln.startswith(phase)]
        assert any("ETA" in ln or "done" in ln for ln in mine), (phase, got)
    assert any(ln.startswith("baselines up: svd error") for ln in got)
    # the last evaluation (step 6) measured the kept state: no second full pass over the family
    assert not any(ln.startswith("final evaluation up: ") for ln in got), got


def test_quiet_for_small_families(tmp_path, monkeypatch, caplog):
    """On small models only the loop reports (its bar or lines); short phases stay silent."""
    import globe.progress as progress
    from globe.fit.run import run_fit

    monkeypatch.setattr(progress, "DEFAULT_EVERY_S", 0.0)
    monkeypatch.setattr(logging.getLogger("globe"), "propagate", True)
    caplog.set_level(logging.INFO, logger="globe")
    cfg = GlobeConfig.from_dict({
        "model": {"path": str(fixture_path())}, "output_dir": str(tmp_path / "o"),
        "bank": {"m_up": 4, "r": 8}, "sparsity": {"target_support": 2},
        "train": {"steps": 4, "batch_size": 8, "eval_every": 2, "families": ["up"]}})
    run_fit(cfg, progress=False)
    got = [r.getMessage() for r in caplog.records if r.name == "globe"]
    assert any(ln.startswith("fit up: 4/4 steps") or ln.startswith("fit up: done") for ln in got), got
    assert not any(ln.startswith(("read up", "warm start", "evaluation", "final evaluation")) for ln in got), got


def test_cli_fit_prints_progress_lines_to_a_pipe(tmp_path):
    """`globe fit` with stderr a pipe (CI, nohup): log lines on stderr, as configured by the environment."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "GLOBE_PROGRESS_EVERY_S": "0"}
    cmd = [sys.executable, "-m", "globe.cli.main", "fit", f"model.path={fixture_path()}",
           f"output_dir={tmp_path / 'o'}", "bank.m_up=4", "bank.r=8", "sparsity.target_support=2", "train.steps=3",
           "train.batch_size=8", "train.families=[up]", "train.device=cpu"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if " globe: fit up: " in ln]
    assert any(re.search(r"fit up: [123]/3 steps .* steps/s, ETA .*loss=.*sup=.*T=", ln) for ln in lines), run.stderr
    assert "\r" not in run.stderr.split("globe: fit up")[1]  # no tqdm carriage returns in a pipe


def test_heartbeat_while_one_update_takes_long(caplog, monkeypatch):
    """A phase whose single step outlasts the interval still logs (issue 8: no phase silent > 30 s);
    close() ends the heartbeat."""
    import time

    import globe.progress as progress

    monkeypatch.setattr(logging.getLogger("globe"), "propagate", True)
    caplog.set_level(logging.INFO, logger="globe")
    bar = progress.Progress(4, "slow phase", "chunks", bar=False, every_s=0.05)
    time.sleep(0.3)  # one long step, no update()
    beats = [r.getMessage() for r in caplog.records if r.getMessage().startswith("slow phase: 0/4 chunks")]
    assert len(beats) >= 3, beats
    bar.update(4)
    bar.close()
    n = len(caplog.records)
    time.sleep(0.2)
    assert len(caplog.records) == n  # nothing after close
    assert caplog.records[-1].getMessage().startswith("slow phase: done")


def test_heartbeat_gives_up_on_an_abandoned_bar(caplog, monkeypatch):
    import time

    import globe.progress as progress

    monkeypatch.setattr(logging.getLogger("globe"), "propagate", True)
    monkeypatch.setattr(progress, "HEARTBEAT_MAX_IDLE", 3)
    caplog.set_level(logging.INFO, logger="globe")
    bar = progress.Progress(4, "abandoned", "chunks", bar=False, every_s=0.03)  # never updated nor closed
    time.sleep(0.4)
    beats = [r for r in caplog.records if r.getMessage().startswith("abandoned: 0/4")]
    assert 1 <= len(beats) <= 3, len(beats)
    del bar


def test_a_quiet_phase_that_runs_long_starts_reporting(caplog, monkeypatch):
    """quiet=True (small models) is silent while the phase is short; one that outlasts the interval (a busy
    machine: the fixture's MoBE baseline ran 17 min silent) logs from then on, closing line included."""
    import time

    import globe.progress as progress

    monkeypatch.setattr(logging.getLogger("globe"), "propagate", True)
    caplog.set_level(logging.INFO, logger="globe")
    short = progress.Progress(3, "short", "steps", bar=False, every_s=5.0, quiet=True)
    short.update(3)
    short.close()
    assert not [r for r in caplog.records if r.getMessage().startswith("short")]
    slow = progress.Progress(3, "slow", "steps", bar=True, every_s=0.05, quiet=True)  # bar=True: a terminal
    slow.update(1)
    assert not [r for r in caplog.records if r.getMessage().startswith("slow")]
    time.sleep(0.1)
    slow.update(1)
    got = [r.getMessage() for r in caplog.records if r.getMessage().startswith("slow")]
    assert got[0].startswith("slow: started ") and got[0].endswith(" ago of 3 steps"), got  # when it began
    assert got[1].startswith("slow: 2/3 steps"), got
    slow.update(1)
    slow.close()
    assert caplog.records[-1].getMessage().startswith("slow: done")
