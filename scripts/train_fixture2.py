"""Train the second fixture: a Qwen2-MoE with the prototype's MoE layout, upcycled from a dense model.

Why: the first fixture (qwen2moe-tiny) has 16 experts x 4 layers trained from scratch. Qwen1.5-MoE-A2.7B
has 60 routed experts x 24 MoE layers, top-4, and was *upcycled* from a dense model (Qwen-1.8B): its
experts are cut from replicated, shuffled copies of the dense FFN, so experts of a layer share structure.
Compression results on a from-scratch model with 64 experts say little about that regime.

Stages (all on CPU, seed 0, each bounded by a fixed step count):
  1. dense   Qwen2MoeForCausalLM with every layer dense (FFN width h = 4p, so the dense FFN holds
             exactly 4 fine-grained experts), trained `--dense-steps` steps.
  2. upcycle as the Qwen2 technical report (arXiv 2407.10671, sec. 2.2.3, "expert initialization")
             describes Qwen's fine-grained upcycling (Qwen1.5-MoE blog: "upcycling"): for n = 60 routed
             + 4 shared fine-grained experts of width p, replicate each dense FFN ceil(n p / h) = 16
             times, shuffle each copy's intermediate neurons with its own permutation, cut each copy
             into h / p = 4 segments; segments 0-3 (one whole shuffled copy) form the shared expert
             (width 4p, as 5632 = 4 x 1408), segments 4-63 the 60 routed experts. Then re-initialise
             50% of each fine-grained expert's parameters: neuron-wise, as Drop-Upcycling (Nakamura
             et al. 2025, arXiv 2502.19261) does it: floor(0.5 p) of its intermediate neurons get fresh
             gate/up rows and down column from N(mean, std) of the dense layer's matrix. Everything
             else (embeddings, attention, norms, lm_head) is copied (sparse upcycling, Komatsuzaki et
             al. 2022, arXiv 2212.05055); routers and the shared-expert sigmoid gate are new, N(0, 0.02).
  3. moe     continued training as an MoE (top-4 of 60, norm_topk_prob false, router aux loss 0.01),
             `--moe-steps` steps.
Exact property of stage 2 (tests/test_fixture2.py): before the re-initialisation the dense FFN
f(x) = Wd (silu(Wg x) * Wu x) is a sum over its h neurons, so the shared expert equals f exactly and
the 4 routed experts cut from any other copy sum to f; with every expert active (top-k = 60), zero
router logits (weights 1/60) and a zero shared gate (sigmoid 1/2) each MoE block outputs
(15/60 + 1/2) f(x) = 0.75 f(x), i.e. the dense model's function up to that known scale.

Corpus and tokenizer: as the first fixture (scripts/train_fixture.py): the Python 3.11 documentation
sources from Debian's python3.11-doc (PSF License), every 20th file held out, eval.txt = the first
150,000 held-out characters (the same eval.txt); the tokenizer is the first fixture's (vocab 4096).
`--smoke` runs every stage on 2 layers for a few steps, training on the bundled eval text instead of
the corpus (no apt package needed), in well under a minute.

Shapes (full): vocab 4096, d = 56, 24 layers, 4 heads, p = 40 (p/d = 0.714; Qwen1.5-MoE 1408/2048 =
0.6875), 60 routed experts top-4, shared 160, dense FFN 160, context 256, batch 16; 11.17M parameters,
22.3 MB in bf16 (23.3 MB with tokenizer and eval text).
Time: one torch thread by default (predictable, and two OpenMP threads spin badly when anything else
runs). Measured single-thread CPU time per step on this machine, under load: dense 1.45 s, MoE 2.70 s,
plus about 1 minute for data and evaluation; 600 + 750 steps -> about 50 minutes when run alone.
`--max-minutes` is only a safety net that ends the MoE stage early and says so in training.json.

Run (full):  python scripts/train_fixture2.py --out globe/fixture/qwen2moe-upcycled --max-minutes 58
Run (smoke): python scripts/train_fixture2.py --smoke --out /tmp/fx2 --stages-dir /tmp/fx2-stages
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_fixture import DOC_ROOT, load_corpus  # noqa: E402  (same corpus pipeline as fixture 1)

ROOT = Path(__file__).resolve().parents[1]
FIXTURE1 = ROOT / "globe" / "fixture" / "qwen2moe-tiny"
SEED = 0
# p and d are multiples of 8: transformers' default experts kernel (torch grouped_mm) needs 16-byte
# strides, so a bf16 model with p = 44 fails to run; p/d = 40/56 = 0.714 is the closest such pair that
# fits 30 MB (Qwen1.5-MoE: 1408/2048 = 0.6875).
PREFIX_TOKENS = 8192  # eval prefix (32 windows of 256) that tests re-measure quickly
FULL = dict(layers=24, d=56, heads=4, p=40, experts=60, top_k=4, shared_mult=4, dense_mult=4, ctx=256,
            dense_steps=600, moe_steps=750, batch=16, warmup=50)
SMOKE = dict(layers=2, d=56, heads=4, p=40, experts=60, top_k=4, shared_mult=4, dense_mult=4, ctx=64,
             dense_steps=12, moe_steps=12, batch=4, warmup=2)


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def make_config(s: dict, vocab: int, eos: int, dense: bool):
    """Qwen2MoeConfig for the shapes `s`; dense=True makes every layer a plain FFN of width dense_mult*p."""
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        vocab_size=vocab, hidden_size=s["d"], intermediate_size=s["dense_mult"] * s["p"],
        moe_intermediate_size=s["p"], shared_expert_intermediate_size=s["shared_mult"] * s["p"],
        num_experts=s["experts"], num_experts_per_tok=s["top_k"], norm_topk_prob=False,
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
        max_position_embeddings=s["ctx"], decoder_sparse_step=1,
        mlp_only_layers=list(range(s["layers"])) if dense else [], router_aux_loss_coef=0.01,
        tie_word_embeddings=False, eos_token_id=eos, bos_token_id=eos, pad_token_id=eos, rope_theta=10000.0,
    )


def _fresh(w: torch.Tensor, shape, g: torch.Generator) -> torch.Tensor:
    """Draws of N(mean(w), std(w)): Drop-Upcycling's re-initialisation statistics."""
    return torch.randn(shape, generator=g) * w.std() + w.mean()


