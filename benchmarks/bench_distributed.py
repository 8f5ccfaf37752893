"""Sharded fit (globe/fit/dist.py): 1 vs R ranks, time per step and peak memory per rank.

A Qwen2-MoE checkpoint with random bf16 weights (`make_fullsize_checkpoint.write_checkpoint`, no model
is instantiated) of --layers MoE layers x --experts experts of p x d is fitted (family up, fixed steps,
one evaluation at the end, no baselines) by:
  plain   one process, no process group (the ordinary `globe fit`), with the threads of one rank and
          with those of all ranks (the same cores as R ranks)
  R ranks torchrun --standalone --nproc_per_node=R running this script's worker, which calls
          globe.fit.run.run_fit: the path of `torchrun -m globe fit` (gloo on CPU, NCCL on cuda)
Each rank records its resident memory after imports (its base) and at its peak (ru_maxrss; on cuda also
torch.cuda.max_memory_allocated); time per step is the median of rank 0's `step_time` (metrics.jsonl:
the whole step, collectives and waiting for the slowest rank included). The expert bytes each rank
holds and `dist.rank_memory` (the formula of docs/fit.md) are written beside the measurement.

    python benchmarks/bench_distributed.py                            # CPU: plain, 1 and 2 ranks (gloo)
    python benchmarks/bench_distributed.py --device cuda --ranks 1    # one GPU, NCCL (< 2 min on an H200)
Writes benchmarks/results/distributed_cpu.json (or distributed_gpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from usage import Parser, cpu_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {  # cpu: experts dominate memory (2 x 268 MB fp32 per family); cuda: the real Qwen1.5-MoE expert shape
    "cpu": {"layers": 8, "experts": 32, "p": 512, "d": 1024, "m": 32, "r": 128, "batch": 8, "chunk": 8,
            "steps": 20, "threads": 1},
    "cuda": {"layers": 2, "experts": 16, "p": 1408, "d": 2048, "m": 64, "r": 704, "batch": 32, "chunk": 32,
             "steps": 30, "threads": 8},
}


def rss_now() -> int:
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1]) * 1024
    return 0


def worker(spec: dict) -> None:
    """One rank (or the plain process): run_fit, then write this rank's memory record."""
    import torch
    torch.set_num_threads(spec["threads"])
    from globe.config import GlobeConfig
    from globe.fit.run import run_fit
    if spec.get("reverse"):  # the same minibatches, experts in reverse order: only the order of sums changes
        from globe.fit import loop
        orig = loop.batch_indices
        loop.batch_indices = lambda *x: orig(*x).flip(0)
    base = rss_now()
    rank = int(os.environ.get("RANK", "0"))
    summ = run_fit(GlobeConfig.from_dict(spec["cfg"]), progress=False)
    rec = {"rank": rank, "base_rss_bytes": base, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
           * 1024}
    if spec["cfg"]["train"]["device"] == "cuda":
        rec["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    Path(spec["records"], f"rank{rank}.json").write_text(json.dumps(rec))
    if rank == 0:
        Path(spec["records"], "summary.json").write_text(json.dumps(summ))


def make_model(dst: Path, a) -> dict:
    from benchmarks.make_fullsize_checkpoint import write_checkpoint
    conf = json.loads((ROOT / "globe" / "fixture" / "qwen2moe-tiny" / "config.json").read_text())
    conf.update(hidden_size=a.d, moe_intermediate_size=a.p, num_experts=a.experts, num_hidden_layers=a.layers,
                num_experts_per_tok=4, intermediate_size=a.p, shared_expert_intermediate_size=a.p,
                num_attention_heads=8, num_key_value_heads=8, vocab_size=4096, decoder_sparse_step=1,
                mlp_only_layers=[], layer_types=["full_attention"] * a.layers)
    return write_checkpoint(dst, conf, seed=0)


def launch(kind: str, ranks: int, cfg: dict, threads: int, rec: Path, reverse: bool = False) -> float:
    """Run the worker as one plain process or under torchrun with `ranks` processes; returns the wall time."""
    rec.mkdir(parents=True)
    spec = json.dumps({"cfg": cfg, "threads": threads, "records": str(rec), "reverse": reverse})
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    me = [str(Path(__file__).resolve()), "--worker", spec]
    cmd = [sys.executable, *me] if kind == "plain" else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *me]
    t = time.time()  # a session of its own, as torchrun gives each rank (start_new_session): with the kernel's
    # autogroup scheduling a session shares one CPU slice, so a plain worker left in ours would compete with
    # every other process of this session while torchrun's ranks get a full slice each (plain measured 3-4x slower)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, start_new_session=True)
    if p.returncode != 0:
        raise SystemExit(f"{kind} {ranks} ranks failed:\n{p.stderr[-4000:]}")
    return time.time() - t


