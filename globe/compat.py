"""Every contact point with transformers internals, in one file.

Why: transformers moves fast (v5 fused the per-expert Linear layers into one experts module whose
forward is dispatched by `@use_experts_implementation`, see transformers/integrations/moe.py). The
runtime relies on exactly these facts, checked here and nowhere else:

  - decoder layers live at `model.<spec.layers_prefix>` (e.g. model.model.layers), the MoE block at
    `layer.<spec.block>` and its routed experts at `block.experts`;
  - the experts module holds `gate_up_proj` (E, 2p, d), gate rows first, and `down_proj` (E, d, p),
    no bias, not transposed, and an `act_fn`; the decorator stores its config at `.config`;
  - its forward is `(hidden_states (T, d), top_k_index (T, k), top_k_weights (T, k)) -> (T, d)`.

It also builds models without materialising their weights (`empty_model`) and records routing.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import GlobeError
from .registry import ArchSpec, get_spec, moe_layers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def to_dtype(name: str | torch.dtype | None, default: torch.dtype | None = None) -> torch.dtype | None:
    """'bf16' | 'fp16' | 'fp32' | 'auto' | torch.dtype -> torch.dtype ('auto'/None -> default)."""
    if name is None or name == "auto":
        return default
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise GlobeError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def text_config(config: Any) -> Any:
    """The language-model config (multimodal wrappers keep it under text_config)."""
    if hasattr(config, "num_hidden_layers"):
        return config
    return getattr(config, "text_config", None) or config


def model_spec(model: nn.Module) -> ArchSpec:
    return get_spec(getattr(text_config(model.config), "model_type", None))


def moe_layer_ids(model: nn.Module) -> list[int]:
    """Decoder-layer indices holding a routed-experts block, by the registry's rule."""
    return moe_layers(model_spec(model), text_config(model.config).to_dict())


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    obj: Any = model
    for part in model_spec(model).layers_prefix.split("."):
        if not hasattr(obj, part):
            raise GlobeError(f"{type(model).__name__} has no attribute path {model_spec(model).layers_prefix!r}")
        obj = getattr(obj, part)
    return obj


def experts_path(model: nn.Module, layer: int) -> str:
    """Qualified name of a layer's experts module, e.g. 'model.layers.3.mlp.experts'."""
    s = model_spec(model)
    return f"{s.layers_prefix}.{layer}.{s.block}.experts"


def get_experts(model: nn.Module, layer: int) -> nn.Module:
    block = getattr(decoder_layers(model)[layer], model_spec(model).block, None)
    if block is None or not hasattr(block, "experts"):
        raise GlobeError(f"layer {layer} has no MoE block '{model_spec(model).block}.experts'")
    return block.experts


def set_experts(model: nn.Module, layer: int, module: nn.Module) -> None:
    block = getattr(decoder_layers(model)[layer], model_spec(model).block)
    block.experts = module


@dataclass
class ExpertsInfo:
    num_experts: int
    p: int  # expert intermediate width
    d: int  # hidden size
    dtype: torch.dtype
    device: torch.device
    act_fn: nn.Module
    cls: type  # the transformers experts class, rebuilt by to_dense()
    config: Any  # config the class is constructed from