@torch.no_grad()
def upcycle(dense, moe_cfg, reinit: float = 0.5, seed: int = SEED + 1):
    """Dense Qwen2-MoE (all layers FFN, width h) -> MoE of moe_cfg, by the recipe in the module docstring.

    Returns (moe_model, umap) with umap["src"] (L, n, p) int64: the dense neuron each fine-grained
    expert's neuron was cut from (expert 0..n_sh-1 = shared expert, then the routed experts), and
    umap["reinit"] (L, n, p) bool: the neurons re-initialised. Raises ValueError for widths that do
    not divide (h % p, shared width % p).
    """
    from transformers import Qwen2MoeForCausalLM

    E, p = moe_cfg.num_experts, moe_cfg.moe_intermediate_size
    h = dense.config.intermediate_size
    if h % p or moe_cfg.shared_expert_intermediate_size % p:
        raise ValueError(f"upcycle: dense width {h} and shared width must be multiples of p={p}")
    n_sh = moe_cfg.shared_expert_intermediate_size // p
    n, k = E + n_sh, h // p
    copies = math.ceil(n / k)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    moe = Qwen2MoeForCausalLM(moe_cfg).float()
    res = moe.load_state_dict({k_: v for k_, v in dense.state_dict().items() if ".mlp." not in k_}, strict=False)
    if res.unexpected_keys or any(".mlp." not in k_ for k_ in res.missing_keys):
        raise ValueError(f"upcycle: dense/MoE mismatch {res.unexpected_keys} {res.missing_keys}")
    L = moe_cfg.num_hidden_layers
    src = torch.empty(L, n, p, dtype=torch.long)
    mask = torch.zeros(L, n, p, dtype=torch.bool)
    n_re = int(math.floor(reinit * p))
    for li, (dl, ml) in enumerate(zip(dense.model.layers, moe.model.layers)):
        Wg, Wu, Wd = (dl.mlp.gate_proj.weight.float(), dl.mlp.up_proj.weight.float(),
                      dl.mlp.down_proj.weight.float())  # (h, d), (h, d), (d, h)
        segs = []
        for _ in range(copies):  # one independent shuffle per FFN copy; leftover segments are discarded
            perm = torch.randperm(h, generator=g)
            segs += [perm[j * p:(j + 1) * p] for j in range(k)]
        idx = torch.stack(segs[:n])  # (n, p)
        src[li] = idx
        gate, up, down = Wg[idx], Wu[idx], Wd[:, idx].permute(1, 0, 2)  # (n, p, d), (n, p, d), (n, d, p)
        if n_re:
            for i in range(n):
                mask[li, i, torch.randperm(p, generator=g)[:n_re]] = True
            m = mask[li]
            gate = torch.where(m[..., None], _fresh(Wg, gate.shape, g), gate)
            up = torch.where(m[..., None], _fresh(Wu, up.shape, g), up)
            down = torch.where(m[:, None, :], _fresh(Wd, down.shape, g), down)
        blk = ml.mlp
        blk.shared_expert.gate_proj.weight.copy_(gate[:n_sh].reshape(n_sh * p, -1))
        blk.shared_expert.up_proj.weight.copy_(up[:n_sh].reshape(n_sh * p, -1))
        blk.shared_expert.down_proj.weight.copy_(down[:n_sh].permute(1, 0, 2).reshape(down.shape[1], n_sh * p))
        blk.experts.gate_up_proj.copy_(torch.cat([gate[n_sh:], up[n_sh:]], dim=1))  # (E, 2p, d), gate rows first
        blk.experts.down_proj.copy_(down[n_sh:])  # (E, d, p)
        blk.gate.weight.normal_(0.0, moe_cfg.initializer_range, generator=g)  # new router (E, d)
        blk.shared_expert_gate.weight.normal_(0.0, moe_cfg.initializer_range, generator=g)  # (1, d)
    return moe, {"src": src, "reinit": mask}


