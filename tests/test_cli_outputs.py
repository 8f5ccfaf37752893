"""Output locations that cannot be written: one line naming the path, exit 2, before any work.

Issue 9: a read-only or foreign destination (or a full disk) ended fit, eval output=... and report in
an OSError traceback after the work was done. We run as root, where chmod does not block writes,
so the unwritable place is under /proc; a full disk is a patched `shutil.disk_usage`.
"""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest

from globe.cli.main import main
from globe.testing.models import FIXTURE_DIR

RO = "/proc/globe-test-out"


def _run(capsys, *argv):
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return rc, err


def test_fit_unwritable_output_dir(capsys):
    rc, err = _run(capsys, "fit", f"model.path={FIXTURE_DIR}", f"output_dir={RO}/run", "train.steps=2")
    assert rc == 2 and f"{RO}/run" in err and "cannot be written" in err


def test_fit_file_in_the_way(capsys, tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    for out in (f, f / "sub"):
        rc, err = _run(capsys, "fit", f"model.path={FIXTURE_DIR}", f"output_dir={out}", "train.steps=2")
        assert rc == 2 and str(out) in err and "is a file" in err
    assert f.read_text() == "x"


def test_fit_needs_room_for_its_artifacts(capsys, tmp_path, monkeypatch):
    """The fixture: N = 64 experts of 88 x 128, r = 44 (r_frac 0.5), m = 32 per family, fp32:
    A 64*88*44 + bank 32*44*128 + codes 64*32 = 430,080 floats per family -> 3,440,640 bytes."""
    need = 4 * 2 * (64 * 88 * 44 + 32 * 44 * 128 + 64 * 32)
    real = shutil.disk_usage
    Usage = namedtuple("Usage", "total used free")
    for free, ok in ((int(need * 1.02) - 4096, False), (int(need * 1.02) + 4096, True)):
        monkeypatch.setattr(shutil, "disk_usage", lambda p, free=free: Usage(real(p).total, 0, free))
        out = tmp_path / f"fit-{ok}"
        rc, err = _run(capsys, "fit", f"model.path={FIXTURE_DIR}", f"output_dir={out}", "train.steps=2",
                       "train.baselines=false", "train.eval_every=1", "bank.r_frac=0.5")  # r = 44
        if ok:
            files = list(out.glob("globe-*.safetensors"))
            assert rc == 0 and len(files) == 2
            assert sum(f.stat().st_size for f in files) <= need * 1.01
        else:
            assert rc == 2 and "not enough disk space" in err and str(out) in err and not out.exists()


def test_eval_output_unwritable(capsys, tmp_path):
    text = FIXTURE_DIR / "eval.txt"
    for output, needle in ((f"{RO}.json", "cannot be written"), (str(tmp_path), "is a directory"),
                           (str(tmp_path / "no" / "x.json"), "does not exist")):
        rc, err = _run(capsys, "eval", f"model.path={FIXTURE_DIR}", f"eval.text={text}", "eval.max_tokens=64",
                       f"output={output}")
        assert rc == 2 and needle in err, err


def test_report_unwritable(capsys, tmp_path):
    rc, err = _run(capsys, "report", "/proc/self")
    assert rc == 2 and "/proc/self/report" in err and "cannot be written" in err
    run = tmp_path / "run"
    run.mkdir()
    (run / "report").write_text("not a directory")
    rc, err = _run(capsys, "report", str(run))
    assert rc == 2 and "is a file" in err and (run / "report").read_text() == "not a directory"


@pytest.mark.parametrize("verb", ["fit", "report"])
def test_unwritable_checked_before_work(capsys, verb, monkeypatch):
    """The check comes before any weight or run file is read."""
    import globe.eval.report as report
    import globe.fit.run as fit_run

    def boom(*a, **k):
        pytest.fail("work started before the output check")

    monkeypatch.setattr(fit_run, "Checkpoint", boom)
    monkeypatch.setattr(report, "_build", boom)
    argv = (["fit", f"model.path={FIXTURE_DIR}", f"output_dir={RO}"] if verb == "fit" else ["report", "/proc/self"])
    rc, err = _run(capsys, *argv)
    assert rc == 2 and "cannot be written" in err
