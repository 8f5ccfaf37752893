"""CUDA parity (skipped without a GPU): the patched model and a short fit agree with the CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from globe.config import CacheCfg
from globe.runtime import patch_model
from globe.testing.artifacts import random_artifacts
from globe.testing.models import tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("mode", ["full", "lru", "none"])
def test_patched_logits_cuda_match_cpu(mode):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model("qwen2_moe")
    arts = random_artifacts(model, m=5, r=8, support=3, seed=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    cpu = patch_model(copy.deepcopy(model), arts, cache=CacheCfg(mode=mode, S_per_layer=2))
    gpu = patch_model(copy.deepcopy(model).cuda(), arts, cache=CacheCfg(mode=mode, S_per_layer=2))
    with torch.no_grad():
        a, b = cpu(ids).logits, gpu(ids.cuda()).logits.cpu()
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_fit_on_cuda_close_to_cpu(tmp_path):
    from globe.config import GlobeConfig
    from globe.fit.run import run_fit
    from globe.testing.models import save_model

    path = save_model(tiny_model("qwen2_moe"), tmp_path / "m")
    errs = {}
    for dev in ("cpu", "cuda"):
        cfg = GlobeConfig.from_dict({"model": {"path": str(path)}, "output_dir": str(tmp_path / dev),
                                     "bank": {"m_up": 4, "m_gate": 4, "r": 8}, "sparsity": {"target_support": 2},
                                     "train": {"steps": 40, "batch_size": 8, "device": dev, "baselines": False}})
        errs[dev] = run_fit(cfg, progress=False)["families"]["up"]["rel_fro_error"]
    assert errs["cuda"] == pytest.approx(errs["cpu"], rel=0.05)


@pytest.mark.parametrize("mode", ["full", "lru", "none"])
def test_patched_model_moves_to_cuda_and_casts(mode):
    """patch on the CPU, then .to('cuda') and .half(): caches, adapters, banks follow; modes agree."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model("qwen2_moe")
    arts = random_artifacts(model, m=5, r=8, support=3, seed=2, banks=2)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = patch_model(copy.deepcopy(model), arts, cache=CacheCfg(mode=mode, S_per_layer=2, warmup_tokens=0))
    with torch.no_grad():
        want = ref(ids).logits
        ref(ids)  # fill the LRU on the CPU: those blocks must not survive the move
        moved = ref.to("cuda")
        got = moved(ids.cuda()).logits.cpu()
        assert all(b.device.type == "cuda" for b in moved.globe.buffers())
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
        half = moved.half()(ids.cuda()).logits.float().cpu()
    assert torch.allclose(half, want, atol=5e-2, rtol=5e-2)


def test_load_model_on_cuda_equals_cpu(tmp_path):
    from globe.config import GlobeConfig
    from globe.runtime.export import run_export as export
    from globe.runtime.load import load_model
    from globe.testing.models import save_model

    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model("qwen2_moe")
    src = save_model(model, tmp_path / "src")
    random_artifacts(model, m=5, r=8, support=3, seed=3).save(tmp_path / "arts")
    out = export(GlobeConfig.from_dict({"model": {"path": str(src)}, "artifacts": str(tmp_path / "arts"),
                                        "output_dir": str(tmp_path / "g"), "export": {"dtype": "fp32"}}))
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = load_model(out)(ids).logits
        b = load_model(out, device="cuda")(ids.cuda()).logits.cpu()
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
