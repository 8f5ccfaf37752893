"""Diagnostics and `globe report` on a small synthetic fit dir: figures match direct computation, every
plot is a valid PNG, sweeps give a Pareto plot, bad input fails cleanly."""

from __future__ import annotations

import json
import re

import pytest
import torch

from globe.artifacts import Artifacts, Family
from globe.errors import GlobeError
from globe.eval.diagnostics import diagnose, effective_rank
from globe.eval.report import render_report
from globe.io.checkpoint import Checkpoint
from globe.testing.models import save_model, tiny_model

PNG = b"\x89PNG\r\n\x1a\n"
E, P, D, M, R = 6, 24, 32, 5, 8
LAYERS = [0, 2]  # the tiny qwen2_moe has mlp_only_layers=[1]


def _family(seed: int, n: int) -> Family:
    g = torch.Generator().manual_seed(seed)
    codes = torch.rand(n, M, generator=g)
    codes[codes < 0.5] = 0  # sparse
    codes[:, 0] += 0.1  # no empty support
    return Family.from_fit(torch.randn(M, R, D, generator=g), codes, torch.randn(n, P, R, generator=g) * 0.1, 0.7,
                           E, activation="silu", meta={"temperature": 0.5})


def make_run(root, model_dir=None):
    """A fit dir whose 'up' family reconstructs the saved model exactly and whose 'gate' does not."""
    n = len(LAYERS) * E
    up, gate = _family(1, n), _family(2, n)
    if model_dir is None:
        model = tiny_model("qwen2_moe")
        with torch.no_grad():
            w_up = up.reconstruct()
            for li, L in enumerate(LAYERS):
                gu = model.model.layers[L].mlp.experts.gate_up_proj  # (E, 2p, d), gate rows first
                gu[:, P:] = w_up[li * E:(li + 1) * E]
        model_dir = save_model(model, root / "model")
    arts = Artifacts(families={"up": up, "gate": gate}, model_type="qwen2_moe", moe_layers=LAYERS, num_experts=E,
                     hidden_size=D, expert_intermediate_size=P, source=str(model_dir),
                     config={"model": {"path": str(model_dir)}, "export": {"dtype": "bf16"}})
    run = root / "run"
    arts.save(run)
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(0, 50, 10):
            for fam in ("up", "gate"):
                f.write(json.dumps({"step": step, "family": fam, "T": 1.0 / (1 + step), "median_support": 3 + step / 25,
                                    "loss": 1.0 / (1 + step), "lr": 0.01}) + "\n")
        f.write('{"step": 60, "fam')  # a torn last line (killed run) is skipped
    fams = {f: {"rel_fro_error": 0.1, "median_support": 3, "stored_params": a.stored_params(),
                "original_params": n * P * D} for f, a in arts.families.items()}
    base = {m: {f: {"rel_fro_error": e, "stored_params": 1000} for f in fams} for m, e in (("svd", 0.3), ("mobe", 0.2))}
    summary = {"families": fams, "baselines": base}
    (run / "summary.json").write_text(json.dumps(summary))
    evals = [{"label": "original", "perplexity": 90.0, "decode_tok_s": 50.0, "hit_rate_by_S": {"2": 0.3, "4": 0.7}},
             {"model_kind": "globe", "perplexity": 95.5, "prefill_tok_s": 1000.0,
              "hit_rate_by_S": {"2": 0.35, "4": 0.72}},
             {"label": "svd", "perplexity": 120.0}]
    (run / "eval_all.json").write_text(json.dumps({"runs": evals}))
    return run, model_dir, arts


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("rep"))


def test_diagnostics_match_direct_computation(run):
    run_dir, model_dir, arts = run
    diag = diagnose(run_dir)
    ck = Checkpoint(model_dir)
    up, gate = diag["families"]["up"], diag["families"]["gate"]
    assert up["rel_fro_error"] < 1e-5 and max(up["per_layer"].values()) < 1e-5  # exact by construction
    W, Wh = ck.load_family("gate", torch.float32), arts.families["gate"].reconstruct()
    want = float(((W - Wh) ** 2).sum() / (W**2).sum()) ** 0.5
    assert gate["rel_fro_error"] == pytest.approx(want, rel=1e-5)
    w_l0 = float(((W[:E] - Wh[:E]) ** 2).sum() / (W[:E] ** 2).sum()) ** 0.5
    assert gate["per_layer"]["0"] == pytest.approx(w_l0, rel=1e-5)
    assert up["effective_rank"]["orig"] == up["effective_rank"]["recon"]
    assert max(up["effective_rank"]["orig"]) <= R  # W_hat = A (p x r) @ tilde_B: rank <= r
    codes = arts.families["gate"].codes
    assert gate["support_hist"] == {str(k): int(((codes != 0).sum(1) == k).sum())
                                    for k in sorted(set((codes != 0).sum(1).tolist()))}
    assert gate["atom_popularity"] == (codes != 0).sum(0).tolist()
    assert 0 <= gate["coherence_mean"] <= gate["coherence_max"] <= 1 + 1e-6
    assert diag["trajectories"]["up"]["T"][-1] == (40.0, 1 / 41)


