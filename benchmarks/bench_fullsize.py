"""Full-size run of every phase on a Qwen1.5-MoE-A2.7B-shaped checkpoint: time, peak memory, bytes, silence.

Why: the prototype (14.3B parameters, 28.6 GB in bf16) must go through inspect, fit, export and
load + evaluate on a 24 GB machine. Each phase runs as its own `globe` process; the driver reaps it
with os.wait4 (that process's own peak RSS, not the driver's), counts the bytes it wrote, and
timestamps every line it prints to find its longest silence (target: <= 30 s; GLOBE_PROGRESS_EVERY_S
sets the log period). Results go to benchmarks/results/fullsize_cpu.json (or --json).

    python benchmarks/make_fullsize_checkpoint.py --out /work/big/qwen15-fullsize
    python benchmarks/bench_fullsize.py --ckpt /work/big/qwen15-fullsize --work /work/big/bench \
        --phases inspect,fit,fit_up,warm_start,export_globe,export_dense,eval_lru8,eval_lru16,eval_lru32,\
eval_none,eval_full

The fit runs the README's recipe (m = 128, r = 704, target support 12, batch 16) for --fit-steps steps
(default 4) with the SVD baseline only: warm start and full evaluations are timed whole, the
optimisation steps are timed and extrapolated to 1000 steps (labelled `extrapolated`). --random-artifacts
writes artifacts of the same shapes without fitting (to measure export/load alone). `fit_up` runs the
same fit for the up family alone, end to end, and deletes its output (one family's phases, faster).
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from usage import Parser, die

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TEXT = ROOT / "globe" / "fixture" / "qwen2moe-tiny" / "eval.txt"


def run_phase(name: str, cmd: list[str], env: dict, out_dir: Path | None, stop_at: str | None = None) -> dict:
    """Run cmd, stream its output with timestamps, reap it with wait4; wall, peak RSS, silence, bytes.
    stop_at: send SIGTERM once a line contains this text (the CLI then exits 143, cleaning up)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    last, silence, lines = t0, 0.0, []
    buf = b""
    while True:
        if not sel.select(timeout=5):
            silence = max(silence, time.monotonic() - last)
            if proc.poll() is not None:
                break
            continue
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        now = time.monotonic()
        buf += chunk
        *done, buf = buf.split(b"\n")
        for ln in done:
            silence = max(silence, now - last)
            last = now
            text = ln.decode(errors="replace").split("\r")[-1]
            lines.append(f"[{now - t0:8.1f}s] {text}")
            print(f"  {name} | {text}", flush=True)
            if stop_at and stop_at in text and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    silence = max(silence, time.monotonic() - last)
    written = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file()) if out_dir and out_dir.exists() else 0
    return {"phase": name, "cmd": " ".join(cmd), "rc": os.waitstatus_to_exitcode(status), "wall_s": round(wall, 1),
            "peak_rss_bytes": ru.ru_maxrss * 1024, "bytes_written": written, "max_silence_s": round(silence, 1),
            "log_tail": lines[-12:], "phase_lines": [ln for ln in lines if ": done" in ln]}


def random_artifacts_fullsize(ck_path: str, out: Path, m: int, r: int, support: int, seed: int = 0) -> None:
    """Artifacts of the fit's shapes with random values, one layer's A at a time (no fit)."""
    from globe.artifacts import Artifacts, Family
    from globe.io.checkpoint import Checkpoint

    ck = Checkpoint(ck_path)
    E, p, d, Lc = ck.num_experts, ck.p, ck.hidden_size, len(ck.moe_layers)
    N = Lc * E
    g = torch.Generator().manual_seed(seed)
    fams = {}
    for f in ("up", "gate"):
        codes = torch.zeros(N, m)
        for i in range(N):
            idx = torch.randperm(m, generator=g)[:support]
            codes[i, idx] = torch.rand(support, generator=g) + 0.1
        bank = torch.randn(1, m, r, d, generator=g)

        def load_A(li, f=f):
            gl = torch.Generator().manual_seed(seed * 1000 + li * 2 + (f == "gate"))
            return torch.randn(E, p, r, generator=gl) * (0.02 / r**0.5)
        fams[f] = Family(bank=bank, codes=codes, gain=torch.tensor([0.8]), layer_bank=[0] * Lc, num_experts=E,
                         activation="silu", meta={"map": "random"}, load_A=load_A, p=p)
    Artifacts(families=fams, model_type=ck.model_type, moe_layers=list(ck.moe_layers), num_experts=E,
              hidden_size=d, expert_intermediate_size=p, source=str(ck.dir)).save(out)


