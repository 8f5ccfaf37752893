"""Train the bundled fixture: a small Qwen2-MoE trained for real on CPU.

Why: nothing can be downloaded from a model hub here, and compressing random weights says nothing
about quality. This script makes a small but genuinely trained MoE with the prototype's shape ratios
(expert width p ~ 0.69 d, one shared expert of width 4p behind a sigmoid gate, top-4 routing).

Corpus: the reStructuredText sources of the Python 3.11 documentation, as shipped by Debian's
`python3.11-doc` package (`apt-get install python3.11-doc`), licence: PSF License Agreement
(permissive; see /usr/share/doc/python3.11-doc/copyright). Every 20th file (by sorted path) is held
out; the first ~150 kB of held-out text become `eval.txt`.

Run:  python scripts/train_fixture.py --out globe/fixture/qwen2moe-tiny [--minutes 25]
The step count is bounded by time; training.json records the exact command (fixed schedule length
and step count) that reproduces the committed run with the same seed on CPU.
Shapes: vocab 4096 (byte-level BPE), d=128, p=88, 16 routed experts x 4 MoE layers, top-4,
shared expert 352, 4 heads, context 256. Weights saved in bf16 (about 8 MB).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import re
import time
from pathlib import Path

import torch

DOC_ROOT = "/usr/share/doc/python3.11/html/_sources"
SEED = 0


def load_corpus(root: str) -> tuple[str, str]:
    files = sorted(glob.glob(f"{root}/**/*.rst.txt", recursive=True))
    if not files:
        raise SystemExit(f"no corpus under {root}: run `apt-get install python3.11-doc` first")
    train, held = [], []
    for i, f in enumerate(files):
        text = clean(Path(f).read_text(encoding="utf-8", errors="replace"))
        (held if i % 20 == 0 else train).append(text)
    return "\n\n".join(train), "\n\n".join(held)


def clean(text: str) -> str:
    # Drop reST directive/option lines and underline rules; keep prose and code.
    out = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith(".. ") or s.startswith(":") and s.endswith(":"):
            continue
        if s and len(set(s)) == 1 and s[0] in "=-~^*#+'\"`":
            continue
        out.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out))


def train_tokenizer(text: str, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    chunks = [text[i : i + 10000] for i in range(0, len(text), 10000)]
    tok.train_from_iterator(chunks, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token=None,
        pad_token="<|endoftext|>", unk_token=None, model_max_length=256,
    )


def make_model(vocab: int, eos: int):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=352, moe_intermediate_size=88,
        shared_expert_intermediate_size=352, num_experts=16, num_experts_per_tok=4,
        norm_topk_prob=False, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=256, decoder_sparse_step=1, output_router_logits=True,
        router_aux_loss_coef=0.01, tie_word_embeddings=False, eos_token_id=eos, bos_token_id=eos,
        pad_token_id=eos, rope_theta=10000.0,
    )
    return Qwen2MoeForCausalLM(cfg)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, ctx: int) -> float:
    model.eval()
    nll, n = 0.0, 0
    for s in range(0, ids.numel() - 1, ctx):
        x = ids[s : s + ctx + 1]
        if x.numel() < 2:
            break
        out = model(x[None, :-1])
        lp = torch.log_softmax(out.logits.float()[0], -1)
        nll -= lp.gather(-1, x[1:, None]).sum().item()
        n += x.numel() - 1
    model.train()
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="globe/fixture/qwen2moe-tiny")
    ap.add_argument("--minutes", type=float, default=25.0)
    ap.add_argument("--max-steps", type=int, default=4000)
    ap.add_argument("--schedule-steps", type=int, default=None,
                    help="fix the cosine schedule length (else estimated from the time budget)")
    ap.add_argument("--stop-after", type=int, default=None, help="stop after this many steps")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    a = ap.parse_args()
    torch.manual_seed(SEED)
    random.seed(SEED)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    train_text, held_text = load_corpus(DOC_ROOT)
    eval_text = held_text[:150_000]
    tok = train_tokenizer(train_text, 4096)
    ids = torch.tensor(tok(train_text)["input_ids"], dtype=torch.long)
    val = torch.tensor(tok(eval_text)["input_ids"], dtype=torch.long)
    print(f"train tokens {ids.numel():,}  eval tokens {val.numel():,}", flush=True)

    model = make_model(len(tok), tok.eos_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    t0, step, deadline = time.time(), 0, time.time() + 60 * a.minutes
    # Cosine schedule over the step budget the time allows (estimated after 20 steps).
    total = a.schedule_steps or a.max_steps
    stop = min(total, a.stop_after or total)
    while step < stop and time.time() < deadline:
        starts = torch.randint(0, ids.numel() - a.ctx - 1, (a.batch,))
        x = torch.stack([ids[s : s + a.ctx + 1] for s in starts.tolist()])
        warm = min(1.0, (step + 1) / 50)
        lr = a.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total))))
        for g in opt.param_groups:
            g["lr"] = lr
        out = model(x[:, :-1], labels=x[:, :-1].clone(), output_router_logits=True)
        # transformers shifts labels internally; feed input as labels.
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step == 20 and a.schedule_steps is None:
            per = (time.time() - t0) / 20
            total = min(a.max_steps, int(60 * a.minutes / per))
            stop = min(total, a.stop_after or total)
            print(f"{per:.2f}s/step -> {total} steps", flush=True)
        if step % 50 == 0:
            print(f"step {step}/{total} loss {out.loss.item():.3f} lr {lr:.2e} "
                  f"{time.time() - t0:.0f}s", flush=True)

    model.config.output_router_logits = False
    ppl_fp32 = perplexity(model, val, a.ctx)
    model = model.to(torch.bfloat16)
    ppl_bf16 = perplexity(model, val, a.ctx)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    (out_dir / "eval.txt").write_text(eval_text, encoding="utf-8")
    # Unigram entropy of the training tokens: a real model must beat exp(H1) by a wide margin.
    counts = torch.bincount(ids, minlength=len(tok)).double()
    p = counts[counts > 0] / counts.sum()
    unigram_ppl = math.exp(-(p * p.log()).sum().item())
    info = {
        "corpus": "Python 3.11 documentation sources (Debian python3.11-doc), PSF License",
        "train_tokens": ids.numel(), "eval_tokens": val.numel(), "steps": step,
        "schedule_steps": total, "lr": a.lr,
        "reproduce": f"python scripts/train_fixture.py --schedule-steps {total} --stop-after {step} "
                     f"--minutes 1000 --batch {a.batch} --ctx {a.ctx} --lr {a.lr}",
        "batch": a.batch, "context": a.ctx, "seconds": round(time.time() - t0, 1), "seed": SEED,
        "eval_ppl_fp32": round(ppl_fp32, 4), "eval_ppl_bf16": round(ppl_bf16, 4),
        "unigram_ppl": round(unigram_ppl, 2), "torch": torch.__version__,
    }
    (out_dir / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