def batches(ids: torch.Tensor, batch: int, ctx: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, ids.numel() - ctx, (batch,), generator=g)
        yield torch.stack([ids[s:s + ctx] for s in starts.tolist()])


def train(model, ids, steps: int, a, lr: float, seed: int, desc: str, moe: bool, deadline: float | None = None):
    """AdamW (0.9, 0.95), wd 0.1, linear warmup then cosine to 10%, clip 1.0. Returns a stage record."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    coef = model.config.router_aux_loss_coef
    t0, c0 = time.time(), time.process_time()
    curve, win, aux_win, step, data = [], [], [], 0, batches(ids, a.batch, a.ctx, seed)
    stopped = None
    while step < steps:
        if deadline is not None and time.time() > deadline:
            stopped = f"--max-minutes reached at step {step} of {steps}"
            break
        x = next(data)
        f = min(1.0, (step + 1) / a.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for grp in opt.param_groups:
            grp["lr"] = lr * f
        out = model(x, labels=x, output_router_logits=moe)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        aux = out.aux_loss.item() if moe else 0.0
        win.append(out.loss.item() - coef * aux)  # the language-model loss alone
        aux_win.append(aux)
        if step % 50 == 0 or step == steps:
            curve.append([step, round(sum(win) / len(win), 4)])
            el, cpu = time.time() - t0, time.process_time() - c0
            log(f"{desc} step {step}/{steps} lm loss {curve[-1][1]:.3f}"
                + (f" aux {sum(aux_win) / len(aux_win):.3f}" if moe else "")
                + f" {el / step:.2f}s/step (cpu {cpu / step:.2f}s/step) ETA {(steps - step) * el / step / 60:.1f} min")
            win, aux_win = [], []
    model.eval()
    return {"steps": step, "schedule_steps": steps, "lr": lr, "seconds": round(time.time() - t0, 1),
            "s_per_step": round((time.time() - t0) / max(step, 1), 3),
            "cpu_s_per_step": round((time.process_time() - c0) / max(step, 1), 3), "curve_lm_loss": curve,
            "stopped_by": stopped}


@torch.no_grad()
def eval_nll(model, ids: torch.Tensor, ctx: int, batch: int = 16) -> float:
    """Mean next-token NLL (nats) over non-overlapping ctx-token windows of ids, the last one partial
    (the windows of tests/test_fixture.py); full windows go through the model `batch` at a time."""
    model.eval()
    nll, n, starts = 0.0, 0, list(range(0, ids.numel() - 1, ctx))
    full = [st for st in starts if st + ctx + 1 <= ids.numel()]
    groups = [full[i:i + batch] for i in range(0, len(full), batch)] + [[st] for st in starts if st not in full]
    for grp in groups:
        x = torch.stack([ids[st:st + ctx + 1] for st in grp]) if len(grp) > 1 else ids[grp[0]:grp[0] + ctx + 1][None]
        if x.shape[1] < 2:
            continue
        lp = torch.log_softmax(model(x[:, :-1], use_cache=False).logits.float(), -1)
        nll -= lp.gather(-1, x[:, 1:, None]).sum().item()
        n += x[:, 1:].numel()
    return nll / n


def entropy(ids: torch.Tensor, vocab: int) -> float:
    """Plug-in unigram entropy (nats) of a token sequence."""
    c = torch.bincount(ids, minlength=vocab).double()
    q = c[c > 0] / c.sum()
    return -(q * q.log()).sum().item()


def load_texts(smoke: bool) -> tuple[str, str, str]:
    if smoke:  # no apt package needed: split the bundled eval text
        t = (FIXTURE1 / "eval.txt").read_text(encoding="utf-8")
        return t[:120_000], t[120_000:130_000], "smoke: first fixture's eval.txt split 120,000 / 10,000 chars"
    train_text, held = load_corpus(DOC_ROOT)
    return train_text, held[:150_000], ("Python 3.11 documentation sources (Debian python3.11-doc), PSF License; "
                                        "every 20th file held out, eval.txt = first 150,000 held-out characters")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None,
                    help="default globe/fixture/qwen2moe-upcycled (with --smoke: runs/fixture2-smoke)")
    ap.add_argument("--smoke", action="store_true", help="2 layers, a few steps per stage, bundled text")
    ap.add_argument("--stages-dir", default=None, help="also save the dense and upcycled (fp32) stages here")
    ap.add_argument("--dense-steps", type=int, default=None)
    ap.add_argument("--moe-steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--ctx", type=int, default=None)
    ap.add_argument("--dense-lr", type=float, default=3e-3)
    ap.add_argument("--moe-lr", type=float, default=2e-3)
    ap.add_argument("--reinit", type=float, default=0.5, help="fraction of each expert's neurons re-initialised")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: predictable time, see docstring)")
    ap.add_argument("--max-minutes", type=float, default=None, help="safety net: end the MoE stage at this wall time")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    a = ap.parse_args(argv)
    if a.out is None:
        a.out = "runs/fixture2-smoke" if a.smoke else str(ROOT / "globe" / "fixture" / "qwen2moe-upcycled")
    s = dict(SMOKE if a.smoke else FULL)
    for key in ("dense_steps", "moe_steps", "batch", "ctx"):
        if getattr(a, key) is not None:
            s[key] = getattr(a, key)
    a.batch, a.ctx, a.warmup = s["batch"], s["ctx"], s["warmup"]
    out = Path(a.out)
    if out.exists() and any(out.iterdir()) and not a.overwrite and {f.name for f in out.iterdir()} != {"README.md"}:
        raise SystemExit(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    torch.manual_seed(SEED)
    torch.set_num_threads(a.threads)
    t_start = time.time()
    deadline = t_start + 60 * a.max_minutes if a.max_minutes else None

    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2MoeForCausalLM
    from transformers import __version__ as tf_version

    tok = AutoTokenizer.from_pretrained(FIXTURE1)
    train_text, eval_text, corpus = load_texts(a.smoke)
    ids = torch.tensor(tok(train_text)["input_ids"], dtype=torch.long)
    val = torch.tensor(tok(eval_text)["input_ids"], dtype=torch.long)
    prefix = val[:PREFIX_TOKENS + 1]
    V = len(tok)
    log(f"train tokens {ids.numel():,}  eval tokens {val.numel():,}")

    # Stage 1: dense.
    dense = Qwen2MoeForCausalLM(make_config(s, V, tok.eos_token_id, dense=True))
    rec_dense = train(dense, ids, s["dense_steps"], a, a.dense_lr, SEED + 10, "dense", moe=False)
    rec_dense["eval_loss_prefix"] = round(eval_nll(dense, prefix, a.ctx), 4)
    rec_dense["params"] = sum(t.numel() for t in dense.parameters())
    log(f"dense eval loss (prefix) {rec_dense['eval_loss_prefix']:.4f}")

    # Stage 2: upcycle.
    t0 = time.time()
    moe_cfg = make_config(s, V, tok.eos_token_id, dense=False)
    moe, umap = upcycle(dense, moe_cfg, reinit=a.reinit)
    rec_up = {"seconds": round(time.time() - t0, 1), "reinit_frac": a.reinit,
              "fine_grained_experts": int(umap["src"].shape[1]), "shared_segments": s["shared_mult"],
              "copies": math.ceil(umap["src"].shape[1] / s["dense_mult"]),
              "eval_loss_prefix": round(eval_nll(moe, prefix, a.ctx), 4)}
    log(f"upcycled eval loss (prefix, before MoE training) {rec_up['eval_loss_prefix']:.4f}")
    if a.stages_dir:
        sd = Path(a.stages_dir)
        dense.save_pretrained(sd / "dense")
        moe.save_pretrained(sd / "upcycled")
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in umap.items()}, str(sd / "upcycle_map.safetensors"))

    # Stage 3: MoE.
    rec_moe = train(moe, ids, s["moe_steps"], a, a.moe_lr, SEED + 20, "moe", moe=True, deadline=deadline)
    moe.config.output_router_logits = False
    loss_fp32 = eval_nll(moe, val, a.ctx)
    rec_moe["eval_loss_prefix"] = round(eval_nll(moe, prefix, a.ctx), 4)
    log(f"moe eval loss fp32 {loss_fp32:.4f} (ppl {math.exp(loss_fp32):.2f})")

    # Save bf16 to a staging directory, then measure what plain transformers loads from it.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        moe.to(torch.bfloat16).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "eval.txt").write_text(eval_text, encoding="utf-8")
        back = AutoModelForCausalLM.from_pretrained(tmp).eval()
        loss_bf16, loss_bf16_prefix = eval_nll(back, val, a.ctx), eval_nll(back, prefix, a.ctx)
        params = sum(t.numel() for t in back.parameters())
        h_eval, h_train = entropy(val, V), entropy(ids, V)
        info = {
            "corpus": corpus, "tokenizer": "globe/fixture/qwen2moe-tiny (byte-level BPE, vocab 4096)",
            "smoke": a.smoke, "seed": SEED, "torch": torch.__version__, "transformers": tf_version,
            "threads": a.threads, "experts_implementation": back.config._experts_implementation,
            "shapes": {k: s[k] for k in ("layers", "d", "heads", "p", "experts", "top_k", "ctx")}
            | {"shared_width": s["shared_mult"] * s["p"], "dense_ffn_width": s["dense_mult"] * s["p"], "vocab": V},
            "batch": a.batch, "context": a.ctx, "train_tokens": ids.numel(), "eval_tokens": val.numel(),
            "eval_prefix_tokens": prefix.numel() - 1,
            "stages": {"dense": rec_dense, "upcycle": rec_up, "moe": rec_moe},
            "eval_loss_fp32": round(loss_fp32, 4), "eval_ppl_fp32": round(math.exp(loss_fp32), 4),
            "eval_loss_bf16": round(loss_bf16, 4), "eval_ppl_bf16": round(math.exp(loss_bf16), 4),
            "eval_ppl_bf16_prefix": round(math.exp(loss_bf16_prefix), 4),
            "unigram_entropy_eval_nats": round(h_eval, 4), "unigram_ppl_eval": round(math.exp(h_eval), 2),
            "unigram_ppl": round(math.exp(h_train), 2), "params": params, "bytes_bf16_params": 2 * params,
            "seconds": round(time.time() - t_start, 1), "cpu_seconds": round(time.process_time(), 1),
            "stopped_by": rec_moe["stopped_by"] or "fixed step counts",
            "command": "python scripts/train_fixture2.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "reproduce": (f"python scripts/train_fixture2.py{' --smoke' if a.smoke else ''} --out {a.out} "
                          f"--dense-steps {rec_dense['steps']} --moe-steps {rec_moe['steps']} --batch {a.batch} "
                          f"--ctx {a.ctx} --dense-lr {a.dense_lr} --moe-lr {a.moe_lr} --reinit {a.reinit} "
                          f"--threads {a.threads}"),
        }
        if rec_moe["stopped_by"]:
            info["reproduce"] += "  (note: the MoE cosine schedule was cut short; see stages.moe)"
        (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(readme(info))
        info["bytes_on_disk"] = sum(f.stat().st_size for f in tmp.iterdir())
        umask = os.umask(0)
        os.umask(umask)
        for f in [tmp, *tmp.iterdir()]:  # mkdtemp and some writers use private modes; look like any output
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out} ({info['bytes_on_disk'] / 1e6:.1f} MB) in {info['seconds'] / 60:.1f} min; "
        f"eval ppl bf16 {info['eval_ppl_bf16']:.2f} vs unigram {info['unigram_ppl_eval']:.1f}")
    return info


def _row(name: str, r: dict) -> str:
    return (f"| {name} | {r['steps']} | {r['seconds'] / 60:.1f} min | {r['curve_lm_loss'][-1][1]} "
            f"| {r['eval_loss_prefix']} |")


def readme(i: dict) -> str:
    sh, st = i["shapes"], i["stages"]
    return f"""# qwen2moe-upcycled: a Qwen2-MoE with Qwen1.5-MoE's expert layout, upcycled from a dense model