def test_effective_rank():
    assert effective_rank(torch.tensor([1.0, 0.0, 0.0])) == 1
    assert effective_rank(torch.tensor([1.0, 1.0, 1.0, 1.0])) == 4  # 95% needs all four
    assert effective_rank(torch.tensor([3.0, 1.0, 0.1])) == 2  # 9/10.01 < 0.95 <= 10/10.01


def test_report_renders_valid_pngs(run):
    run_dir, _, _ = run
    md_path = render_report(run_dir)
    md = md_path.read_text()
    pngs = re.findall(r"\]\(([^)]+\.png)\)", md)
    for name in ("error_per_layer.png", "spectra.png", "effective_rank.png", "support_hist.png",
                 "atom_popularity.png", "coherence.png", "trajectories.png", "hit_rate.png", "error_per_expert.png"):
        assert name in pngs
    for name in pngs:
        data = (md_path.parent / name).read_bytes()
        assert data[:8] == PNG and len(data) > 5000, name
    # comparison table: original / globe / svd / mobe with perplexity deltas from the eval JSON
    rows = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| ")}
    assert {"original", "globe", "svd", "mobe"} <= set(rows)
    assert "95.5" in rows["globe"] and "5.5" in rows["globe"] and "30" in rows["svd"]
    assert json.loads((md_path.parent / "diagnostics.json").read_text())["families"]["gate"]["N"] == 2 * E
    render_report(run_dir)  # re-render replaces the old report
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".report")]


def test_sweep_pareto(tmp_path, run):
    _, model_dir, _ = run
    for i, (sp, ppl) in enumerate([(100, 30.0), (200, 20.0), (300, 25.0)]):
        d = tmp_path / "multirun" / f"{i:03d}_bank.m_up={i}"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"families": {"up": {"stored_params": sp, "rel_fro_error": 0.1,
                                                                        "original_params": 1000}}}))
        (d / "eval.json").write_text(json.dumps({"model_kind": "globe", "perplexity": ppl}))
    md = render_report(tmp_path / "multirun").read_text()
    assert "Pareto" in md and "| 000_bank.m_up=0 | 100 |" in md
    data = (tmp_path / "multirun" / "report" / "pareto.png").read_bytes()
    assert data[:8] == PNG and len(data) > 5000


def test_report_bad_input(tmp_path):
    with pytest.raises(GlobeError, match="not found"):
        render_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GlobeError, match="not a fit run dir"):
        render_report(tmp_path / "empty")
    assert not (tmp_path / "empty" / "report").exists()
    assert list((tmp_path / "empty").iterdir()) == []


def test_bytes_column_uses_the_exported_dtype(tmp_path):
    """bytes = stored params x the element size of the export an eval record measured (bf16: 2),
    and x 4 (the fit's own fp32 files) when nothing was exported."""
    from globe.eval.report import comparison_rows, comparison_table, export_dtype

    summary = {"families": {f: {"rel_fro_error": 0.1, "stored_params": 500, "original_params": 1000}
                            for f in ("up", "gate")}}
    exp = tmp_path / "export"
    exp.mkdir()
    (exp / "config.json").write_text(json.dumps({"globe": {"dtype": "bf16"}}))
    evals = [{"model_kind": "globe", "model_path": str(exp), "perplexity": 10.0, "label": "globe"}]
    assert export_dtype(evals) == "bf16" and export_dtype([]) is None
    rows = {r["label"]: r for r in comparison_rows(summary, evals)}
    assert rows["globe"]["stored_params"] == 1000
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "eval_globe.json").write_text(json.dumps(evals[0]))
    md = render_report(run).read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| globe"))
    assert "| 2000 |" in line.replace(",", "") and "bf16, as exported" in md
    (run / "eval_globe.json").unlink()
    md = render_report(run).read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| globe"))
    assert "| 4000 |" in line.replace(",", "") and "fp32, as the fit stores them" in md
    assert comparison_table(list(rows.values()), 2)


def test_eval_of_a_dense_export_is_not_labelled_original(tmp_path):
    from globe.eval.report import eval_records

    (tmp_path / "eval_a.json").write_text(json.dumps({"model_kind": "hf", "perplexity": 10.0}))
    (tmp_path / "eval_b.json").write_text(json.dumps({"model_kind": "dense", "perplexity": 10.5}))
    assert [r["label"] for r in eval_records(tmp_path)] == ["original", "dense export"]