def experts_info(mod: nn.Module) -> ExpertsInfo:
    """Shapes, dtype, device and activation of a transformers-5 fused experts module."""
    gu, dn = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(dn, torch.Tensor) or gu.ndim != 3 or dn.ndim != 3:
        raise GlobeError(f"{type(mod).__name__}: expected fused experts with gate_up_proj (E, 2p, d) and "
                         "down_proj (E, d, p); this transformers class uses another layout")
    if getattr(mod, "has_bias", False) or getattr(mod, "is_transposed", False) or not getattr(mod, "has_gate", True):
        raise GlobeError(f"{type(mod).__name__}: biased, transposed or gate-less experts are not supported")
    if not getattr(mod, "is_concatenated", True):
        raise GlobeError(f"{type(mod).__name__}: interleaved gate/up rows are not supported")
    E, p2, d = gu.shape
    if dn.shape != (E, d, p2 // 2):
        raise GlobeError(f"{type(mod).__name__}: down_proj {tuple(dn.shape)} does not match "
                         f"gate_up_proj {tuple(gu.shape)}")
    return ExpertsInfo(E, p2 // 2, d, gu.dtype, gu.device, mod.act_fn, type(mod), getattr(mod, "config", None))


def plain_experts(info: ExpertsInfo, gate_up: torch.Tensor, down: torch.Tensor | nn.Parameter) -> nn.Module:
    """A transformers experts module of class `info.cls` holding the given weights (no extra copies)."""
    if info.config is None:
        raise GlobeError(f"{info.cls.__name__}: no config recorded; cannot rebuild a dense experts module")
    with torch.device("meta"):
        mod = info.cls(info.config)
    mod.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
    mod.down_proj = down if isinstance(down, nn.Parameter) else nn.Parameter(down, requires_grad=False)
    mod.act_fn = info.act_fn
    return mod.eval()


# ---- names on disk vs in memory -------------------------------------------------------------------
def memory_name(spec: ArchSpec, name: str) -> str:
    """In-memory (transformers) name of a non-expert tensor stored on disk as `name`.

    transformers renames a few blocks on load (Mixtral's `block_sparse_moe` -> `mlp`); the registry's
    disk_block/block pair records it. Routed experts are fused on load instead: see `layer_state`.
    """
    if spec.disk_block != spec.block:
        pre = re.escape(spec.layers_prefix)
        name = re.sub(rf"^({pre}\.\d+)\.{re.escape(spec.disk_block)}\.", rf"\1.{spec.block}.", name)
    return name


def experts_prefix(spec: ArchSpec, layer: int) -> str:
    """In-memory prefix of a layer's fused experts module, e.g. 'model.layers.3.mlp.experts'."""
    return f"{spec.layers_prefix}.{layer}.{spec.block}.experts"


def layer_state(ck: Any, layer: int, dtype: torch.dtype | None = None,
                experts: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of decoder layer `layer` from a `globe.io.checkpoint.Checkpoint`, in-memory names.

    Routed experts of an MoE layer come fused as transformers 5 holds them: `...experts.gate_up_proj`
    (E, 2p, d), gate rows first, and `...experts.down_proj` (E, d, p) (skipped with experts=False).
    dtype: cast floating tensors (None keeps the stored dtype). Peak memory: one layer.
    """
    spec = ck.spec
    pre = f"{spec.layers_prefix}.{layer}."
    skip = ck.expert_tensor_names() if layer in ck.moe_layers else set()

    out = {memory_name(spec, k): ck.tensor(k, dtype) for k in ck.keys() if k.startswith(pre) and k not in skip}
    if experts and layer in ck.moe_layers:
        E = ck.num_experts
        first = ck.expert(layer, 0, "up", dtype)
        dt = dtype or first.dtype
        gu = torch.empty((E, 2 * ck.p, ck.hidden_size), dtype=dt)
        dn = torch.empty((E, ck.hidden_size, ck.p), dtype=dt)
        for e in range(E):
            gu[e, :ck.p] = ck.expert(layer, e, "gate", dtype)
            gu[e, ck.p:] = ck.expert(layer, e, "up", dtype)
            dn[e] = ck.expert(layer, e, "down", dtype)
        fp = experts_prefix(spec, layer)
        out[f"{fp}.gate_up_proj"], out[f"{fp}.down_proj"] = gu, dn
    return out


# ---- building and loading models -------------------------------------------------------------------
@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (no memory) while buffers (rotary inv_freq) stay real."""
    old = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        old(self, name, param)
        if param is not None:
            cls, kw = type(self._parameters[name]), self._parameters[name].__dict__
            self._parameters[name] = cls(self._parameters[name].to("meta"), requires_grad=param.requires_grad, **kw)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = old  # type: ignore[method-assign]


def empty_model(config: Any, dtype: torch.dtype) -> nn.Module:
    """AutoModelForCausalLM from a config with every parameter on meta: fill it with `assign_weights`."""
    from transformers import AutoModelForCausalLM

    with _params_on_meta(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def assign_weights(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load `tensors` by name (no copy), tie embeddings, and insist that nothing is left on meta."""
    own = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    unknown = [k for k in tensors if k not in own]
    if unknown:
        raise GlobeError(f"{where}: tensor {unknown[0]} does not belong to this model "
                         f"({len(unknown)} unexpected)")
    model.load_state_dict(tensors, strict=False, assign=True)
    cfg = model.config
    if getattr(text_config(cfg), "tie_word_embeddings", False) or getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise GlobeError(f"{where}: missing tensor {left[0]} ({len(left)} missing): file truncated or incomplete")


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """Plain transformers model from a local directory (dtype None = as stored), eval mode."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype if dtype is not None else "auto")
        except (OSError, ValueError, KeyError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise GlobeError(f"cannot load model from {path}: {msg}") from None
    if device is not None:
        model = model.to(device)
    return model.eval()


def config_from_dict(d: dict[str, Any]) -> Any:
    """A transformers config object from a config.json dict (as AutoConfig.from_pretrained would build it)."""
    from transformers import CONFIG_MAPPING

    mt = d.get("model_type")
    if mt not in CONFIG_MAPPING:
        raise GlobeError(f"model_type {mt!r} is not known to the installed transformers")
    return CONFIG_MAPPING[mt].from_dict(dict(d))


def load_config(path: str | Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise GlobeError(f"cannot read config.json in {path}: {str(e).splitlines()[0]}") from None


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Collect each MoE layer's top_k_index (T, k) per forward call: {layer: [tensor, ...]}."""
    trace: dict[int, list[torch.Tensor]] = {L: [] for L in moe_layer_ids(model)}
    hooks = []
    for L in trace:
        def pre(mod, args, kwargs, L=L):
            idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
            trace[L].append(idx.detach().to("cpu", copy=True))
        hooks.append(get_experts(model, L).register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield trace
    finally:
        for h in hooks:
            h.remove()
