"""Greedy generation for a quick look at a model: original, dense export or GloBE export.

Why: `globe generate model.path=OUT prompt="..."` is the smoke test a user runs after export.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import compat
from ..common import resolve_device, to_dtype
from ..config import GlobeConfig
from ..errors import GlobeError
from ..io.checkpoint import resolve_path
from .load import load_model


@torch.no_grad()
def generate(cfg: GlobeConfig) -> str:
    """Greedy-decode cfg.generate.max_new_tokens tokens after cfg.generate.prompt on cfg.generate.device /
    dtype; returns prompt + continuation as text. The CLI entry of `globe.generate`."""
    g = cfg.generate
    if not g.prompt:
        raise GlobeError("prompt: give the text to continue (prompt=\"...\")")
    path = resolve_path(cfg.model.path, cfg.model.revision)
    tok = compat.load_tokenizer(path)
    enc = tok(g.prompt, return_tensors="pt")
    n_prompt = int(enc["input_ids"].shape[-1])
    conf_file = Path(path) / "config.json"
    conf = json.loads(conf_file.read_text()) if conf_file.is_file() else {}
    limit = conf.get("max_position_embeddings") if isinstance(conf, dict) else None
    if isinstance(limit, int) and n_prompt + int(g.max_new_tokens) > limit:  # before the model loads
        raise GlobeError(f"generate.max_new_tokens: the prompt's {n_prompt} tokens + {g.max_new_tokens} new "
                         f"exceed the model's max_position_embeddings={limit}")
    device = resolve_device(g.device, "generate.device")
    dtype = None if g.dtype == "auto" else g.dtype
    if cfg.artifacts:  # an original checkpoint with a fit directory: the same as globe eval artifacts=
        from ..eval.run import load_for_eval

        model = load_for_eval(cfg, device, to_dtype(dtype) if dtype else None)[0]
    else:
        model = load_model(path, device=device, dtype=dtype, cache=cfg.cache)
    enc = enc.to(device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    from ..progress import is_big

    streamer = _Progress(int(g.max_new_tokens)) if is_big(model) else None  # full size: seconds per token
    from transformers import LogitsProcessorList

    out = model.generate(**enc, max_new_tokens=int(g.max_new_tokens), do_sample=False, pad_token_id=pad,
                         streamer=streamer, logits_processor=LogitsProcessorList([_FiniteLogits(dtype)]))
    if streamer is not None:
        streamer.end()
    return tok.decode(out[0], skip_special_tokens=True)


class _FiniteLogits:
    """A transformers logits processor that stops generation at the first step whose scores hold NaN or
    +inf (NaN/inf weights, fp16 overflow): greedy decoding would otherwise print arbitrary tokens and exit
    0. -inf is left alone (processors mask tokens with it) unless every score of a row is -inf."""

    def __init__(self, dtype):
        self.dtype, self.step = dtype, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.step += 1
        bad = (scores.isnan() | scores.isposinf()).any() | scores.isneginf().all(-1).any()
        if bad:  # one host sync per step
            hint = " (fp16 overflows: try generate.dtype=bf16 or fp32)" if self.dtype == "fp16" else ""
            raise GlobeError(f"generate: the model's logits are not finite at new token {self.step} (NaN or inf "
                             f"weights, or an overflow){hint}")
        return scores


class _Progress:
    """A transformers generation streamer (put / end) that only counts new tokens into a Progress."""

    def __init__(self, total: int):
        from ..progress import Progress

        self.bar, self.prompt_seen = Progress(total, "generate", "tokens"), False

    def put(self, value) -> None:
        if self.prompt_seen:  # the first call carries the prompt
            self.bar.update(1)
        self.prompt_seen = True

    def end(self) -> None:
        self.bar.close()