{"**SMOKE RUN: a few steps on 2 layers, not a trained fixture.**" if i["smoke"] else ""}
Made by `scripts/train_fixture2.py` (this README and `training.json` are written by it). Same class as
Qwen1.5-MoE-A2.7B (`Qwen2MoeForCausalLM`) with its MoE layout and shape ratios:

| field | value | Qwen1.5-MoE-A2.7B |
|---|---|---|
| MoE layers | {sh["layers"]} (all) | 24 (all) |
| routed experts | {sh["experts"]} per layer, top-{sh["top_k"]}, `norm_topk_prob` false | 60, top-4, false |
| hidden size d / expert width p | {sh["d"]} / {sh["p"]} (p/d = {sh["p"] / sh["d"]:.4f}) | 2048 / 1408 (0.6875) |
| shared expert | width {sh["shared_width"]} = 4p, sigmoid gate | 5632 = 4 x 1408, sigmoid gate |
| attention, context | {sh["heads"]} heads, {sh["ctx"]} tokens | 16 heads |
| vocabulary | {sh["vocab"]} (the first fixture's byte-level BPE) | 151936 |
| parameters | {i["params"]:,} ({i["bytes_bf16_params"] / 1e6:.1f} MB in bf16) | 14.3B |

## Recipe (upcycling as for Qwen1.5-MoE)

1. **Dense model**: every layer a plain SwiGLU FFN of width {sh["dense_ffn_width"]} = 4p, i.e. four
   experts' worth (as the shared expert, 5632 = 4 x 1408), trained {st["dense"]["steps"]} steps
   (lr {st["dense"]["lr"]}).
2. **Split, replicate, shuffle**. The Qwen1.5-MoE blog ("Qwen1.5-MoE: Matching 7B Model Performance with
   1/3 Activated Parameters", https://qwenlm.github.io/blog/qwen-moe/) says the fine-grained experts are
   segments of a partitioned FFN and that the model was initialised by "upcycling" Qwen-1.8B; the Qwen2
   technical report (arXiv 2407.10671, sec. 2.2.3, expert initialisation) gives the procedure:
   {st["upcycle"]["fine_grained_experts"]} fine-grained experts of width p
   ({sh["experts"]} routed + 4 that form the shared expert), so each dense FFN is replicated
   ceil(64 p / 4p) = {st["upcycle"]["copies"]} times; each copy's intermediate neurons are shuffled with
   their own permutation and cut into 4 segments of p neurons. One whole shuffled copy becomes the shared
   expert, the other segments the routed experts.
3. **Partial re-initialisation**: {int(st["upcycle"]["reinit_frac"] * 100)}% of each fine-grained
   expert's parameters are re-initialised (the Qwen2 report's figure). The report does not say which
   parameters; here it is neuron-wise as in Drop-Upcycling (Nakamura et al. 2025, arXiv 2502.19261):
   floor(0.5 p) random neurons per expert get fresh gate/up rows and down column drawn from N(mean, std)
   of the dense layer's matrix.
4. **New routers and shared-expert gate**, N(0, 0.02); all other weights copied from the dense model
   (sparse upcycling, Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts from Dense
   Checkpoints", arXiv 2212.05055, ICLR 2023).
5. **MoE training**: {st["moe"]["steps"]} steps (lr {st["moe"]["lr"]}, router aux loss 0.01).

Before step 3 the construction is exact: the shared expert computes the dense FFN, and the 4 routed
experts cut from any one copy sum to it (`tests/test_fixture2.py` checks this and the whole-model
identity it implies).

## Corpus and licence

{i["corpus"]}. The PSF License Agreement is permissive (see /usr/share/doc/python3.11-doc/copyright).
`eval.txt` is the first fixture's held-out text: {i["eval_tokens"]:,} tokens.

## Measured (training.json)

| stage | steps | wall | final train LM loss (last 50 steps) | eval loss, first {i["eval_prefix_tokens"]:,} tokens |
|---|---|---|---|---|
{_row("dense", st["dense"])}
| upcycled, before MoE training | - | {st["upcycle"]["seconds"]:.0f} s | - | {st["upcycle"]["eval_loss_prefix"]} |
{_row("MoE", st["moe"])}

Whole eval text: loss {i["eval_loss_fp32"]} nats/token, perplexity {i["eval_ppl_fp32"]} (fp32 before the
cast) and {i["eval_ppl_bf16"]} in the committed bf16 weights loaded with plain transformers, against a
unigram entropy of the eval text of {i["unigram_entropy_eval_nats"]} nats (perplexity {i["unigram_ppl_eval"]}).
Total wall time {i["seconds"] / 60:.1f} min with {i["threads"]} torch thread(s) (torch {i["torch"]}, transformers
{i["transformers"]}, CPU). Command: `{i["command"]}`.
"""


if __name__ == "__main__":
    main()
