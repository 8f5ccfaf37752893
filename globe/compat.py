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
import functools
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .common import count_non_finite
from .errors import GlobeError
from .registry import ArchSpec, check_config, get_spec, moe_layers


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


# The fused layout's names and row order (transformers 5; also the on-disk names of fused checkpoints).
GATE_UP, DOWN = "gate_up_proj", "down_proj"
GATE_UP_ORDER = ("gate", "up")  # row blocks of gate_up_proj (E, 2p, d): gate rows first


def gate_up_weight(mod: nn.Module) -> torch.Tensor:
    """The fused (E, 2p, d) [gate; up] weight of a transformers experts module (detached)."""
    return getattr(mod, GATE_UP).detach()


def family_rows(gate_up: torch.Tensor, family: str) -> torch.Tensor:
    """The rows of `family` ('gate' | 'up') in a fused (..., 2p, d) [gate; up] tensor: a view (..., p, d)."""
    p = gate_up.shape[-2] // 2
    i = GATE_UP_ORDER.index(family)
    return gate_up[..., i * p:(i + 1) * p, :]


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """(..., p, d) gate and up -> the fused (..., 2p, d) [gate; up] tensor transformers holds."""
    parts = {"gate": gate, "up": up}
    return torch.cat([parts[f] for f in GATE_UP_ORDER], dim=-2)


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


