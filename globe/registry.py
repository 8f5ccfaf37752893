"""Architecture registry: plain data keyed by `config.model_type`.

Why data, not classes: adding a Qwen2-style MoE should be one dict entry. Each entry names where the
routed experts, router, shared expert(s) and shared-expert gate live, both on disk (per-expert
tensors, `{layer}.{disk_block}.experts.{e}.{name}.weight`) and in memory (the transformers-5 fused
module `{layer}.{block}.experts` with the fused gate/up weight (`compat.GATE_UP`, (E, 2p, d)), gate
rows first, and `down_proj` (E, d, p)), and the rule that says which decoder layers are MoE.

Layer rules, exactly what the installed transformers classes build (their DecoderLayer __init__):
  sparse_step    MoE iff E > 0 and L not in mlp_only_layers and (L + 1) % decoder_sparse_step == 0  (Qwen)
  all            every layer is MoE                                                       (OLMoE, Mixtral)
  first_k_dense  MoE iff L >= first_k_dense_replace                                       (DeepSeek)
DeepSeek's original remote code also required L % moe_layer_freq == 0; transformers ignores
moe_layer_freq (every published checkpoint has 1), so a checkpoint written with another value has
no experts where transformers builds them, and the reader refuses it (globe/io/checkpoint.py).
`defaults` holds the transformers config class defaults of the keys these rules read, for a
config.json that omits them; tests/test_registry.py checks rules and defaults against transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import GlobeError


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    num_experts_key: str | tuple[str, ...]  # the config attribute, then its aliases (attribute_map)
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
    defaults: dict[str, Any] = field(default_factory=dict, hash=False)  # transformers defaults of the keys read


REGISTRY: dict[str, ArchSpec] = {
    "qwen2_moe": ArchSpec(
        "qwen2_moe", num_experts_key="num_experts", inter_key="moe_intermediate_size",
        layer_rule="sparse_step", shared="shared_expert", shared_gate="shared_expert_gate",
        shared_inter_key="shared_expert_intermediate_size",
        defaults={"num_experts": 60, "decoder_sparse_step": 1, "mlp_only_layers": []}),
    "qwen3_moe": ArchSpec(
        "qwen3_moe", num_experts_key=("num_local_experts", "num_experts"), inter_key="moe_intermediate_size",
        layer_rule="sparse_step",
        defaults={"num_local_experts": 128, "decoder_sparse_step": 1, "mlp_only_layers": []}),
    "olmoe": ArchSpec(
        "olmoe", num_experts_key=("num_experts", "num_local_experts"), inter_key="intermediate_size", layer_rule="all",
        defaults={"num_experts": 64}),
    "mixtral": ArchSpec(
        "mixtral", num_experts_key=("num_local_experts", "num_experts"), inter_key="intermediate_size",
        layer_rule="all", disk_block="block_sparse_moe", gate_name="w1", up_name="w3",
        down_name="w2", defaults={"num_local_experts": 8}),
    "deepseek_v2": ArchSpec(
        "deepseek_v2", num_experts_key=("n_routed_experts", "num_experts"), inter_key="moe_intermediate_size",
        layer_rule="first_k_dense", shared="shared_experts", n_shared_key="n_shared_experts",
        defaults={"n_routed_experts": 64, "first_k_dense_replace": 0}),
    "deepseek_v3": ArchSpec(
        "deepseek_v3", num_experts_key=("n_routed_experts", "num_local_experts"), inter_key="moe_intermediate_size",
        layer_rule="first_k_dense", shared="shared_experts", n_shared_key="n_shared_experts",
        defaults={"n_routed_experts": 256, "first_k_dense_replace": 3}),
}


def get_spec(model_type: str | None) -> ArchSpec:
    if model_type in REGISTRY:
        return REGISTRY[model_type]
    raise GlobeError(
        f"unsupported model_type {model_type!r}: known MoE types are {', '.join(sorted(REGISTRY))}; "
        "to add one, put an ArchSpec entry in globe/registry.py:REGISTRY")


def _int(spec: ArchSpec, cfg: dict[str, Any], key: str) -> int:
    v = cfg.get(key, spec.defaults.get(key))
    if not isinstance(v, int) or isinstance(v, bool):
        raise GlobeError(f"config.json: {key} must be an integer for {spec.model_type}, got {v!r}")
    return v


def moe_layers(spec: ArchSpec, cfg: dict[str, Any]) -> list[int]:
    """Decoder layers holding routed experts, as the installed transformers class builds them."""
    n_layers = int(cfg["num_hidden_layers"])
    if num_experts(spec, cfg) <= 0:
        return []
    if spec.layer_rule == "sparse_step":
        step = _int(spec, cfg, "decoder_sparse_step")
        if step < 1:
            raise GlobeError(f"config.json: decoder_sparse_step must be >= 1, got {step}")
        dense = cfg.get("mlp_only_layers", spec.defaults.get("mlp_only_layers")) or []
        return [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]
    if spec.layer_rule == "all":
        return list(range(n_layers))
    if spec.layer_rule == "first_k_dense":
        k = _int(spec, cfg, "first_k_dense_replace")
        return [i for i in range(n_layers) if i >= k]
    raise GlobeError(f"registry entry {spec.model_type}: unknown layer_rule {spec.layer_rule!r}")


def layer_rule_text(spec: ArchSpec, cfg: dict[str, Any]) -> str:
    """The rule with this config's values, for messages: 'first_k_dense_replace=1: MoE from layer 1 on'."""
    if spec.layer_rule == "sparse_step":
        step = cfg.get("decoder_sparse_step", spec.defaults.get("decoder_sparse_step"))
        dense = cfg.get("mlp_only_layers", spec.defaults.get("mlp_only_layers")) or []
        return f"decoder_sparse_step={step}, mlp_only_layers={list(dense)}"
    if spec.layer_rule == "first_k_dense":
        k = cfg.get("first_k_dense_replace", spec.defaults.get("first_k_dense_replace"))
        text = f"first_k_dense_replace={k}: MoE from layer {k} on"
        freq = cfg.get("moe_layer_freq", 1)
        if freq not in (1, None):
            text += f"; moe_layer_freq={freq} is ignored by transformers"
        return text
    return "every layer is MoE"


