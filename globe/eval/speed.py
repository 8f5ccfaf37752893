"""Prefill and decode throughput at batch 1 with a KV cache, plus peak memory.

Why a manual greedy loop: `generate` may stop at EOS and adds sampling machinery; a loop of
single-token forwards with `past_key_values` times exactly `decode_tokens` steps. A warmup at the same
prompt length (prefill + a few decode steps) runs first and is not timed: the first forward at a new
length is many times slower (allocator, kernel selection, mask construction). Then `repeats` timed
runs; the reported times are their medians.

Peak memory, per device:
  cpu   peak resident set size (RSS) of the whole process during the timed prefill + decode, sampled
        every 2 ms by a background thread with psutil (so it includes the weights; a spike shorter than
        the sampling period can be missed). ru_maxrss is not used: it cannot be reset per run.
  cuda  torch.cuda.max_memory_allocated after reset_peak_memory_stats (tensors only, not the
        allocator's reserve).
  mps   torch.mps.current_allocated_memory after the run (MPS has no peak counter).

Token ids are random (seeded) in [0, vocab): throughput does not depend on the text.
"""

from __future__ import annotations

import os
import statistics
import threading
import time

import torch

from .. import compat
from ..common import sync
from ..errors import GlobeError
from .perplexity import max_positions


class RssSampler:
    """Peak RSS of this process while active, sampled by a daemon thread."""

    def __init__(self, period: float = 0.002):
        import psutil

        self.proc = psutil.Process(os.getpid())
        self.period = period
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.period)

    def __enter__(self) -> RssSampler:
        self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _run(model, prompt: torch.Tensor, n_decode: int, device: torch.device) -> tuple[float, float]:
    """Prefill `prompt` (1, N), then greedily decode n_decode tokens. Returns (prefill_s, decode_s)."""
    sync(device)
    t0 = time.perf_counter()
    nxt, past = compat.decode_step(model, prompt, None)
    sync(device)
    t1 = time.perf_counter()
    for _ in range(n_decode):
        nxt, past = compat.decode_step(model, nxt, past)
    sync(device)
    return t1 - t0, time.perf_counter() - t1


@torch.no_grad()
def measure_speed(model, prefill_tokens: int = 512, decode_tokens: int = 64, seed: int = 0,
                  warmup: bool = True, repeats: int = 3) -> dict:
    """Batch-1 prefill tok/s at `prefill_tokens` and decode tok/s over `decode_tokens` greedy steps.

    Returns {prefill_tok_s, decode_tok_s, prefill_s, decode_s (medians over `repeats`), prefill_tokens,
    decode_tokens, repeats, peak_mem_bytes, peak_mem_kind, device}. The model must sit on its device, in eval mode.
    """
    n, k = int(prefill_tokens), int(decode_tokens)
    if n < 1 or k < 1:
        raise GlobeError(f"eval.prefill_tokens and eval.decode_tokens must be >= 1, got {n} and {k}")
    limit = max_positions(model)
    if limit is not None and n + k > limit:
        raise GlobeError(f"eval.prefill_tokens + eval.decode_tokens = {n + k} exceeds the model's "
                         f"max_position_embeddings={limit}")
    compat.canonical_lm_head_input(model)  # each prefill keeps 1 position: no lm_head weight copy
    param = next(model.parameters())
    device = param.device
    cfg = getattr(model.config, "text_config", None) or model.config
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, int(cfg.vocab_size), (1, n), generator=g).to(device)
    from ..progress import Progress, is_big

    runs = max(1, int(repeats))
    bar = Progress(runs + bool(warmup), "speed (prefill + decode runs)", "runs", quiet=not is_big(model))
    if warmup:
        _run(model, prompt, min(k, 4), device)
        bar.update()

    def timed() -> list[tuple[float, float]]:
        out = []
        for _ in range(runs):
            out.append(_run(model, prompt, k, device))
            bar.update()
        return out

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        times = timed()
        peak, kind = int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    elif device.type == "mps":
        times = timed()
        peak, kind = int(torch.mps.current_allocated_memory()), "mps_current_allocated"
    else:
        with RssSampler() as rss:
            times = timed()
        peak, kind = int(rss.peak), "cpu_peak_rss"
    bar.close()
    pre_s = statistics.median(t[0] for t in times)
    dec_s = statistics.median(t[1] for t in times)
    return {"prefill_tok_s": n / pre_s, "decode_tok_s": k / dec_s, "prefill_s": pre_s, "decode_s": dec_s,
            "prefill_tokens": n, "decode_tokens": k, "repeats": len(times), "peak_mem_bytes": peak,
            "peak_mem_kind": kind, "device": device.type}