def check_model_config(path: str | Path) -> None:
    """The MoE facts of `path`/config.json that transformers would misuse silently (top-k 0) or report as
    something else (a tokenizer error), checked before anything reads it: registry.check_config on the
    config (a globe export's on its base model type). No config.json: nothing to check."""
    from .io.checkpoint import read_config

    conf = Path(path) / "config.json"
    if not conf.is_file():
        return
    cfg = read_config(Path(path))
    mt, meta = cfg.get("model_type"), cfg.get("globe")
    from .runtime.export import GLOBE_PREFIX

    if isinstance(mt, str) and mt.startswith(GLOBE_PREFIX):  # a globe export: its base architecture's keys
        base = meta.get("base_model_type") if isinstance(meta, dict) else None
        cfg = {**cfg, "model_type": base or mt.removeprefix(GLOBE_PREFIX)}
    check_config(cfg, str(conf))
    from transformers import CONFIG_MAPPING

    if cfg.get("model_type") in CONFIG_MAPPING:  # transformers' own validation, blamed on config.json
        config_from_dict({k: v for k, v in cfg.items() if k != "globe"}, str(conf))


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """Plain transformers model from a local directory (dtype None = as stored), eval mode.
    Raises GlobeError when the model cannot be built or a weight it needs is absent from the checkpoint."""
    from transformers import AutoModelForCausalLM

    check_model_config(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # its load report (missing/mismatched tensors) would print a table before our one-line error: quiet,
            # with mismatches returned in `info` instead of raised, and refused below
            with _quiet_transformers():
                model, info = AutoModelForCausalLM.from_pretrained(
                    str(path), dtype=dtype if dtype is not None else "auto", output_loading_info=True,
                    ignore_mismatched_sizes=True)
        except Exception as e:  # OSError, ValueError, safetensors' SafetensorError on a damaged shard, ...
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise GlobeError(f"cannot load model from {path}: {type(e).__name__}: {msg[:200]}") from None
    # transformers re-initialises a mismatched weight (ignore_mismatched_sizes) or one the checkpoint lacks at
    # random and only logs it: refuse both instead
    mism = sorted(info.get("mismatched_keys") or [])
    if mism:
        k = mism[0] if isinstance(mism[0], str) else mism[0][0]
        shapes = f" (checkpoint {list(mism[0][1])}, model {list(mism[0][2])})" if not isinstance(mism[0], str) \
            and len(mism[0]) == 3 else ""
        raise GlobeError(f"{path}: tensor {k} does not match config.json{shapes} ({len(mism)} mismatched)")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise GlobeError(f"{path}: checkpoint lacks tensor {missing[0]} ({len(missing)} missing): "
                         "transformers would initialise it randomly; file truncated or incomplete")
    for name, prm in model.named_parameters():  # torch's CPU attention can turn a NaN weight into finite logits
        bad = count_non_finite(prm.detach())
        if bad:
            raise GlobeError(f"{path}: weight {name} holds {bad} NaN/inf value(s): the checkpoint is damaged")
    if device is not None:
        model = model.to(device)
    return model.eval()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' logger at ERROR for the duration (its warnings about our own config are noise)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_tokenizer(path: str | Path, purpose: str = "") -> Any:
    """The tokenizer saved with a model directory; GlobeError naming the directory when there is none."""
    from transformers import AutoTokenizer

    d = Path(path).expanduser()
    if not d.exists() and (str(path).startswith((".", "/", "~")) or str(path).count("/") != 1):
        raise GlobeError(f"model path not found: {path}")  # not a hub id: the hub's repo-id error would confuse
    if d.is_dir():
        check_model_config(d)  # AutoTokenizer reads config.json too: its errors would blame the tokenizer
    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
    if d.is_dir() and not any((d / f).is_file() for f in files):
        why = f" for {purpose}" if purpose else ""
        raise GlobeError(f"no tokenizer files in {d} ({', '.join(files[:2])}, ...){why}")
    try:
        # trust_remote_code=False: a globe export's auto_map names only the model's classes; without it
        # transformers asks on stdout whether to run the export's code just to read its tokenizer files
        # (transformers also warns that a `globe_<base>` config "instantiates a model of type ``" while it
        # looks for the tokenizer class: true and harmless here, so its logger is quiet for this call)
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:  # missing or unreadable tokenizer files raise many types across versions
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GlobeError(f"cannot load a tokenizer from {path}{' for ' + purpose if purpose else ''}: "
                         f"{msg[:200]}") from None


def config_from_dict(d: dict[str, Any], where: str = "config.json") -> Any:
    """A transformers config object from a config.json dict (as AutoConfig.from_pretrained would build it).
    GlobeError naming `where` for an unknown model_type, a bad MoE fact (registry.check_config) or a value
    transformers' own validation refuses."""
    from transformers import CONFIG_MAPPING

    check_config(d, where)
    mt = d.get("model_type")
    if mt not in CONFIG_MAPPING:
        raise GlobeError(f"model_type {mt!r} is not known to the installed transformers")
    try:
        return CONFIG_MAPPING[mt].from_dict(dict(d))
    except Exception as e:  # ValueError, TypeError, huggingface_hub's strict-dataclass validation errors
        msg = str(e).replace("\n", " ")[:200] if str(e) else type(e).__name__
        raise GlobeError(f"{where}: transformers refuses this config: {msg}") from None


def load_config(path: str | Path) -> Any:
    """transformers' config of a local model directory; GlobeError for a bad MoE fact or a value it refuses."""
    from transformers import AutoConfig

    if Path(path).is_dir():
        check_model_config(path)
    try:
        return AutoConfig.from_pretrained(str(path))
    except Exception as e:  # OSError, ValueError, KeyError, huggingface_hub's strict-dataclass errors, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GlobeError(f"cannot read config.json in {path}: {msg[:200]}") from None


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


# ---- one decoder layer at a time (layer-wise calibration) ------------------------------------------
# Sequential onloading, as llm-compressor's sequential pipeline does: the model skeleton lives on the
# meta device; the model's OWN forward computes what every decoder layer receives (attention masks per
# layer type, rotary position embeddings, position ids) while each layer's forward is replaced by a
# recorder, so nothing here re-implements masks or rotary embeddings for any architecture. Then each
# layer is built from the checkpoint, run on the recorded inputs and freed. Facts relied on: decoder
# layers are called in order as `layer(hidden_states, *args, **kwargs)` and return the hidden states
# (a tensor or a tuple whose first item is); the base model accepts `inputs_embeds`.
class _StopForward(Exception):
    """Raised by the last recorder: the rest of the model (final norm, lm_head) is never run."""


def base_model(model: nn.Module) -> nn.Module:
    """The module that owns the decoder layers (e.g. model.model for `model.layers`)."""
    obj: Any = model
    for part in model_spec(model).layers_prefix.split(".")[:-1]:
        obj = getattr(obj, part)
    return obj


def embed_inputs(model: nn.Module, ck: Any, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Input embeddings (1, t, d) of token ids (t,), read from checkpoint `ck` (the table is freed after)."""
    emb = model.get_input_embeddings()
    name = next((n for n, m in model.named_modules() if m is emb), None)
    disk = {memory_name(ck.spec, k): k for k in ck.keys()}
    key = disk.get(f"{name}.weight")
    if key is None:
        raise GlobeError(f"{ck.dir}: input embedding {name}.weight not found in the checkpoint")
    table = ck.tensor(key)
    return torch.nn.functional.embedding(ids.long(), table)[None].to(dtype)


def layer_inputs(model: nn.Module, inputs_embeds: torch.Tensor, upto: int) -> tuple[torch.Tensor, list]:
    """What the model's forward hands decoder layers 0..upto for one sequence, without running any layer.

    inputs_embeds (1, t, d). Returns (hidden states entering layer 0 (1, t, d), [(args, kwargs) per
    layer]) where args/kwargs are the call's arguments after the hidden states. Every decoder layer of
    `model` may sit on the meta device; only buffers (rotary inv_freq) must be real.
    """
    layers = decoder_layers(model)
    rec: list = []
    first: list[torch.Tensor] = []

    def recorder(i: int):
        def fwd(hidden_states, *args, **kwargs):
            if i == 0:
                first.append(hidden_states)
            rec.append((args, kwargs))
            if i == upto:
                raise _StopForward
            return hidden_states
        return fwd

    for i in range(upto + 1):
        layers[i].forward = recorder(i)
    try:
        with torch.no_grad():
            base_model(model)(inputs_embeds=inputs_embeds, use_cache=False)
    except _StopForward:
        pass
    finally:
        for i in range(upto + 1):
            layers[i].__dict__.pop("forward", None)
    if len(rec) != upto + 1:
        raise GlobeError(f"{type(model).__name__}: the forward called {len(rec)} decoder layers, expected {upto + 1}")
    return first[0], rec


def load_layer(model: nn.Module, ck: Any, layer: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Decoder layer `layer` of a meta skeleton, filled from checkpoint `ck` (experts fused); returns it.

    Raises GlobeError naming the tensor (and expert) when a weight holds NaN/inf or a tensor is missing.
    """
    mod = decoder_layers(model)[layer]
    pre = f"{model_spec(model).layers_prefix}.{layer}."
    sd = {k[len(pre):]: v for k, v in layer_state(ck, layer, dtype).items()}
    for k, v in sd.items():
        if not v.is_floating_point():
            continue
        rows = v if v.ndim == 3 else v[None]  # per expert for fused experts: small temporaries
        bad = [i for i, x in enumerate(rows) if not bool(torch.isfinite(x).all())]
        if bad:
            where = f", expert {bad[0]}" if v.ndim == 3 and k.endswith(("gate_up_proj", "down_proj")) else ""
            raise GlobeError(f"tensor {pre}{k} (layer {layer}{where}) holds non-finite values (NaN/inf)")
    own = set(mod.state_dict())
    missing = sorted(own - set(sd))
    if missing:
        raise GlobeError(f"{ck.dir}: layer {layer} lacks tensor {pre}{missing[0]} ({len(missing)} missing)")
    mod.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=True, assign=True)
    return mod.requires_grad_(False).eval()


def unload_layer(model: nn.Module, layer: int) -> None:
    """Send decoder layer `layer` back to the meta device (frees its weights)."""
    decoder_layers(model)[layer].to("meta")


def run_layer(mod: nn.Module, hidden: torch.Tensor, call: tuple) -> torch.Tensor:
    """One decoder layer on hidden (1, t, d) with the recorded (args, kwargs) of `layer_inputs`."""
    args, kwargs = call
    with torch.no_grad():
        out = mod(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def base_classes(model_type: str) -> tuple[type, type]:
    """(config class, causal-LM class) the installed transformers registers for `model_type` (e.g.
    Qwen2MoeConfig, Qwen2MoeForCausalLM); the generated modeling file of a globe export subclasses them."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    cfg_cls = CONFIG_MAPPING[model_type]
    return cfg_cls, AutoModelForCausalLM._model_mapping[cfg_cls]


@functools.cache
def _cache_kwarg() -> str:
    """The forward() keyword that carries the KV cache: `cache` from transformers 5.24 (which renamed
    `past_key_values` and warns that the old name goes in 5.40); `past_key_values` before (5.23 accepted
    `cache=` but ignored it, so decoding then recomputed from scratch and logits differed)."""
    import transformers
    from packaging.version import Version

    return "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


def _canonical_strides(mod: nn.Module, args: tuple) -> tuple | None:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dim() > 2:  # (B, n, d): a view when it can be, else a copy of x
        return (x.reshape(-1, x.shape[-1]).view(x.shape), *args[1:])
    return None


def canonical_lm_head_input(model: nn.Module) -> nn.Module:
    """Make the output projection see (B, n, d) inputs with canonical strides (n * d, d, 1); returns model.

    Why: transformers computes logits on hidden_states[:, -n:, :] (`logits_to_keep`: the scored positions
    of a perplexity window, 1 in every prefill of `generate`), a view whose batch stride is still T * d,
    and torch 2.13's CPU `linear` with a weight that does not require grad (globe.load_model's, like any
    inference loader's) does not fold such a view into one GEMM: it copies the weight and runs a batched
    product. At Qwen's 151,936 x 2048 lm_head: 4.2-4.7 s and +0.62-0.71 GB per call instead of 0.06-0.25 s
    and +0.00-0.08 GB with this hook (benchmarks/bench_logits_to_keep.py -> logits_to_keep_cpu.json,
    n = 255, 128, 1 of 256; outputs equal).
    A forward pre-hook on `get_output_embeddings()` re-views the input (B = 1: no copy; B > 1: a copy of
    the activations, never of the weight). Installed by load_model and patch_model, and by globe's eval
    passes on any model they are given. Idempotent; outputs are unchanged for B = 1 and equal up to the
    GEMM's float rounding for B > 1 (one GEMM on the copy instead of a batched product)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Module) and not getattr(head, "_globe_canonical", False):
        head.register_forward_pre_hook(_canonical_strides)
        head._globe_canonical = True
    return model


def decode_step(model: nn.Module, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
    """One greedy step with a KV cache: ids (B, T) -> (next ids (B, 1), the cache to pass next time).
    cache None starts a new one (prefill)."""
    key = _cache_kwarg()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{key: cache})
    return out.logits[:, -1].argmax(-1, keepdim=True), getattr(out, key)