def num_experts(spec: ArchSpec, cfg: dict[str, Any]) -> int:
    """Routed experts per MoE layer: the config attribute or an alias of it (they must agree)."""
    keys = (spec.num_experts_key,) if isinstance(spec.num_experts_key, str) else spec.num_experts_key
    vals = {k: cfg[k] for k in keys if cfg.get(k) is not None}
    if len(set(map(str, vals.values()))) > 1:
        raise GlobeError(f"config.json: {' and '.join(f'{k}={v}' for k, v in vals.items())} disagree")
    if vals:
        v = next(iter(vals.values()))
    else:
        v = spec.defaults.get(keys[0], 0)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise GlobeError(f"config.json: {keys[0]} must be a non-negative integer, got {v!r}")
    return v


def top_k(spec: ArchSpec, cfg: dict[str, Any], where: str = "config.json") -> int:
    """Experts routed to per token (cfg[spec.top_k_key]); 0 when the config does not say. GlobeError when it
    is not an integer in [1, num_experts]: transformers would route k = 0 experts silently or fail in topk."""
    k = cfg.get(spec.top_k_key)
    if k is None:
        return 0
    E = num_experts(spec, cfg)
    keys = (spec.num_experts_key,) if isinstance(spec.num_experts_key, str) else spec.num_experts_key
    if E < 1 and any(key in cfg for key in keys):  # say so, rather than "top-k must be in [1, 0]"
        key = next(key for key in keys if key in cfg)
        raise GlobeError(f"{where}: {key}={cfg.get(key)!r}; a Mixture-of-Experts model needs >= 1 routed "
                         "expert per MoE layer")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= E:
        raise GlobeError(f"{where}: {spec.top_k_key}={k!r}; expected an integer in [1, {E}] "
                         "(experts routed to per token)")
    return k


def check_config(cfg: dict[str, Any], where: str = "config.json") -> None:
    """The MoE facts a model build relies on, checked before transformers reads them (registry types only):
    routed experts per layer and top-k. GlobeError naming `where` on the first bad value."""
    spec = REGISTRY.get(cfg.get("model_type"))
    if spec is not None:
        if spec.top_k_key in cfg and cfg[spec.top_k_key] is None:  # absent = transformers' default; null = no k
            raise GlobeError(f"{where}: {spec.top_k_key}=null; expected an integer in [1, {num_experts(spec, cfg)}] "
                             "(experts routed to per token)")
        top_k(spec, cfg, where)


def shared_width(spec: ArchSpec, cfg: dict[str, Any]) -> int:
    if spec.shared_inter_key:
        return int(cfg.get(spec.shared_inter_key) or 0)
    if spec.n_shared_key:
        return int(cfg.get(spec.n_shared_key) or 0) * int(cfg[spec.inter_key])
    return 0
