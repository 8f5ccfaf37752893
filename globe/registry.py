"""Architecture registry: plain data keyed by `config.model_type`.

Why data, not classes: adding a Qwen2-style MoE should be one dict entry. Each entry names where the
routed experts, router, shared expert(s) and shared-expert gate live, both on disk (per-expert
tensors, `{layer}.{disk_block}.experts.{e}.{name}.weight`) and in memory (the transformers-5 fused
module `{layer}.{block}.experts` with `gate_up_proj` (E, 2p, d), gate rows first, and `down_proj`
(E, d, p)), and the rule that says which decoder layers are MoE.

Layer rules:
  sparse_step    MoE iff L not in mlp_only_layers and (L + 1) % decoder_sparse_step == 0  (Qwen)
  all            every layer is MoE                                                       (OLMoE, Mixtral)
  first_k_dense  MoE iff L >= first_k_dense_replace and L % moe_layer_freq == 0           (DeepSeek)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import GlobeError


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    num_experts_key: str | tuple[str, ...]  # first key present in config.json wins
    inter_key: str  # routed expert width p
    layer_rule: str
    top_k_key: str = "num_experts_per_tok"
    block: str = "mlp"  # in-memory attribute of the decoder layer
    disk_block: str = "mlp"  # on-disk name of the same block
    gate_name: str = "gate_proj"  # per-expert on-disk names
    up_name: str = "up_proj"
    down_name: str = "down_proj"
    router: str = "gate"  # router module inside the block (weight (E, d))
    shared: str | None = None  # shared expert module inside the block
    shared_gate: str | None = None  # sigmoid gate of the shared expert
    shared_inter_key: str | None = None  # width of the shared expert ...
    n_shared_key: str | None = None  # ... or n_shared_experts * inter_key
    layers_prefix: str = "model.layers"


REGISTRY: dict[str, ArchSpec] = {
    "qwen2_moe": ArchSpec(
        "qwen2_moe", num_experts_key=("num_experts", "num_local_experts"), inter_key="moe_intermediate_size",
        layer_rule="sparse_step", shared="shared_expert", shared_gate="shared_expert_gate",
        shared_inter_key="shared_expert_intermediate_size"),
    "qwen3_moe": ArchSpec(
        "qwen3_moe", num_experts_key=("num_experts", "num_local_experts"), inter_key="moe_intermediate_size",
        layer_rule="sparse_step"),
    "olmoe": ArchSpec(
        "olmoe", num_experts_key=("num_experts", "num_local_experts"), inter_key="intermediate_size", layer_rule="all"),
    "mixtral": ArchSpec(
        "mixtral", num_experts_key="num_local_experts", inter_key="intermediate_size",
        layer_rule="all", disk_block="block_sparse_moe", gate_name="w1", up_name="w3",
        down_name="w2"),
    "deepseek_v2": ArchSpec(
        "deepseek_v2", num_experts_key="n_routed_experts", inter_key="moe_intermediate_size",
        layer_rule="first_k_dense", shared="shared_experts", n_shared_key="n_shared_experts"),
    "deepseek_v3": ArchSpec(
        "deepseek_v3", num_experts_key="n_routed_experts", inter_key="moe_intermediate_size",
        layer_rule="first_k_dense", shared="shared_experts", n_shared_key="n_shared_experts"),
}


def get_spec(model_type: str | None) -> ArchSpec:
    if model_type in REGISTRY:
        return REGISTRY[model_type]
    raise GlobeError(
        f"unsupported model_type {model_type!r}: known MoE types are {', '.join(sorted(REGISTRY))}; "
        "to add one, put an ArchSpec entry in globe/registry.py:REGISTRY")


def moe_layers(spec: ArchSpec, cfg: dict[str, Any]) -> list[int]:
    n_layers = int(cfg["num_hidden_layers"])
    n_exp = num_experts(spec, cfg)
    if n_exp <= 0:
        return []
    if spec.layer_rule == "sparse_step":
        step = int(cfg.get("decoder_sparse_step", 1) or 1)
        dense = set(cfg.get("mlp_only_layers") or [])
        return [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]
    if spec.layer_rule == "all":
        return list(range(n_layers))
    if spec.layer_rule == "first_k_dense":
        k = int(cfg.get("first_k_dense_replace", 0) or 0)
        freq = int(cfg.get("moe_layer_freq", 1) or 1)
        return [i for i in range(n_layers) if i >= k and i % freq == 0]
    raise GlobeError(f"registry entry {spec.model_type}: unknown layer_rule {spec.layer_rule!r}")


def num_experts(spec: ArchSpec, cfg: dict[str, Any]) -> int:
    keys = (spec.num_experts_key,) if isinstance(spec.num_experts_key, str) else spec.num_experts_key
    for k in keys:
        if cfg.get(k):
            return int(cfg[k])
    return 0


def shared_width(spec: ArchSpec, cfg: dict[str, Any]) -> int:
    if spec.shared_inter_key:
        return int(cfg.get(spec.shared_inter_key) or 0)
    if spec.n_shared_key:
        return int(cfg.get(spec.n_shared_key) or 0) * int(cfg[spec.inter_key])
    return 0
