"""Speed and memory: sane positive numbers on CPU (no timing thresholds), limits, device/dtype rules."""

from __future__ import annotations

import math

import pytest
import torch

from globe.common import dtype_name, resolve_device, resolve_dtype
from globe.errors import GlobeError
from globe.eval.speed import RssSampler, measure_speed
from globe.testing.models import tiny_model


def test_speed_and_memory_are_sane():
    model = tiny_model("qwen2_moe")
    res = measure_speed(model, prefill_tokens=24, decode_tokens=6)
    for k in ("prefill_tok_s", "decode_tok_s", "prefill_s", "decode_s"):
        assert math.isfinite(res[k]) and res[k] > 0, k
    assert res["prefill_tok_s"] == pytest.approx(24 / res["prefill_s"])
    assert res["decode_tok_s"] == pytest.approx(6 / res["decode_s"])
    assert res["peak_mem_kind"] == "cpu_peak_rss" and res["device"] == "cpu"
    assert 10 * 2**20 < res["peak_mem_bytes"] < 64 * 2**30  # a Python process with torch loaded


def test_rss_sampler_sees_a_transient_allocation():
    with RssSampler() as base:
        pass
    with RssSampler(period=0.001) as s:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        x += 1
        import time

        time.sleep(0.05)
        del x
    assert s.peak >= base.peak + 32 * 2**20


def test_speed_rejects_too_long_runs():
    model = tiny_model("qwen2_moe")  # max_position_embeddings = 128
    with pytest.raises(GlobeError, match="exceeds"):
        measure_speed(model, prefill_tokens=120, decode_tokens=16)
    with pytest.raises(GlobeError, match=">= 1"):
        measure_speed(model, prefill_tokens=0, decode_tokens=4)


def test_device_dtype_resolution():
    dev = resolve_device("auto")
    assert dev.type in ("cpu", "cuda", "mps")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert dtype_name(torch.float16) == "fp16"
    if not torch.cuda.is_available():
        with pytest.raises(GlobeError, match="cuda"):
            resolve_device("cuda")
