"""Write a checkpoint with the real shapes and names of Qwen1.5-MoE-A2.7B and random weights.

Why: no model hub is reachable here, but the full-size measurements (issue 8) need an input of the
prototype's real size: 24 MoE layers x 60 experts, vocab 151,936, bf16, per-expert on-disk names,
about 5 GB shards + model.safetensors.index.json, a tokenizer that loads offline. The tensor names and
shapes come from the installed transformers class built on the meta device (experts written per
expert, as `save_pretrained` writes them); values are Gaussian with std 1/sqrt(fan_in) (norms 1,
biases 0), generated in row chunks and streamed to disk by globe's ShardedWriter, so peak memory is
one chunk (~256 MB), far below one shard. The tokenizer is the bundled fixture's (vocab 4096, so
every id it produces exists in the 151,936-row embedding).

    python benchmarks/make_fullsize_checkpoint.py --out /tmp/qwen15-fullsize            # 28.6 GB
    python benchmarks/make_fullsize_checkpoint.py --out /tmp/q2 --layers 2               # 2 layers

Not committed (28.6 GB); tests use tiny configs through `write_checkpoint`.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from usage import die

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from globe.io.writer import ShardedWriter  # noqa: E402
from globe.progress import Progress  # noqa: E402

REFERENCE = ROOT / "benchmarks" / "data" / "qwen1.5-moe-a2.7b-config.json"
FIXTURE = ROOT / "globe" / "fixture" / "qwen2moe-tiny"
CHUNK_ELEMS = 64 * 2**20  # values generated per chunk (256 MB in fp32)


def disk_plan(config: dict, dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(on-disk name, dtype, shape) of every tensor, per-expert expert names, in a stable order."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if not k.startswith("_")})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    plan = []
    for name, t in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):  # (E, 2p, d) -> per expert gate/up (p, d)
            E, p2, d = t.shape
            pre = name.removesuffix("gate_up_proj")
            for e in range(E):
                plan += [(f"{pre}{e}.gate_proj.weight", dtype, (p2 // 2, d)),
                         (f"{pre}{e}.up_proj.weight", dtype, (p2 // 2, d))]
        elif name.endswith("mlp.experts.down_proj"):  # (E, d, p) -> per expert (d, p)
            E, d, p = t.shape
            pre = name.removesuffix("down_proj")
            plan += [(f"{pre}{e}.down_proj.weight", dtype, (d, p)) for e in range(E)]
        else:
            plan.append((name, dtype if t.is_floating_point() else t.dtype, tuple(t.shape)))
    return sorted(plan, key=lambda x: x[0])


def _values(name: str, shape: tuple[int, ...], rows: slice, gen: torch.Generator) -> torch.Tensor:
    n = rows.stop - rows.start
    dev = gen.device
    if "norm" in name:
        return torch.ones((n, *shape[1:]), device=dev)
    if name.endswith("bias"):
        return torch.zeros((n, *shape[1:]), device=dev)
    fan_in = shape[-1] if len(shape) > 1 else 1
    return torch.randn((n, *shape[1:]), generator=gen, device=dev) / math.sqrt(fan_in)


def write_checkpoint(out: Path, config: dict, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                     shard_bytes: int = 5 * 10**9, tokenizer_from: Path = FIXTURE, device: str = "cpu") -> dict:
    """Write config.json, shards + index, generation_config.json and the tokenizer into `out`.
    device: where the random values are drawn (cuda is much faster; the values differ from cpu's)."""
    out.mkdir(parents=True, exist_ok=True)
    plan = disk_plan(config, dtype)
    total = sum(math.prod(s) * torch.empty(0, dtype=dt).element_size() for _, dt, s in plan)
    gen = torch.Generator(device=device).manual_seed(seed)
    t0 = time.time()
    with ShardedWriter(out, plan, prefix="model", max_shard_bytes=shard_bytes) as w, \
            Progress(total, "write checkpoint", unit="GB", scale=1e-9) as bar:
        for name, dt, shape in plan:
            if not shape:
                w.write(name, torch.zeros((), dtype=dt))
                continue
            row = max(1, math.prod(shape[1:]))
            step = max(1, CHUNK_ELEMS // row)
            for a in range(0, shape[0], step):
                rows = slice(a, min(shape[0], a + step))
                t = _values(name, shape, rows, gen).to(dt).cpu()
                w.write_rows(name, a, t)
                bar.update(t.numel() * t.element_size())
        wm = w.close()
    conf = {k: v for k, v in config.items() if not k.startswith("_")}
    conf["torch_dtype"] = conf["dtype"] = {torch.bfloat16: "bfloat16", torch.float16: "float16",
                                           torch.float32: "float32"}[dtype]
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": conf.get("bos_token_id", 151643), "eos_token_id": conf.get("eos_token_id", 151643),
         "do_sample": False}, indent=2) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tokenizer_from / f, out / f)
    return {"path": str(out), "bytes": total, "tensors": len(plan), "shards": len(set(wm.values())),
            "seconds": time.time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default=str(REFERENCE))
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (default: the config's)")
    ap.add_argument("--shard-gb", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="where to draw the random values (cpu | cuda)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    config = json.loads(Path(a.config).read_text())
    if a.layers:
        config["num_hidden_layers"] = a.layers
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        die(f"{out} exists and is not empty")
    res = write_checkpoint(out, config, seed=a.seed, shard_bytes=int(a.shard_gb * 1e9), device=a.device)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
