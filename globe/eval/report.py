"""`globe report RUN_DIR`: Markdown report with PNG plots of a fit run or a sweep.

Why: one command turns a run dir into something to read. What is drawn depends on what is there:
  fit run dir (globe_config.json + globe.safetensors)   diagnostics plots (diagnostics.py)
  eval JSON files with `hit_rate_by_S`                  hit-rate curves
  summary.json + eval JSON files (`perplexity`)         comparison table original / GloBE / SVD / MoBE
  sub-directories with summary.json (a sweep)           Pareto plot of stored params vs perplexity
An eval JSON is any *.json in the dir holding one `globe eval` object, a list of them, or {"runs": [...]};
its row label is its `label` key, else its `model_kind` ("hf" -> original, "dense" -> dense export), else
the file name.
Bytes in the table are stored params x the element size of the dtype actually exported (read from the
config.json of a globe export an eval record measured; fp32 when the run was not exported).
The report lands in RUN_DIR/report/ (report.md, *.png, diagnostics.json), built in a temporary dir
and renamed into place, so a failure never leaves a half-written report.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..errors import GlobeError
from .diagnostics import diagnose, public

SKIP_JSON = {"summary.json", "globe_config.json", "diagnostics.json", "config.json", "training.json",
             "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
ELEM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FAMS = ("up", "gate")


KIND_LABELS = {"hf": "original", "dense": "dense export"}  # eval JSON model_kind -> table row

def _load_json(p: Path, obj: bool = False) -> Any:
    """The JSON in p, or None when unreadable (or, with obj, not an object)."""
    try:
        x = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return x if not obj or isinstance(x, dict) else None


def eval_records(d: Path) -> list[dict[str, Any]]:
    """Every eval object found in d/*.json, each with a 'label'."""
    recs = []
    for p in sorted(d.glob("*.json")):
        if p.name in SKIP_JSON:
            continue
        obj = _load_json(p)
        items = obj.get("runs") if isinstance(obj, dict) and "runs" in obj else obj
        items = items if isinstance(items, list) else [items]
        for it in items:
            if isinstance(it, dict) and ("perplexity" in it or "hit_rate_by_S" in it):
                kind = it.get("model_kind")
                label = it.get("label") or (KIND_LABELS.get(kind, kind) if kind else p.stem)
                recs.append({**it, "label": str(label)})
    return recs


def load_summary(p: Path) -> dict[str, Any]:
    """A fit's summary.json; GlobeError naming the file when it is not an object or its `families` is not
    {family: {figures}} (a hand-edited or damaged file: the report would otherwise fail inside a table)."""
    s = _load_json(p, obj=True)
    if s is None:
        raise GlobeError(f"corrupt {p}: not a JSON object")
    fams = s.get("families")
    if fams is not None and (not isinstance(fams, dict) or not all(isinstance(v, dict) for v in fams.values())):
        raise GlobeError(f"corrupt {p}: 'families' must map each family to an object of figures, got {fams!r:.60}")
    for f, v in (fams or {}).items():
        for k in ("stored_params", "original_params", "rel_fro_error"):
            if k in v and v[k] is not None and (isinstance(v[k], bool) or not isinstance(v[k], (int, float))):
                raise GlobeError(f"corrupt {p}: families.{f}.{k} is {v[k]!r}, expected a number")
    if not isinstance(s.get("baselines") or {}, dict):
        raise GlobeError(f"corrupt {p}: 'baselines' must be an object")
    return s


def _fmt(x: Any, nd: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.{nd}g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return str(x)


def _baselines(summary: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """summary['baselines'] as {method: {family: figures}}, whichever nesting the fit wrote."""
    b = summary.get("baselines") or {}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for k, v in b.items():
        if not isinstance(v, dict):
            continue
        if k in FAMS:  # {family: {method: figures}}
            for meth, fig in v.items():
                if isinstance(fig, dict):
                    out.setdefault(meth, {})[k] = fig
        else:  # {method: {family: figures}}
            out[k] = {f: fig for f, fig in v.items() if f in FAMS and isinstance(fig, dict)}
    return out


def export_dtype(evals: list[dict[str, Any]]) -> str | None:
    """The dtype of the globe export an eval record measured (its config.json), if any."""
    for r in evals:
        if r.get("model_kind") == "globe" and r.get("model_path"):
            conf = _load_json(Path(r["model_path"]) / "config.json") or {}
            dt = (conf.get("globe") or {}).get("dtype")
            if dt in ELEM_BYTES:
                return dt
    return None


def comparison_rows(summary: dict[str, Any] | None, evals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows original / globe / baselines / any other labelled eval, merging fit figures and eval figures."""
    rows: dict[str, dict[str, Any]] = {}
    fams = (summary or {}).get("families") or {}
    if fams:
        orig = sum(int(f.get("original_params", 0)) for f in fams.values())
        rows["original"] = {"stored_params": orig, **{f"err_{f}": 0.0 for f in fams}}
        rows["globe"] = {"stored_params": sum(int(f.get("stored_params", 0)) for f in fams.values()),
                         **{f"err_{f}": fams[f].get("rel_fro_error") for f in fams}}
        for meth, figs in _baselines(summary or {}).items():
            rows[meth] = {"stored_params": sum(int(x.get("stored_params", 0)) for x in figs.values()) or None,
                          **{f"err_{f}": x.get("rel_fro_error") for f, x in figs.items()}}
    for r in evals:
        row = rows.setdefault(r["label"], {})
        for k in ("perplexity", "prefill_tok_s", "decode_tok_s", "stored_params"):
            if r.get(k) is not None:
                row[k] = r[k]
        for f in FAMS:
            if r.get(f"err_{f}") is not None:
                row[f"err_{f}"] = r[f"err_{f}"]
    return [{"label": k, **v} for k, v in rows.items()]


def comparison_table(rows: list[dict[str, Any]], elem_bytes: int = 2) -> str:
    base = next((r.get("perplexity") for r in rows if r["label"] == "original"), None)
    head = ("| method | stored params (up+gate) | bytes | rel. err up | rel. err gate | perplexity | "
            "Δppl vs original | prefill tok/s | decode tok/s |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        sp = r.get("stored_params")
        ppl = r.get("perplexity")
        dppl = ppl - base if ppl is not None and base is not None else None
        lines.append("| " + " | ".join([r["label"], _fmt(sp), _fmt(sp * elem_bytes if sp else None),
                                        _fmt(r.get("err_up")), _fmt(r.get("err_gate")), _fmt(ppl, 6),
                                        _fmt(dppl), _fmt(r.get("prefill_tok_s")), _fmt(r.get("decode_tok_s"))])
                     + " |")
    return "\n".join(lines)


def find_runs(d: Path, depth: int = 3) -> list[Path]:
    """Sub-directories (not d itself) holding a summary.json, up to `depth` levels down."""
    out = []
    for root, dirs, files in os.walk(d):
        rel = Path(root).relative_to(d)
        if len(rel.parts) > depth:
            dirs[:] = []
            continue
        dirs[:] = sorted(x for x in dirs if x != "report")
        if rel.parts and "summary.json" in files:
            out.append(Path(root))
    return out


def sweep_points(runs: list[Path]) -> list[dict[str, Any]]:
    pts = []
    for rd in runs:
        s = load_summary(rd / "summary.json")
        fams = s.get("families") or {}
        if not fams:
            continue
        ev = [r for r in eval_records(rd) if r.get("perplexity") is not None]
        pick = next((r for r in ev if r["label"] == "globe"), ev[0] if ev else None)
        errs = [f.get("rel_fro_error") for f in fams.values() if f.get("rel_fro_error") is not None]
        pts.append({"label": rd.name, "stored_params": sum(int(f.get("stored_params", 0)) for f in fams.values()),
                    "perplexity": pick.get("perplexity") if pick else None,
                    "rel_fro_error": sum(errs) / len(errs) if errs else None})
    return pts


def _diag_section(diag: dict[str, Any], out: Path, md: list[str]) -> None:
    from . import plots

    fams = diag["families"]
    md.append("## Reconstruction\n")
    md.append("| family | N | m | r | rel. Frobenius error | median support | unused atoms | max coherence | "
              "eff. rank orig -> GloBE | stored / original params |")
    md.append("|---|---|---|---|---|---|---|---|---|---|")
    for f, st in fams.items():
        er = st.get("effective_rank") or {}
        eff = f"{er['orig_mean']:.1f} -> {er['recon_mean']:.1f}" if er else "-"
        md.append(f"| {f} | {st['N']} | {st['m']} | {st['r']} | {_fmt(st.get('rel_fro_error'))} | "
                  f"{st['median_support']:g} | {st['unused_atoms']} | {st['coherence_max']:.3f} | {eff} | "
                  f"{st['stored_params'] / st['original_params']:.3f} |")
    md.append("")
    figs = []
    with_err = {f: st for f, st in fams.items() if "per_layer" in st}
    if with_err:
        figs += [("Relative error per MoE layer", plots.error_per_layer(with_err, out / "error_per_layer.png")),
                 ("Relative error per expert", plots.error_per_expert(with_err, out / "error_per_expert.png")),
                 ("Singular spectra, original (solid) vs GloBE (dashed)", plots.spectra(with_err, out / "spectra.png")),
                 ("Effective rank (95% energy)", plots.effective_rank(with_err, out / "effective_rank.png"))]
    figs += [("Support sizes", plots.support_hist(fams, out / "support_hist.png")),
             ("Atom popularity", plots.atom_popularity(fams, out / "atom_popularity.png")),
             ("Pairwise atom coherence", plots.coherence(fams, out / "coherence.png"))]
    traj = diag.get("trajectories") or {}
    names = {k for series in traj.values() for k in series}
    keys = []
    for group in (("temperature", "temp", "T"), ("support_median", "median_support", "support"),
                  ("rel_error", "rel_fro_error", "err"), ("loss",)):  # one plot per group, first match wins
        hit = next((k for g in group for k in sorted(names) if k == g or (len(g) > 1 and g in k.lower())), None)
        if hit and hit not in keys:
            keys.append(hit)
    if keys:
        figs.append(("Training trajectories", plots.trajectories(traj, keys, out / "trajectories.png")))
    for title, p in figs:
        md.append(f"### {title}\n\n![{title}]({p.name})\n")
    for n in diag.get("notes", []):
        md.append(f"> note: {n}\n")


def _build(run: Path, out: Path, checkpoint: str | None) -> None:
    from . import plots

    md = [f"# GloBE report: `{run.name}`\n"]
    is_run = (run / "globe_config.json").is_file()
    summary = None
    if (run / "summary.json").is_file():
        summary = load_summary(run / "summary.json")
    evals = eval_records(run)
    dt = export_dtype(evals)  # the dtype actually exported; without an export, the fit's own fp32 files
    elem, dt_note = (ELEM_BYTES[dt], f"{dt}, as exported") if dt else (4, "fp32, as the fit stores them")
    if is_run:
        diag = diagnose(run, checkpoint)
        md.append(f"Model type `{diag['model_type']}`, MoE layers {diag['moe_layers']}, "
                  f"{diag['num_experts']} experts per layer.\n")
        _diag_section(diag, out, md)
        (out / "diagnostics.json").write_text(json.dumps(public(diag), indent=2, default=str) + "\n")
    rows = comparison_rows(summary, evals)
    if rows:
        md.append("## Comparison\n")
        md.append(comparison_table(rows, elem))
        md.append(f"\nbytes = stored params x {elem} ({dt_note}); errors are relative Frobenius errors "
                  "of the routed up/gate experts; Δppl is against the original model's perplexity.\n")
    curves = {r["label"]: r["hit_rate_by_S"] for r in evals if isinstance(r.get("hit_rate_by_S"), dict)}
    if curves:
        p = plots.hit_rate(curves, out / "hit_rate.png")
        md.append(f"## LRU cache hit rate\n\n![hit rate vs S]({p.name})\n")
    runs = find_runs(run)
    if runs:
        pts = sweep_points(runs)
        y = "perplexity" if pts and all(p["perplexity"] is not None for p in pts) else "rel_fro_error"
        pts = [p for p in pts if p[y] is not None]
        if pts:
            p = plots.pareto(pts, y, out / "pareto.png")
            md.append(f"## Sweep ({len(pts)} runs)\n\n![Pareto: stored params vs {y}]({p.name})\n")
            md.append("| run | stored params | rel. err (mean up/gate) | perplexity |\n|---|---|---|---|")
            for q in sorted(pts, key=lambda q: q["stored_params"]):
                md.append(f"| {q['label']} | {_fmt(q['stored_params'])} | {_fmt(q['rel_fro_error'])} | "
                          f"{_fmt(q['perplexity'])} |")
            md.append("")
    if not (is_run or rows or curves or runs):
        raise GlobeError(f"{run}: not a fit run dir (no globe_config.json), no eval JSON and no sweep runs")
    (out / "report.md").write_text("\n".join(md) + "\n")


def render_report(run_dir: str | Path, out_dir: str | Path | None = None, checkpoint: str | None = None) -> Path:
    """Render RUN_DIR's report into out_dir (default RUN_DIR/report); returns the path of report.md."""
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise GlobeError(f"run directory not found: {run}")
    out = Path(out_dir).expanduser() if out_dir else run / "report"
    from ..io.outputs import check_writable

    check_writable(out, what="report directory")  # a file in the way, read-only: before any work
    check_writable(out.parent, what="report directory")  # the temporary dir is made beside it
    from ..io.outputs import staging_dir

    with staging_dir(out, replace=True) as tmp:
        _build(run, tmp, checkpoint)
    return out / "report.md"
