"""Runtime benchmark: GloBE experts (cache full | lru S=16 | none) vs transformers' own experts, same run.

Why these numbers: decode at batch 1 reads each active expert's weights once per token, so it measures
bytes per expert (GloBE: r*d + p*r per family instead of p*d); prefill at 512 tokens measures GEMM
throughput; peak RSS measures what the runtime keeps resident. The LRU hit rate needs real routing,
so the fixture model (16 experts) routes its eval text and each layer's LRU is replayed over that trace.

Model: globe.testing.models.real_dim_model (Qwen1.5-MoE-A2.7B layer sizes: d 2048, 60 experts of p 1408, shared
5632, top-4), a few layers, random weights; random artifacts with r = p/2 (speed does not depend on the
fit). Speed runs in one process, configurations interleaved over rounds (medians reported) because
the CPU is shared; peak memory runs each configuration in a fresh subprocess (VmHWM after reset).

    python benchmarks/bench_runtime.py [--layers 2 --dtype bf16 --rounds 3 --threads 1]
writes benchmarks/results/runtime_cpu.json;  --device cuda --decode-batch 1 32 --skip memory hit_rate
--out benchmarks/results/runtime_gpu.json measures a GPU (timings synchronised; batch-32 decode throughput).
    python benchmarks/bench_runtime.py --kept 6 --out benchmarks/results/runtime_kept_cpu.json
compares full and lru16 with 6 of the 60 experts per layer kept uncompressed (bank.keep_fraction 0.1;
random routing sends them about a tenth of the assignments) against the same modes without (speed and
peak memory; `--skip speed` for memory alone).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from usage import Parser, check_device, check_out, check_threads, cpu_name, die

from globe import compat
from globe.artifacts import atomic_write
from globe.common import DTYPES
from globe.config import CacheCfg
from globe.maps import ACTIVATIONS
from globe.runtime import cache_stats, patch_model, reset_cache_stats, simulate_lru, unpatch_model
from globe.runtime.cache import fused_available
from globe.testing.artifacts import random_artifacts
from globe.testing.models import QWEN15_MOE_A27B, fixture_path, real_dim_model

OUT = Path(__file__).parent / "results" / "runtime_cpu.json"
VOCAB = 1024


def configs(args) -> dict[str, CacheCfg | None]:
    # each mode, then its twin with cache.compile (the torch.compile'd composition kernel) next to it (after
    # it in even rounds, before it in odd ones), so the twins' per-round ratio (`vs_eager`) compares runs
    # seconds apart on a shared CPU, the order's bias cancelling; full vs full_compiled (the same GEMMs
    # once the table is built) shows what is left of the noise. CUDA ignores cache.compile: no twins there
    lru = {"mode": "lru", "S_per_layer": 16, "warmup_tokens": args.warmup_tokens}
    if args.kept:  # experts kept uncompressed (bank.keep_fraction): each mode without and with them
        return {"baseline": None, "full": CacheCfg(mode="full"), "full_kept": CacheCfg(mode="full"),
                "lru16": CacheCfg(**lru), "lru16_kept": CacheCfg(**lru)}
    twins = torch.device(args.device).type == "cpu"
    out: dict[str, CacheCfg | None] = {"baseline": None}
    for name, kw in (("full", {"mode": "full"}), ("lru16", lru), ("none", {"mode": "none"})):
        out[name] = CacheCfg(**kw)
        if twins:
            out[f"{name}_compiled"] = CacheCfg(**kw, compile=True)
    return out


DEVICE = torch.device("cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def build(args):
    dtype = DTYPES[args.dtype]
    model = real_dim_model(num_layers=args.layers, vocab_size=VOCAB, dtype=dtype)
    p = QWEN15_MOE_A27B["moe_intermediate_size"]
    arts = random_artifacts(model, m=args.m, r=p // 2, support=args.support, seed=0, activation=args.activation)
    if args.kept:
        E = QWEN15_MOE_A27B["num_experts"]
        kept = [li * E + e for li in range(len(arts.moe_layers)) for e in range(args.kept)]
        return model.to(DEVICE), (arts, random_artifacts(model, m=args.m, r=p // 2, support=args.support, seed=0,
                                                         activation=args.activation, kept=kept))
    return model.to(DEVICE), arts


@torch.no_grad()
def prefill_tok_s(model, n: int, seed: int) -> float:
    ids = torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    _sync()
    t = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    _sync()
    return n / (time.perf_counter() - t)


@torch.no_grad()
def decode_tok_s(model, n: int, seed: int, prompt: int = 32, batch: int = 1) -> float:
    """Greedy decode with the KV cache: n single-token steps of `batch` sequences after a `prompt`-token
    prefill; tokens per second over all sequences."""
    ids = torch.randint(3, VOCAB, (batch, prompt), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    out = model(input_ids=ids, use_cache=True)
    pkv, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    reset_cache_stats(model)  # hit rates below count the decode steps only
    _sync()
    t = time.perf_counter()
    for _ in range(n):
        out = model(input_ids=nxt, past_key_values=pkv, use_cache=True)
        pkv, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync()
    return batch * n / (time.perf_counter() - t)


def speed(args) -> dict:
    model, arts = build(args)
    arts, arts_kept = arts if args.kept else (arts, None)
    cfgs = configs(args)
    extra = [b for b in args.decode_batch if b != 1]
    res: dict[str, dict] = {c: {"decode_tok_s": [], "prefill_tok_s": [], **{f"decode_b{b}_tok_s": [] for b in extra}}
                            for c in cfgs}
    for rnd in range(args.rounds):
        order = list(cfgs)
        if rnd % 2:  # odd rounds run each compiled twin before its eager one: the order's bias cancels
            for i, name in enumerate(order):
                if name.endswith("_compiled"):
                    order[i - 1], order[i] = order[i], order[i - 1]
        for name in order:
            cc = cfgs[name]
            if cc is not None:
                t = time.perf_counter()
                patch_model(model, arts_kept if name.endswith("_kept") else arts, cc,
                            collect_stats=name.startswith("lru16"))
                res[name].setdefault("patch_s", []).append(time.perf_counter() - t)
            with torch.no_grad():
                model(input_ids=torch.tensor([[5, 6, 7, 8]], device=DEVICE), use_cache=False)  # touch every path
            if cc is not None and cc.compile and not fused_available():  # "compiled" rows would be eager ones
                die("cache.compile: the fused kernel does not compile here (see the warning above)")
            res[name]["decode_tok_s"].append(decode_tok_s(model, args.decode_tokens, seed=rnd))
            for b in extra:
                res[name][f"decode_b{b}_tok_s"].append(decode_tok_s(model, args.decode_tokens, seed=rnd, batch=b))
            if name.startswith("lru16"):
                st = cache_stats(model)
                res[name].setdefault("decode_hit_rate", []).append(st["hit_rate"])
            res[name]["prefill_tok_s"].append(max(prefill_tok_s(model, args.prefill_tokens, seed=100 + rnd)
                                                  for _ in range(args.prefill_repeats)))
            if cc is not None:
                unpatch_model(model)
            print(f"round {rnd} {name}: decode {res[name]['decode_tok_s'][-1]:.2f} tok/s, "
                  f"prefill {res[name]['prefill_tok_s'][-1]:.1f} tok/s", flush=True)
    out = {}
    for name, r in res.items():  # median over rounds; each round interleaves all configurations
        out[name] = {k: statistics.median(v) for k, v in r.items() if v}
        out[name]["runs"] = r
    base = res["baseline"]
    for name in cfgs:  # paired ratios: each against the baseline of the same round (load drifts between rounds)
        if name != "baseline":
            for k in ("decode", "prefill", *(f"decode_b{b}" for b in extra)):
                per = [c / b for c, b in zip(res[name][f"{k}_tok_s"], base[f"{k}_tok_s"])]
                out[name][f"{k}_ratio"] = statistics.median(per)
                out[name][f"{k}_ratio_per_round"] = per
    for name in cfgs:
        if name.endswith("_compiled"):
            eager = res[name.removesuffix("_compiled")]
            for k in ("decode", "prefill"):
                per = [c / e for c, e in zip(res[name][f"{k}_tok_s"], eager[f"{k}_tok_s"])]
                out[name][f"{k}_vs_eager"] = statistics.median(per)
                out[name][f"{k}_vs_eager_per_round"] = per
    out["baseline"]["experts_implementation"] = model.config._experts_implementation
    return out


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return -1


def mem_child(args) -> None:
    """One configuration in a fresh process: build, patch (dropping the originals), then peak RSS of a run."""
    model, arts = build(args)
    if args.kept:
        arts = arts[1] if args.mem_child.endswith("_kept") else arts[0]
    cc = configs(args)[args.mem_child]
    if cc is not None:
        patch_model(model, arts, cc, keep_original=False)
    del arts
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    params = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    cached = 0  # buffers (banks, the full table) are counted above; lru slabs are not buffers
    if cc is not None:
        from globe.runtime.patch import globe_layers

        cached = sum(mod.slab.nbytes() for mod in globe_layers(model).values() if mod.slab is not None)
    rss_model = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    prefill_tok_s(model, args.prefill_tokens, seed=0)
    decode_tok_s(model, 8, seed=0)
    print(json.dumps({"rss_after_load": rss_model, "peak_rss": _status("VmHWM"),
                      "weight_bytes": params + cached}))


def memory(args) -> dict:
    out = {}
    for name in configs(args):
        cmd = [sys.executable, __file__, "--mem-child", name, "--layers", str(args.layers), "--dtype", args.dtype,
               "--m", str(args.m), "--support", str(args.support), "--activation", args.activation,
               "--threads", str(args.threads), "--kept", str(args.kept),
               "--prefill-tokens", str(args.prefill_tokens), "--warmup-tokens", str(args.warmup_tokens)]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[name] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"memory {name}: {out[name]}", flush=True)
    for name in out:
        out[name]["peak_ratio"] = out[name]["peak_rss"] / out["baseline"]["peak_rss"]
    return out


@torch.no_grad()
def hit_rates(args) -> dict:
    """Per-layer LRU replay of the fixture's routing of its eval text, S in args.S."""
    from transformers import AutoTokenizer

    fx = fixture_path()
    tok = AutoTokenizer.from_pretrained(str(fx))
    model = compat.load_pretrained(fx, torch.float32)
    ids = tok((fx / "eval.txt").read_text(), return_tensors="pt").input_ids[0][: args.hit_tokens]
    with compat.record_routing(model) as trace:
        for s in range(0, ids.numel(), args.hit_context):
            model(input_ids=ids[s:s + args.hit_context].unsqueeze(0), use_cache=False)
    E = compat.experts_info(compat.get_experts(model, compat.moe_layer_ids(model)[0])).num_experts
    out = {"tokens": int(ids.numel()), "warmup_tokens": args.hit_warmup, "num_experts": E, "top_k": None,
           "S": {}}
    for S in args.S:
        per_layer = {}
        for L, chunks in trace.items():
            seq = torch.cat(chunks).tolist()  # (T, k) in token order
            out["top_k"] = len(seq[0])
            per_layer[L] = simulate_lru(seq, S, warmup=args.hit_warmup)["hit_rate"]
        out["S"][S] = {"mean": statistics.mean(per_layer.values()), "per_layer": per_layer,
                       "trivial": S >= E}
    return out


