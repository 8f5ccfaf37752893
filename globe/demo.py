"""`globe demo`: the README's first command, on the bundled fixture, in a few minutes on 2 CPU cores.

Why: one command shows the whole pipeline on a real trained MoE (the fixture: Qwen2-MoE, d=128, p=88,
16 experts x 4 MoE layers): inspect -> fit a short schedule -> export a GloBE directory -> evaluate
original vs compressed (perplexity on the fixture's eval.txt, prefill/decode speed, peak memory) ->
print and save the comparison table and render the fit report. The evaluation runs with one torch
thread: on this small model more threads add little, and on a busy CPU they make timings erratic.

Layout of out_dir (default: a fresh temporary directory):
    fit/       globe.safetensors, globe_config.json, metrics.jsonl, summary.json,
               eval_original.json, eval_globe.json, report/ (report.md + PNGs)
    export/    the compressed model (loadable with globe.load_model)
    demo.json  everything returned;  demo.md  the comparison table
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from .artifacts import atomic_write
from .config import ExportCfg, GlobeConfig


def _fit_cfg(fixture: Path, out: Path, fast: bool) -> GlobeConfig:
    return GlobeConfig.from_dict({
        "model": {"path": str(fixture)},
        "bank": {"m_up": 16, "m_gate": 16, "r_frac": 0.5},
        "sparsity": {"target_support": 8},
        "train": {"steps": 60 if fast else 1500, "batch_size": 16 if fast else 64, "lr": 0.03,
                  "eval_every": 20 if fast else 100, "checkpoint_every": 10_000, "log_every": 10, "device": "cpu",
                  "baseline_mobe": True},  # the demo's table compares with both baselines (cheap at this size)
        "output_dir": str(out / "fit"),
    })


def _eval_cfg(path: Path, text: Path, fast: bool, output: Path) -> GlobeConfig:
    return GlobeConfig.from_dict({
        "model": {"path": str(path)},
        "eval": {"text": str(text), "context": 256, "max_tokens": 2048 if fast else 8192, "speed": True,
                 "prefill_tokens": 128 if fast else 192, "decode_tokens": 16 if fast else 32,
                 "device": "cpu", "dtype": "fp32", "threads": 1},
        "cache": {"mode": "full"},
        "output": str(output),
    })


def table(summary: dict[str, Any], ev_orig: dict[str, Any], ev_globe: dict[str, Any]) -> str:
    """Plain-text comparison: original vs GloBE (+ baseline errors at matched budget from the fit)."""
    from .eval.report import ELEM_BYTES, comparison_rows, comparison_table, export_dtype

    evals = [{**ev_orig, "label": "original"}, {**ev_globe, "label": "globe"}]
    dt = export_dtype(evals)
    return comparison_table(comparison_rows(summary, evals), ELEM_BYTES[dt] if dt else 4)


def run_demo(out_dir: str | None = None, fast: bool = False) -> dict[str, Any]:
    """Inspect, fit, export and evaluate the bundled fixture; print and save the comparison table."""
    from .eval.report import render_report
    from .eval.run import run_eval
    from .fit.run import run_fit
    from .fixtures import fixture_path
    from .io.inspect import format_table, inspect
    from .runtime.export import export

    t0 = time.perf_counter()
    fixture = fixture_path()
    out = Path(out_dir).expanduser() if out_dir else Path(tempfile.mkdtemp(prefix="globe-demo-"))
    if out_dir and out.exists() and (not out.is_dir() or any(out.iterdir())):
        from .errors import GlobeError

        raise GlobeError(f"demo --out {out}: exists and is not an empty directory; choose a new one")
    if out_dir:
        from .io.outputs import check_writable

        check_writable(out, what="demo --out")  # a path under a regular file or a read-only directory
    out.mkdir(parents=True, exist_ok=True)
    say = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731

    say(f"1/4 inspect {fixture}")
    info = inspect(str(fixture))
    print(format_table(info))

    cfg = _fit_cfg(fixture, out, fast)
    say(f"2/4 fit up+gate banks ({cfg.train.steps} steps) -> {cfg.output_dir}")
    summary = run_fit(cfg)
    for f, st in summary["families"].items():
        print(f"  {f}: rel. error {st['rel_fro_error']:.4f}, median support {st['median_support']}, "
              f"stored {st['stored_params']:,} / {st['original_params']:,} params")

    say("3/4 export the compressed model")
    exported = export(fixture, cfg.output_dir, out / "export", ExportCfg(format="globe", dtype="fp32"))

    say("4/4 evaluate original vs compressed (perplexity on eval.txt, speed, memory)")
    fit_dir = Path(cfg.output_dir)
    text = fixture / "eval.txt"
    ev_o = run_eval(_eval_cfg(fixture, text, fast, fit_dir / "eval_original.json"))
    ev_g = run_eval(_eval_cfg(Path(str(exported or out / "export")), text, fast, fit_dir / "eval_globe.json"))
    for p, lab in ((fit_dir / "eval_original.json", "original"), (fit_dir / "eval_globe.json", "globe")):
        rec = {**json.loads(p.read_text()), "label": lab}
        atomic_write(p, lambda q, rec=rec: Path(q).write_text(json.dumps(rec, indent=2) + "\n"))
    tab = table(summary, ev_o, ev_g)
    report = render_report(fit_dir)
    print()
    print(tab)
    secs = time.perf_counter() - t0
    result = {"out_dir": str(out), "inspect": info, "summary": summary, "eval": {"original": ev_o, "globe": ev_g},
              "table": tab, "report": str(report), "seconds": secs}
    atomic_write(out / "demo.json", lambda q: Path(q).write_text(json.dumps(result, indent=2, default=str) + "\n"))
    atomic_write(out / "demo.md", lambda q: Path(q).write_text(
        f"# globe demo\n\nFixture `{fixture.name}`, {secs:.0f} s on CPU.\n\n{tab}\n"))
    say(f"done: table in {out / 'demo.md'}, report in {report}")
    return result
