"""`globe demo` end to end on the bundled fixture (slow: a short fit, an export, two evaluations)."""

from __future__ import annotations

import json
import math

import pytest

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    from globe.testing.models import fixture_path

    try:
        fixture_path()
    except FileNotFoundError:
        pytest.skip("bundled fixture not built yet")
    from globe.demo import run_demo

    res = run_demo(str(tmp_path / "demo"), fast=True)
    out = tmp_path / "demo"
    printed = capsys.readouterr().out
    assert "| original |" in printed and "| globe |" in printed
    ev_o, ev_g = res["eval"]["original"], res["eval"]["globe"]
    assert ev_o["model_kind"] == "hf" and ev_g["model_kind"] == "globe"
    assert ev_o["tokens"] == ev_g["tokens"] > 100
    for ev in (ev_o, ev_g):
        assert math.isfinite(ev["perplexity"]) and ev["perplexity"] > 1
        assert ev["prefill_tok_s"] > 0 and ev["decode_tok_s"] > 0 and ev["peak_mem_bytes"] > 0
    fams = res["summary"]["families"]
    assert all(f["stored_params"] < f["original_params"] for f in fams.values())
    # a trained fixture compressed to about half its routed up/gate params: a worse but sane model
    assert ev_o["perplexity"] <= ev_g["perplexity"] < 3 * ev_o["perplexity"]
    saved = json.loads((out / "demo.json").read_text())
    assert saved["table"] == res["table"] and "| globe |" in (out / "demo.md").read_text()
    report = out / "fit" / "report"
    assert (report / "report.md").is_file()
    pngs = list(report.glob("*.png"))
    assert len(pngs) >= 6 and all(p.read_bytes()[:8] == PNG for p in pngs)