def main() -> None:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=24)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--prefill-repeats", type=int, default=2, help="best of n per round (shared CPU)")
    ap.add_argument("--warmup-tokens", type=int, default=512)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--support", type=int, default=4)
    ap.add_argument("--activation", default="silu", choices=sorted(ACTIVATIONS),
                    help="the bank's phi (bank.activation)")
    ap.add_argument("--S", type=int, nargs="+", default=[4, 8, 16, 32, 60])
    ap.add_argument("--hit-tokens", type=int, default=8192)
    ap.add_argument("--hit-context", type=int, default=256)
    ap.add_argument("--hit-warmup", type=int, default=256)
    ap.add_argument("--skip", nargs="*", default=[], choices=["speed", "memory", "hit_rate"])
    ap.add_argument("--mem-child", default=None)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--decode-batch", type=int, nargs="+", default=[1])
    ap.add_argument("--kept", type=int, default=0,
                    help="experts per layer kept uncompressed (bank.keep_fraction): speed and memory, full and lru16 "
                         "with and without them (write to another --out)")
    args = ap.parse_args()
    for flag in ("layers", "rounds", "decode_tokens", "prefill_tokens", "prefill_repeats", "m", "support",
                 "hit_tokens", "hit_context"):
        if getattr(args, flag) < 1:
            die(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not 0 <= args.kept < QWEN15_MOE_A27B["num_experts"]:
        die(f"--kept must be in [0, {QWEN15_MOE_A27B['num_experts']}), got {args.kept}")
    if args.kept:
        args.skip = sorted(set(args.skip) | {"hit_rate"})
    if args.support > args.m:
        die(f"--support {args.support} exceeds --m {args.m}")
    if min(args.S) < 1 or min(args.decode_batch) < 1 or args.warmup_tokens < 0 or args.hit_warmup < 0:
        die("--S and --decode-batch must be >= 1, --warmup-tokens and --hit-warmup >= 0")
    check_threads(args.threads)
    check_out(args.out)
    check_device(args.device)
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.mem_child:
        mem_child(args)
        return
    t0 = time.time()
    res: dict = {
        "setup": {"model": "real_dim_model (Qwen1.5-MoE-A2.7B layer sizes, random weights)", "layers": args.layers,
                  "dtype": args.dtype, "r": QWEN15_MOE_A27B["moe_intermediate_size"] // 2, "m": args.m,
                  "support": args.support, "activation": args.activation, "threads": args.threads,
                  "decode_tokens": args.decode_tokens,
                  "prefill_tokens": args.prefill_tokens, "prefill_repeats": args.prefill_repeats,
                  "lru_warmup_tokens": args.warmup_tokens,
                  "rounds": args.rounds, "device": args.device, "cpu": cpu_name(),
                  "gpu": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else None,
                  "decode_batch": args.decode_batch, "kept_per_layer": args.kept,
                  "torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    if "hit_rate" not in args.skip:
        res["lru_hit_rate"] = hit_rates(args)
        print("hit rates:", {S: round(v["mean"], 3) for S, v in res["lru_hit_rate"]["S"].items()}, flush=True)
    if "speed" not in args.skip:
        res["speed"] = speed(args)
    if "memory" not in args.skip:
        res["memory"] = memory(args)
    res["wall_s"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda p: Path(p).write_text(json.dumps(res, indent=2) + "\n"))
    print(f"wrote {args.out} in {res['wall_s']:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
