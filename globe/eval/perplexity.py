"""Token-weighted sliding-window perplexity.

Why this exact scheme: perplexity must be `exp(sum NLL / sum predicted tokens)` over the whole text,
not a mean of per-window means. Every token except the first is predicted exactly once, so
`tokens == len(ids) - 1`. The first window feeds `context` tokens and scores all of their next-token
predictions; each later window feeds the `context` tokens just before its targets and scores only the
next `stride` (stride <= context) not yet scored, so every later target sees at least
`context - stride + 1` tokens of history (the HF perplexity guide's scheme, without its loss of each
window's first token when stride == context).

Shapes: ids (T,) LongTensor; a window feeds (1, <= context) ids and keeps only the logits of the
scored positions (`logits_to_keep`; compat.canonical_lm_head_input keeps torch from copying the lm_head
weight for that slice), so memory is (1, n_scored, vocab) rather than (1, context, vocab).
"""

from __future__ import annotations

import math

import torch

from .. import compat
from ..config import DATASETS
from ..errors import GlobeError
from ..io.text import load_text  # noqa: F401  (part of this module's API)


def load_dataset_text(name: str, split: str = "test") -> str:
    """WikiText-2 (raw) through `datasets`, joined with blank lines like the HF perplexity guide."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise GlobeError(f"unknown eval.dataset {name!r}; supported: wikitext2 (or pass eval.text=FILE)")
    try:
        import datasets
    except ImportError:
        raise GlobeError("eval.dataset=wikitext2 needs the `datasets` package (pip install 'globe-moe[eval]'), "
                         "or pass eval.text=FILE") from None
    try:
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    except Exception as e:  # offline, hub down, cache miss: one line for the user
        msg = str(e).splitlines()[0] if str(e) else ""
        raise GlobeError(f"cannot load WikiText-2 (offline?): {type(e).__name__}: {msg}; "
                         "pass eval.text=FILE instead") from None
    return "\n\n".join(ds["text"])


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Whole text -> (T,) ids (tokenizer defaults for special tokens), truncated to max_tokens."""
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0]
    if max_tokens is not None:
        ids = ids[: int(max_tokens)]
    return ids


def max_positions(model) -> int | None:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if n else None


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first) per window over n tokens: feed ids[begin:end-1], score targets ids[first:end]."""
    out, first, end = [], 1, min(context + 1, n)
    while first < n:
        out.append((max(0, end - 1 - context), end, first))
        first, end = end, min(end + stride, n)
    return out


CE_ROWS = 32  # logits rows upcast to fp32 at a time: 2 x 32 x 151,936 x 4 B = 39 MB for Qwen's vocabulary


def nll_sum(logits: torch.Tensor, target: torch.Tensor, rows: int | None = None) -> float:
    """Sum of -log p(target) for logits (n, vocab) in any dtype, fp32 math, `rows` rows at a time.

    Raises ValueError for rows < 1 or shapes that disagree. Why: `cross_entropy(logits.float())` over a
    whole window holds the fp32 copy and its log-softmax
    at once (2 x 256 x 151,936 x 4 B = 311 MB at Qwen1.5-MoE's vocabulary), on top of the weights.
    """
    rows = CE_ROWS if rows is None else int(rows)
    if rows < 1:
        raise ValueError(f"nll_sum: rows must be >= 1, got {rows}")
    if logits.ndim != 2 or target.ndim != 1 or logits.shape[0] != target.numel():
        raise ValueError(f"nll_sum: logits (n, vocab) and target (n,) must agree, got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    total = 0.0
    for s in range(0, target.numel(), rows):
        total += float(torch.nn.functional.cross_entropy(logits[s:s + rows].float(), target[s:s + rows],
                                                         reduction="sum"))
    return total


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, context: int, stride: int | None = None,
               device: torch.device | str | None = None) -> dict:
    """Sliding-window perplexity of `ids` (T,) under `model`.

    Returns {perplexity, nll_per_token, tokens, nll_sum, windows, context, stride}. `tokens` counts
    predicted tokens (T - 1). context > the model's max_position_embeddings -> GlobeError; a window
    whose logits are not finite (NaN/inf weights, fp16 overflow) -> GlobeError naming the window.
    """
    context = int(context)
    stride = context if stride is None else int(stride)
    if context < 2:
        raise GlobeError(f"eval.context must be >= 2, got {context}")
    if not 1 <= stride <= context:
        raise GlobeError(f"eval.stride must be in [1, context={context}], got {stride}")
    limit = max_positions(model)
    if limit is not None and context > limit:
        raise GlobeError(f"eval.context={context} exceeds the model's max_position_embeddings={limit}")
    ids = ids.reshape(-1).long()
    if ids.numel() < 2:
        raise GlobeError(f"eval text has {ids.numel()} token(s); need at least 2 to score")
    if device is None:
        device = next(model.parameters()).device
    compat.canonical_lm_head_input(model)  # the scored slice without torch's lm_head weight copy
    nll, count, spans = 0.0, 0, windows(ids.numel(), context, stride)
    from ..progress import Progress, is_big

    # a few windows of a small model take a second (no lines); one window of a full-size model, minutes
    bar = Progress(ids.numel() - 1, "perplexity", "tokens", quiet=len(spans) < 4 and not is_big(model))
    for begin, end, first in spans:
        x = ids[begin:end - 1].unsqueeze(0).to(device)
        n_scored = end - first
        # logits at positions first-1 .. end-2 (the last n_scored fed) predict targets first .. end-1
        logits = model(input_ids=x, use_cache=False, logits_to_keep=n_scored).logits[0]
        w = nll_sum(logits, ids[first:end].to(logits.device))
        if not math.isfinite(w):  # stop at once: every later window of a broken model is lost time too
            bar.close()
            raise GlobeError(f"perplexity: the model's logits are not finite (nan/inf) in the window of tokens "
                             f"[{begin}, {end}) of {ids.numel()}: NaN/inf weights, or fp16 overflow (try "
                             f"eval.dtype=fp32 or bf16)")
        nll += w
        count += n_scored
        bar.update(n_scored)
    bar.close()
    mean = nll / count
    if mean > 700:  # exp would overflow float64 (e^709.8); such a model predicts nothing
        raise GlobeError(f"perplexity: the mean loss is {mean:.4g} nats per token, exp() of it overflows; the "
                         "logits are far out of range (broken or mis-scaled weights)")
    return {"perplexity": math.exp(mean), "nll_per_token": mean, "tokens": count, "nll_sum": nll,
            "windows": len(spans), "context": context, "stride": stride}
