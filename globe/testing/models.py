"""Test and benchmark helper (not the compression API).
Models built in code: tiny ones for every registry entry, and one with real Qwen1.5-MoE dims.

Why: no model hub is reachable here, so tests and benchmarks build their models from configs.
`tiny_model(model_type)` gives a randomly initialised model of each registry architecture with
2-3 layers (one dense where the architecture has dense layers). `real_dim_model()` has the
Qwen1.5-MoE-A2.7B layer sizes (hidden 2048, 60 experts of width 1408, shared 5632, top-4) from
shared/reference, but a few layers and a small vocabulary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import compat
from ..fixtures import FIXTURE2_DIR, FIXTURE_DIR, fixture_info, fixture_path  # noqa: F401  (tests import them here too)

# Qwen1.5-MoE-A2.7B, from shared/reference/qwen1.5-moe-a2.7b-config.json.
QWEN15_MOE_A27B: dict[str, Any] = {
    "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632, "num_experts": 60, "num_experts_per_tok": 4,
    "norm_topk_prob": False, "decoder_sparse_step": 1, "num_attention_heads": 16,
    "num_key_value_heads": 16, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False,
    "hidden_act": "silu",
}

_COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=2,
               num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)

TINY: dict[str, dict[str, Any]] = {  # model_type -> its tiny config (classes: compat.base_classes)
    "qwen2_moe": dict(
        num_hidden_layers=3, moe_intermediate_size=24, shared_expert_intermediate_size=48,
        num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1], decoder_sparse_step=1),
    "qwen3_moe": dict(
        num_hidden_layers=3, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
        mlp_only_layers=[0], decoder_sparse_step=1, head_dim=16),
    "olmoe": dict(
        num_hidden_layers=2, intermediate_size=24, num_experts=6, num_experts_per_tok=2),
    "mixtral": dict(
        num_hidden_layers=2, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2),
    "deepseek_v2": dict(
        num_hidden_layers=3, moe_intermediate_size=24, n_routed_experts=6, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1),
    "deepseek_v3": dict(
        num_hidden_layers=3, moe_intermediate_size=24, n_routed_experts=6, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1),
}


def _classes(model_type: str):
    return (*compat.base_classes(model_type), TINY[model_type])


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised tiny model of a registry architecture (eval mode)."""
    cfg_cls, model_cls, extra = _classes(model_type)
    cfg = cfg_cls(**{**_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(cfg).to(dtype).eval()
    # Random init leaves routers at zero in some classes: give them signal so routing is non-trivial.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.abs().sum() == 0 and p.ndim >= 1 and "bias" not in name:
                p.normal_(0, 0.02 if p.ndim > 1 else 1.0)
    return model


def real_dim_model(num_layers: int = 2, vocab_size: int = 1024, seed: int = 0,
                   dtype: torch.dtype = torch.bfloat16, num_experts: int | None = None, random: bool = True):
    """Qwen2-MoE with Qwen1.5-MoE-A2.7B layer dimensions, a few layers, random weights.

    random=False leaves the weights at zero (fast; for shape/count tests only).
    """
    Qwen2MoeConfig, Qwen2MoeForCausalLM = compat.base_classes("qwen2_moe")
    kw = {**QWEN15_MOE_A27B, "num_hidden_layers": num_layers, "vocab_size": vocab_size,
          "max_position_embeddings": 4096, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if num_experts is not None:
        kw["num_experts"] = num_experts
    cfg = Qwen2MoeConfig(**kw)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Qwen2MoeForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not random:
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) / fan_in**0.5)
    model.model.rotary_emb.__init__(cfg)  # recompute the non-persistent inv_freq buffer
    return model.eval()


def save_model(model, path: str | Path) -> Path:
    path = Path(path)
    model.save_pretrained(path)
    return path