def verify_dense(ck_path: str, fit: Path, out: Path, samples: int = 3, seed: int = 0) -> dict:
    """Check a dense export against its sources without loading it: the same tensor names and shapes as the
    source, bf16, shards <= 5 GB; sampled untouched tensors equal to the source's; sampled fitted experts
    equal to Family.reconstruct (bf16 tolerance)."""
    from safetensors import safe_open

    from globe.artifacts import Artifacts
    from globe.io.checkpoint import Checkpoint

    ck, arts = Checkpoint(ck_path), Artifacts.load([fit])
    index = out / "model.safetensors.index.json"
    if index.exists():
        wmap = json.loads(index.read_text())["weight_map"]
    else:  # one shard
        with safe_open(str(out / "model.safetensors"), "pt") as fh:
            wmap = {k: "model.safetensors" for k in fh.keys()}
    src = set(ck.keys())
    res = {"missing": sorted(src - set(wmap))[:5], "extra": sorted(set(wmap) - src)[:5],
           "max_shard_bytes": max(f.stat().st_size for f in out.glob("*.safetensors"))}

    def read(name):
        with safe_open(str(out / wmap[name]), "pt") as fh:
            return fh.get_tensor(name)

    g = torch.Generator().manual_seed(seed)
    fitted = {ck.expert_name(L, e, f): (f, arts.layer_slice(L).start + e)
              for L in ck.moe_layers for e in range(ck.num_experts) for f in arts.families}
    other = sorted(k for k in src if k not in fitted)
    bad = []
    for shard in sorted(set(wmap.values())):  # every tensor's shape and dtype, from the headers alone
        with safe_open(str(out / shard), "pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                if k in src and (tuple(sl.get_shape()) != tuple(ck.shape(k)) or sl.get_dtype() != "BF16"):
                    bad.append(k)
    for k in [other[int(i)] for i in torch.randint(len(other), (samples,), generator=g)]:
        t = read(k)
        bad += [] if t.dtype == torch.bfloat16 and torch.equal(t, ck.tensor(k).to(torch.bfloat16)) else [k]
    names = sorted(fitted)
    for k in [names[int(i)] for i in torch.randint(len(names), (samples,), generator=g)]:
        f, i = fitted[k]
        want = arts.families[f].reconstruct(torch.tensor([i]))[0].to(torch.bfloat16)
        t = read(k)
        ok = t.shape == want.shape and torch.allclose(t.float(), want.float(), rtol=1.6e-2, atol=1e-5)
        bad += [] if ok else [k]
    res.update(shapes_checked=len(wmap), values_checked=2 * samples, mismatched=bad,
               ok=not (bad or res["missing"] or res["extra"]))
    return res


def main() -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--work", required=True, help="scratch directory for runs and exports (tens of GB)")
    ap.add_argument("--phases", default="inspect,fit,export_globe,export_dense,eval_lru16,eval_none")
    ap.add_argument("--fit-steps", type=int, default=4)
    ap.add_argument("--random-artifacts", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=2048, help="perplexity tokens per eval phase (context 256)")
    ap.add_argument("--keep", action="store_true", help="keep exports (default: the dense export is deleted)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "fullsize_cpu.json"))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "GLOBE_PROGRESS_EVERY_S": "20", "PYTHONUNBUFFERED": "1"}
    globe = [sys.executable, "-m", "globe.cli.main"]
    run, gexp, dexp = work / "fit", work / "export-globe", work / "export-dense"
    res_path = Path(a.json)
    results = json.loads(res_path.read_text()) if res_path.exists() else {"phases": {}}
    results.update(machine={"cpus": os.cpu_count(), "torch_threads": a.threads, "torch": torch.__version__},
                   checkpoint=a.ckpt)
    for ph in a.phases.split(","):
        print(f"== {ph}", flush=True)
        if ph == "inspect":
            r = run_phase(ph, [*globe, "inspect", a.ckpt, "--json"], env, None)
        elif ph == "fit":
            if a.random_artifacts:
                t0 = time.time()
                random_artifacts_fullsize(a.ckpt, run, 128, 704, 12)
                r = {"phase": ph, "random_artifacts": True, "wall_s": time.time() - t0}
            else:
                s = a.fit_steps
                r = run_phase(ph, [*globe, "fit", f"model.path={a.ckpt}", f"output_dir={run}", "bank.m_up=128",
                                   "bank.m_gate=128", "bank.r_frac=0.5", "sparsity.target_support=12",
                                   f"train.steps={s}", "train.batch_size=16", f"train.eval_every={s}",
                                   f"train.checkpoint_every={s}", "train.log_every=1"], env, run)
                summ = run / "summary.json"
                if summ.exists():
                    r["summary"] = json.loads(summ.read_text())
        elif ph == "fit_up":  # one family end to end (read, warm start, steps, evaluation, prune-and-refit, save)
            fu = work / "fit-up"
            shutil.rmtree(fu, ignore_errors=True)
            s = a.fit_steps
            r = run_phase(ph, [*globe, "fit", f"model.path={a.ckpt}", f"output_dir={fu}", "bank.m_up=128",
                               "bank.r_frac=0.5", "sparsity.target_support=12", "train.families=[up]",
                               f"train.steps={s}", "train.batch_size=16", f"train.eval_every={s}",
                               f"train.checkpoint_every={s}", "train.log_every=1"], env, fu)
            shutil.rmtree(fu, ignore_errors=True)
        elif ph == "warm_start":  # the up family's read + warm start alone, stopped (SIGTERM) once it is done
            ws = work / "warm-start"
            shutil.rmtree(ws, ignore_errors=True)
            r = run_phase(ph, [*globe, "fit", f"model.path={a.ckpt}", f"output_dir={ws}", "bank.m_up=128",
                               "bank.r_frac=0.5", "sparsity.target_support=12", "train.families=[up]",
                               "train.steps=4", "train.batch_size=16"], env, None,
                          stop_at="warm start up: spectra and proxies: done")
            r["terminated_cleanly"] = r["rc"] == 143 and not list(work.glob(".warm-start.tmp-*"))
            shutil.rmtree(ws, ignore_errors=True)
        elif ph in ("export_globe", "export_dense"):
            out = gexp if ph == "export_globe" else dexp
            shutil.rmtree(out, ignore_errors=True)
            r = run_phase(ph, [*globe, "export", f"model.path={a.ckpt}", f"artifacts={run}", f"output_dir={out}",
                               f"export.format={ph.split('_')[1]}", "export.dtype=bf16"], env, out)
            if ph == "export_dense" and r["rc"] == 0:
                r["verify"] = verify_dense(a.ckpt, run, out)
            if ph == "export_dense" and not a.keep:
                shutil.rmtree(out, ignore_errors=True)
        elif ph.startswith("eval_"):
            mode = ph.removeprefix("eval_")
            cache = ["cache.mode=full"] if mode == "full" else ["cache.mode=none"] if mode == "none" else \
                ["cache.mode=lru", f"cache.S_per_layer={int(mode.removeprefix('lru'))}", "cache.warmup_tokens=256"]
            out_json = work / f"{ph}.json"
            r = run_phase(ph, [*globe, "eval", f"model.path={gexp}", f"eval.text={TEXT}",
                               f"eval.max_tokens={a.eval_tokens}", "eval.context=256", "eval.speed=true",
                               "eval.prefill_tokens=256", "eval.decode_tokens=16", "eval.dtype=bf16",
                               f"eval.threads={a.threads}", f"output={out_json}", *cache], env, None)
            if out_json.exists():
                r["eval"] = json.loads(out_json.read_text())
        else:
            die(f"unknown phase {ph}")
        results["phases"][ph] = r
        res_path.parent.mkdir(parents=True, exist_ok=True)
        res_path.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps({k: v for k, v in r.items() if k not in ("log_tail", "summary", "eval")}), flush=True)


if __name__ == "__main__":
    main()