def run_one(kind: str, ranks: int, a, model: Path, work: Path, threads: int) -> dict:
    out, rec = work / f"out_{kind}_{ranks}_{threads}", work / f"rec_{kind}_{ranks}_{threads}"
    cfg = {"model": {"path": str(model)}, "output_dir": str(out),
           "bank": {"m_up": a.m, "r": a.r}, "sparsity": {"target_support": 4},
           "train": {"steps": a.steps, "batch_size": a.batch, "families": ["up"], "device": a.device,
                     "eval_every": a.steps, "checkpoint_every": a.steps, "eval_chunk": a.chunk, "log_every": 1,
                     "baselines": False, "distributed": kind != "plain"}}
    wall = launch(kind, ranks, cfg, threads, rec)
    recs = sorted((json.loads(f.read_text()) for f in rec.glob("rank*.json")), key=lambda x: x["rank"])
    summ = json.loads((rec / "summary.json").read_text())
    steps = [json.loads(x)["step_time"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    warm = sorted(steps[2:])
    res = {"ranks": ranks, "mode": kind, "threads_per_rank": threads, "wall_s": wall, "fit_time_s": summ["fit_time_s"],
           "step_s_median": warm[len(warm) // 2], "step_s_all": steps,
           "rel_fro_error": summ["families"]["up"]["rel_fro_error"], "per_rank": recs}
    if "distributed" in summ:
        res["layers_per_rank"] = summ["distributed"]["layers_per_rank"]
    shutil.rmtree(out, ignore_errors=True)
    return res


EXAMPLES = {  # dist.rank_memory at real shapes (formula only, not measured): name -> (L, E, p, d, m, r, world sizes)
    "Qwen1.5-MoE-A2.7B, m=128, r=704": (24, 60, 1408, 2048, 128, 704, [1, 2, 4, 8]),
    "DeepSeek-V3, m=128, r=1024": (58, 256, 2048, 7168, 128, 1024, [8, 16, 29, 58]),
}


def formula_examples(max_gb: float = 16.0, batch: int = 16) -> list[dict]:
    """Per-rank memory of the largest rank (ceil(L / R) layers) by `dist.rank_memory`, on cuda."""
    from globe.fit.dist import rank_memory
    rows = []
    for name, (L, E, p, d, m, r, worlds) in EXAMPLES.items():
        for R in worlds:
            n_k = -(-L // R) * E
            eb = 4 if n_k * p * d * 4 / 1e9 <= max_gb else 2  # run._experts: fp32 if the shard fits max_memory_gb
            mem = rank_memory(L * E, n_k, p, d, m, r, batch=-(-batch // R), device="cuda", expert_bytes=eb)
            rows.append({"model": name, "ranks": R, "expert_bytes": eb, "host_GB": round(mem["host_bytes"] / 1e9, 2),
                         "gpu_GB": round(mem["device_bytes"] / 1e9, 2), "experts_GB": round(mem["experts"] / 1e9, 2),
                         "bank_GB": round(mem["bank"] / 1e9, 2)})
    return rows


FIXTURE_CFG = {  # the config of tests/test_fit_distributed.py
    "bank": {"m_up": 8, "m_gate": 8, "r": 24}, "sparsity": {"target_support": 4, "support0": 4},
    "train": {"steps": 12, "batch_size": 16, "lr": 0.01, "lr_codes": 0.01, "refit_every": 2, "eval_every": 4,
              "checkpoint_every": 2, "log_every": 1, "baseline_mobe": True, "baseline_steps": 5, "device": "cpu"}}


def fixture_equality(work: Path) -> dict:
    """The fixture fitted by one process, by one process with every minibatch reversed (only the order of
    sums changes) and by 2 gloo ranks: max |difference| / max |value| per artifact tensor."""
    import torch
    from safetensors.torch import load_file

    from globe.artifacts import dense_codes

    def tensors(out: Path) -> dict:
        idx = json.loads((out / "globe.safetensors.index.json").read_text())["weight_map"]
        t = {}
        for f in sorted(set(idx.values())):
            t.update(load_file(str(out / f)))
        for f in {k.split(".")[1] for k in t}:
            t[f"globe.{f}.codes"] = dense_codes(t.pop(f"globe.{f}.indptr"), t.pop(f"globe.{f}.indices"),
                                                t.pop(f"globe.{f}.values"), t[f"globe.{f}.bank"].shape[1])
        return t

    dirs = {}
    for name, kind, ranks, rev in (("one", "plain", 1, False), ("reversed", "plain", 1, True),
                                   ("two", "dist", 2, False)):
        dirs[name] = work / f"fx_{name}"
        cfg = {"model": {"path": str(ROOT / "globe" / "fixture" / "qwen2moe-tiny")}, "output_dir": str(dirs[name]),
               **json.loads(json.dumps(FIXTURE_CFG))}
        cfg["train"]["distributed"] = kind != "plain"
        launch(kind, ranks, cfg, 1, work / f"fxrec_{name}", reverse=rev)
    one = tensors(dirs["one"])
    res = {"config": FIXTURE_CFG}
    for name in ("reversed", "two"):
        other = tensors(dirs[name])
        per = {k: float((one[k] - other[k]).abs().max() / one[k].abs().max().clamp_min(1e-30)) for k in sorted(one)}
        res[f"{name}_vs_one"] = {"max": max(per.values()), "per_tensor": per,
                                 "bitwise_equal_tensors": sum(torch.equal(one[k], other[k]) for k in one)}
    return res


def main() -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--ranks", type=int, nargs="+", default=None, help="world sizes (default: cpu 1 2, cuda 1)")
    ap.add_argument("--no-plain", action="store_true", help="skip the one-process run without a process group")
    ap.add_argument("--rounds", type=int, default=None, help="repetitions, interleaved (default: cpu 2, cuda 1)")
    for k, v in PRESETS["cpu"].items():
        ap.add_argument(f"--{k}", type=int, default=None, help=f"default: cpu {v}, cuda {PRESETS['cuda'][k]}")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.worker:
        return worker(json.loads(a.worker))
    for k, v in PRESETS[a.device].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.ranks = a.ranks or ([1] if a.device == "cuda" else [1, 2])
    a.rounds = a.rounds or (1 if a.device == "cuda" else 2)
    import torch

    from globe.fit.dist import Dist, rank_memory
    from globe.fit.loop import batch_indices
    load0 = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="globe-bench-dist-"))
    try:
        made = make_model(work / "model", a)
        runs = []
        for rnd in range(a.rounds):  # interleaved: plain, 1 rank, 2 ranks, plain, ... (load drifts)
            plain = [] if a.no_plain else [("plain", 1, t) for t in sorted({a.threads, a.threads * max(a.ranks)})]
            for kind, R, t in plain + [("dist", R, a.threads) for R in a.ranks]:
                runs.append({"round": rnd, **run_one(kind, R, a, work / "model", work / f"r{rnd}", t)})
        equal = fixture_equality(work) if a.device == "cpu" else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    N = a.layers * a.experts
    for res in runs:
        R = res["ranks"]
        bounds = [k * a.layers // R for k in range(R + 1)]
        for k, rec in enumerate(res["per_rank"]):
            n_layers = bounds[k + 1] - bounds[k] if res["mode"] == "dist" else a.layers
            rec["expert_bytes_held"] = n_layers * a.experts * a.p * a.d * 4
            share = Dist(k, R, True, a.layers, a.experts)  # this rank's experts of each minibatch: the largest
            rec["max_batch_share"] = max(len(share.own(batch_indices(s, N, a.batch, 0))) for s in range(a.steps))
            mem = rank_memory(N, n_layers * a.experts, a.p, a.d, a.m, a.r, batch=rec["max_batch_share"],
                              chunk=a.chunk, device=a.device)
            rec["predicted"] = mem
            rec["measured_growth_bytes"] = rec["peak_rss_bytes"] - rec["base_rss_bytes"]
            rec["growth_over_predicted_host"] = rec["measured_growth_bytes"] / mem["host_bytes"]
            if "peak_cuda_bytes" in rec:
                rec["cuda_over_predicted_device"] = rec["peak_cuda_bytes"] / mem["device_bytes"]
    one = [r for r in runs if r["mode"] == "dist" and r["ranks"] == 1]  # the reference of each round
    out = {
        "what": "family up fitted with --steps steps, batch --batch; plain = no process group; dist = torchrun",
        "command": "python benchmarks/bench_distributed.py " + " ".join(sys.argv[1:]),
        "device": a.device, "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None,
        "shape": {k: getattr(a, k) for k in PRESETS["cpu"]}, "N": N, "checkpoint_bytes": made["bytes"],
        "expert_bytes_per_family_fp32": N * a.p * a.d * 4, "torch": torch.__version__,
        "cpu": cpu_name(), "cpus": os.cpu_count(),
        "loadavg_start": load0, "loadavg_end": os.getloadavg(), "runs": runs,
        "formula_examples": formula_examples(), "fixture_equality": equal,
    }
    if one:
        for res in runs:  # against the 1-rank run of the same round
            ref = next(r for r in one if r["round"] == res["round"])
            res["step_s_over_1_rank"] = res["step_s_median"] / ref["step_s_median"]
            res["rel_fro_error_minus_1_rank"] = res["rel_fro_error"] - ref["rel_fro_error"]
    name = f"distributed_{'gpu' if a.device == 'cuda' else 'cpu'}.json"
    dest = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / name
    table = {}
    for res in runs:  # per configuration: medians over rounds, per-rank worst peak
        key = f"{res['mode']} {res['ranks']} rank(s) x {res['threads_per_rank']} thread(s)"
        t = table.setdefault(key, {"step_s": [], "peak_rss_MiB": [], "growth_MiB": [], "experts_held_MiB": []})
        t["step_s"].append(res["step_s_median"])
        t["peak_rss_MiB"].append([round(x["peak_rss_bytes"] / 2**20) for x in res["per_rank"]])
        t["growth_MiB"].append([round(x["measured_growth_bytes"] / 2**20) for x in res["per_rank"]])
        t["experts_held_MiB"] = [round(x["expert_bytes_held"] / 2**20) for x in res["per_rank"]]
    for t in table.values():
        t["step_s_median_of_rounds"] = sorted(t["step_s"])[len(t["step_s"]) // 2]
    out["table"] = table
    dest.write_text(json.dumps(out, indent=1) + "\n")
    for res in runs:
        print(f"round {res['round']} {res['mode']:5s} ranks={res['ranks']} threads={res['threads_per_rank']} "
              f"step {res['step_s_median']:.3f} s  peak RSS "
              f"{[round(x['peak_rss_bytes'] / 2**20) for x in res['per_rank']]} MiB, growth "
              f"{[round(x['measured_growth_bytes'] / 2**20) for x in res['per_rank']]} MiB, predicted "
              f"{[round(x['predicted']['host_bytes'] / 2**20) for x in res['per_rank']]} MiB, experts held "
              f"{[round(x['expert_bytes_held'] / 2**20) for x in res['per_rank']]} MiB")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
