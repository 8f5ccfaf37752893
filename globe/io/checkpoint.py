"""Model-free checkpoint reader: experts straight from safetensors shards, one tensor at a time.

Why: fitting must never instantiate the full model (Qwen1.5-MoE-A2.7B is 28 GB in fp32). The reader
opens `config.json` plus `model.safetensors` or `model.safetensors.index.json` + shards (the order
transformers uses), reads lazily and returns tensors in their stored dtype (bf16 stays bf16).
Peak memory is about one tensor.

Both expert layouts are read:
  per_expert  {prefix}.{L}.{block}.experts.{e}.{gate,up,down}_proj.weight    (p, d) / (d, p)
  fused       {prefix}.{L}.{block}.experts.{GATE_UP}  (E, 2p, d), gate rows first (names: compat.GATE_UP, DOWN)
              {prefix}.{L}.{block}.experts.down_proj     (E, d, p)
A fused expert is read with a slice, so one expert never loads its whole layer. FP8 block-quantized
tensors (globe/io/quant.py) are dequantized on read: every consumer sees values (bf16 unless a dtype
is asked for), `keys()` lists the logical tensors only (no `*_scale_inv`).

Everything a later command would trip over is refused at construction, in one line, before any
weight is read: a corrupt safetensors header in any file (globe/io/stfile.py), an index and shards
that disagree in any direction, an unsupported quantization, MoE layers where config.json (read by
the transformers class's rule, globe/registry.py) and the expert tensors on disk disagree, an expert
count, width or hidden size that disagrees with the tensors, and non-floating expert weights.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..compat import DOWN, GATE_UP
from ..errors import GlobeError
from ..registry import REGISTRY, ArchSpec, get_spec, layer_rule_text, moe_layers, num_experts, shared_width, top_k
from .quant import PACKED_SUFFIXES, SCALE_SUFFIX, dequantize, fp8_block, scale_shape
from .stfile import SafetensorsFormatError, STFile

FAMILIES_ALL = ("gate", "up", "down")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
INDEX = "model.safetensors.index.json"
FLOAT = ("F64", "F32", "F16", "BF16")
_LOGGED: set[str] = set()
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")  # a decoder layer's tensor (text models)


def resolve_path(path: str, revision: str | None = None) -> Path:
    """A local directory, or a hub id fetched through huggingface_hub's cache when a network exists."""
    if not path:
        raise GlobeError("model.path is empty: give a local model directory or a hub id")
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise GlobeError(f"model path is not a directory: {p}")
        return p
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise GlobeError(f"model path not found: {path}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # network, auth, missing repo: all one line for the user
        raise GlobeError(f"model path not found locally and hub download of {path!r} failed: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def check_shard_names(files, index: Path) -> None:
    """GlobeError unless every shard an index names is a file name inside the model directory (no absolute
    path, no `..`): an index is data from the hub, and must not send reads elsewhere."""
    bad = next((f for f in files if not f or Path(f).is_absolute() or ".." in Path(f).parts), None)
    if bad is not None:
        raise GlobeError(f"{index}: shard {bad!r} lies outside the model directory; refusing to read it")


def read_raw_config(model_dir: Path) -> dict[str, Any]:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise GlobeError(f"no config.json in {model_dir}: not a Hugging Face model directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GlobeError(f"corrupt config.json in {model_dir}: {e}") from None
    if not isinstance(cfg, dict):
        raise GlobeError(f"corrupt config.json in {model_dir}: not a JSON object")
    return cfg


def read_config(model_dir: Path) -> dict[str, Any]:
    cfg = read_raw_config(model_dir)
    # Multimodal wrappers keep the language model under text_config.
    if "model_type" in cfg and "num_hidden_layers" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"]}
    return cfg


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"{k} is listed twice")
        out[k] = v
    return out


class Checkpoint:
    """Lazy, validated view of an MoE checkpoint's tensors."""

    def __init__(self, path: str | os.PathLike, revision: str | None = None):
        self.dir = resolve_path(str(path), revision)
        self.raw_config = read_raw_config(self.dir)
        self.config = read_config(self.dir)
        self.model_type = self.config.get("model_type")
        if self.model_type not in REGISTRY and not any(
                self.config.get(k) for k in ("num_experts", "num_local_experts", "n_routed_experts")):
            raise GlobeError(f"{self.dir}: model_type {self.model_type!r} is a dense model (no routed experts); "
                             "GloBE compresses Mixture-of-Experts models")
        self.spec: ArchSpec = get_spec(self.model_type)
        qcfg = self.raw_config.get("quantization_config", self.config.get("quantization_config"))
        self.block = fp8_block(qcfg, str(self.dir))  # refuses unsupported quantization before any file is read
        c, s = self.config, self.spec
        if not isinstance(c.get("num_hidden_layers"), int) or not isinstance(c.get("hidden_size"), int) \
                or not isinstance(c.get(s.inter_key), int):
            raise GlobeError(f"{self.dir}: config.json needs integer num_hidden_layers, hidden_size and {s.inter_key}")
        self.moe_layers = moe_layers(s, c)
        self.num_experts = num_experts(s, c)
        self.top_k = top_k(s, c, f"{self.dir}: config.json")
        self.hidden_size = int(c["hidden_size"])
        self.p = int(c[s.inter_key])
        self.shared_width = shared_width(s, c)
        self._handles: dict[str, STFile] = {}
        self.weight_map = self._weight_map()  # every stored tensor -> its file (scales included)
        self._scales = self._check_tensors()  # quantized tensor -> its scale_inv
        self._keys = [k for k in self.weight_map if not (self.block and k.endswith(SCALE_SUFFIX))]
        self._check_layer_count()
        self.layout = self._detect_layout()
        self.quantization = (None if self.block is None else
                             f"fp8 e4m3, {self.block[0]}x{self.block[1]} blocks ({len(self._scales)} tensors, "
                             "dequantized on read)")
        if self.block is not None and str(self.dir) not in _LOGGED:
            from ..progress import log

            _LOGGED.add(str(self.dir))
            log("%s: FP8 block-quantized weights (%d tensors) are dequantized on read; exports will be bf16",
                self.dir, len(self._scales))

    def _check_layer_count(self) -> None:
        """GlobeError when the weights hold decoder layers beyond config.json's num_hidden_layers (plus
        DeepSeek-V3's num_nextn_predict_layers, stored after them): transformers would drop them silently and
        every command would run a truncated model."""
        n = int(self.config["num_hidden_layers"])
        allowed = n + int(self.config.get("num_nextn_predict_layers") or 0)
        seen = {int(m.group(1)) for k in self._keys if (m := _LAYER_KEY.match(k))}
        beyond = sorted(i for i in seen if i >= allowed)
        if beyond:
            raise GlobeError(f"{self.dir}: the weights hold decoder layer(s) {', '.join(map(str, beyond[:4]))}"
                             f"{' ...' if len(beyond) > 4 else ''} but config.json says num_hidden_layers={n} "
                             "(a config from another model?)")

    # ---- files -------------------------------------------------------------------------------
    def _weight_map(self) -> dict[str, str]:
        idx = self.dir / INDEX
        single = self.dir / "model.safetensors"
        if idx.is_file() and not single.is_file():  # transformers reads model.safetensors first
            try:
                wm = json.loads(idx.read_text(), object_pairs_hook=_no_duplicates)["weight_map"]
            except KeyError:
                raise GlobeError(f"corrupt {INDEX} in {self.dir}: no \"weight_map\" (tensor -> shard file)") from None
            except (ValueError, TypeError) as e:
                raise GlobeError(f"corrupt {INDEX} in {self.dir}: {str(e).splitlines()[0]}") from None
            if not isinstance(wm, dict) or not all(isinstance(f, str) for f in wm.values()):
                raise GlobeError(f"corrupt {INDEX} in {self.dir}: weight_map is not a map of tensor -> file")
            check_shard_names(wm.values(), self.dir / INDEX)
            missing = sorted({f for f in wm.values() if not (self.dir / f).is_file()})
            if missing:
                raise GlobeError(f"{self.dir}: shard(s) listed in the index are missing: {', '.join(missing[:3])}")
            where = self._locate(sorted(set(wm.values())))
            for k, f in wm.items():
                if k not in where:
                    raise GlobeError(f"{self.dir}: tensor {k} is listed in {INDEX} under {f}, but {f} does not "
                                     "contain it")
                if where[k] != f:
                    raise GlobeError(f"{self.dir}: tensor {k} is listed in {INDEX} under {f}, but it is stored in "
                                     f"{where[k]}")
            extra = [k for k in where if k not in wm]
            if extra:
                raise GlobeError(f"{self.dir}: tensor {extra[0]} is stored in {where[extra[0]]} but not listed in "
                                 f"{INDEX} ({len(extra)} such)")
            return dict(wm)
        files = [single] if single.is_file() else sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise GlobeError(f"no safetensors weights in {self.dir} (expected model.safetensors or an index)")
        return self._locate([f.name for f in files])

    def _locate(self, fnames: list[str]) -> dict[str, str]:
        """{tensor: file} over the given files, each validated; a tensor in two files is refused."""
        where: dict[str, str] = {}
        for f in fnames:
            for k in self._open(f).keys():
                if k in where:
                    raise GlobeError(f"{self.dir}: tensor {k} is stored twice, in {where[k]} and {f}")
                where[k] = f
        return where

    def _open(self, fname: str) -> STFile:
        h = self._handles.get(fname)
        if h is None:
            try:
                h = STFile(self.dir / fname)
            except (SafetensorsFormatError, OSError) as e:
                raise GlobeError(f"corrupt or truncated safetensors file {self.dir / fname}: "
                                 f"{str(e).splitlines()[0]}") from None
            self._handles[fname] = h
        return h

    def _check_tensors(self) -> dict[str, str]:
        """Quantization seen in the tensors agrees with config.json; returns {fp8 tensor: its scale_inv}."""
        for k in self.weight_map:
            if k.endswith(PACKED_SUFFIXES):
                raise GlobeError(f"{self.dir}: tensor {k} is a packed quantized weight; quantized checkpoints "
                                 "other than FP8 block quantization are not supported")
        scales: dict[str, str] = {}
        for k in self.weight_map:
            dt = self.stored_dtype_str(k)
            if k.endswith(SCALE_SUFFIX) and self.block is None:
                raise GlobeError(f"{self.dir}: tensor {k} is an FP8 scale but config.json has no quantization_config")
            if not dt.startswith("F8"):
                continue
            if self.block is None or dt != "F8_E4M3":
                raise GlobeError(f"{self.dir}: tensor {k} is stored as {dt}, but config.json declares "
                                 + ("no quantization" if self.block is None else "FP8 e4m3"))
            sname = k + SCALE_SUFFIX
            if sname not in self.weight_map:
                raise GlobeError(f"{self.dir}: FP8 tensor {k} has no scale tensor {sname}")
            want = scale_shape(self.shape(k), self.block) if len(self.shape(k)) >= 2 else None
            if want is None or self.shape(sname) != want or self.stored_dtype_str(sname) not in FLOAT:
                raise GlobeError(f"{self.dir}: FP8 scale {sname} is {self.stored_dtype_str(sname)} "
                                 f"{list(self.shape(sname))}; block {list(self.block)} on {list(self.shape(k))} "
                                 f"needs floating {list(want) if want else '(a matrix)'}")
            scales[k] = sname
        if self.block is not None:
            for k in self.weight_map:
                if k.endswith(SCALE_SUFFIX) and k[:-len(SCALE_SUFFIX)] not in scales:
                    raise GlobeError(f"{self.dir}: scale tensor {k} has no FP8 tensor {k[:-len(SCALE_SUFFIX)]}")
        return scales

    @property
    def files(self) -> list[Path]:
        return sorted({self.dir / f for f in self.weight_map.values()})

    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def keys(self) -> list[str]:
        """Logical tensor names (FP8 scale tensors are folded into their weights)."""
        return list(self._keys)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._open(self._file(name)).shape(name)

    def stored_dtype_str(self, name: str) -> str:
        """The safetensors dtype code on disk, e.g. 'F8_E4M3' for an FP8 weight."""
        return self._open(self._file(name)).dtype_str(name)

    def dtype_str(self, name: str) -> str:
        """The dtype code of what `tensor(name)` returns: 'BF16' for dequantized FP8 weights."""
        return "BF16" if name in self._scales else self.stored_dtype_str(name)

    def export_config(self) -> dict[str, Any]:
        """config.json for a bf16 export of this checkpoint (quantization_config removed)."""
        cfg = json.loads(json.dumps(self.raw_config))
        if self.block is not None:
            for c in (cfg, cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}):
                c.pop("quantization_config", None)
                for key in ("torch_dtype", "dtype"):
                    if key in c:
                        c[key] = "bfloat16"
        return cfg

    def _file(self, name: str) -> str:
        try:
            return self.weight_map[name]
        except KeyError:
            raise GlobeError(f"tensor {name} not found in {self.dir}") from None

    def _read(self, name: str, rows: slice | int | None = None, merge: int = 1) -> torch.Tensor:
        try:
            return self._open(self._file(name)).read(name, rows, merge)
        except (SafetensorsFormatError, OSError) as e:
            raise GlobeError(f"cannot read tensor {name} from {self.dir}: {str(e).splitlines()[0]}") from None

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A tensor by name: stored dtype (FP8: dequantized, bf16), or floating tensors cast to `dtype`."""
        t = self._read(name)
        if name in self._scales:
            return dequantize(t, self._read(self._scales[name]), self.block, dtype or torch.bfloat16)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    # ---- experts -----------------------------------------------------------------------------
    def block_prefix(self, layer: int) -> str:
        return f"{self.spec.layers_prefix}.{layer}.{self.spec.disk_block}"

    def _fused_prefix(self, layer: int) -> str:
        return f"{self.spec.layers_prefix}.{layer}.{self.spec.block}.experts"

    def expert_name(self, layer: int, e: int, family: str) -> str:
        name = {"gate": self.spec.gate_name, "up": self.spec.up_name, "down": self.spec.down_name}[family]
        return f"{self.block_prefix(layer)}.experts.{e}.{name}.weight"

    def _disk_experts(self) -> dict[int, dict[str, str]]:
        """{layer: {expert id or fused tensor: an example name}} of every expert tensor on disk."""
        s = self.spec
        blocks = "|".join(sorted({re.escape(s.disk_block), re.escape(s.block)}))
        pat = re.compile(rf"^{re.escape(s.layers_prefix)}\.(\d+)\.(?:{blocks})\.experts\.(\d+|{GATE_UP}|{DOWN})"
                         r"(?:\.|$)")
        out: dict[int, dict[str, str]] = {}
        for k in self._keys:
            m = pat.match(k)
            if m:
                out.setdefault(int(m.group(1)), {}).setdefault(m.group(2), k)
        return out

    def _detect_layout(self) -> str:
        disk = self._disk_experts()
        if not self.moe_layers and not disk:
            raise GlobeError(f"{self.dir}: model_type {self.model_type} has no MoE layers in this config "
                             "(dense model?)")
        if not disk:
            l0 = self.moe_layers[0]
            raise GlobeError(f"{self.dir}: no routed-expert tensors found; expected e.g. "
                             f"{self.expert_name(l0, 0, 'up')} or {self._fused_prefix(l0)}.{GATE_UP}")
        n_layers = int(self.config["num_hidden_layers"])  # layers past it (DeepSeek's MTP) are not decoder layers
        rule = set(self.moe_layers)
        on_disk = {L for L in disk if L < n_layers}
        for L in sorted(rule ^ on_disk):
            why = layer_rule_text(self.spec, self.config)
            if L in rule:
                raise GlobeError(f"{self.dir}: layer {L} has no expert tensors on disk, but config.json makes it an "
                                 f"MoE layer in transformers' {self.model_type} ({why})")
            raise GlobeError(f"{self.dir}: layer {L} holds expert tensors ({next(iter(disk[L].values()))}) but "
                             f"config.json makes it a dense layer in transformers' {self.model_type} ({why})")
        E = self.num_experts
        for L in self.moe_layers:
            extra = sorted(int(x) for x in disk[L] if x.isdigit() and int(x) >= E)
            if extra:
                raise GlobeError(f"{self.dir}: layer {L} has expert {extra[0]} on disk ({disk[L][str(extra[0])]}) "
                                 f"but config.json says {E} experts per layer")
        if not self.moe_layers:  # experts only past num_hidden_layers (e.g. DeepSeek's MTP layer)
            raise GlobeError(f"{self.dir}: model_type {self.model_type} has no MoE layers in this config "
                             "(dense model?)")
        l0 = self.moe_layers[0]
        if self.expert_name(l0, 0, "up") in self.weight_map:
            layout = "per_expert"
            need = [self.expert_name(L, e, f) for L in self.moe_layers for e in range(E) for f in FAMILIES_ALL]
        elif f"{self._fused_prefix(l0)}.{GATE_UP}" in self.weight_map:
            layout = "fused"
            need = [f"{self._fused_prefix(L)}.{n}" for L in self.moe_layers for n in (GATE_UP, DOWN)]
        else:
            raise GlobeError(f"{self.dir}: no routed-expert tensors found for layer {l0}; expected e.g. "
                             f"{self.expert_name(l0, 0, 'up')} or {self._fused_prefix(l0)}.{GATE_UP}")
        missing = [n for n in need if n not in self.weight_map]
        if missing:
            more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
            raise GlobeError(f"{self.dir}: missing expert tensors: {', '.join(missing[:3])}{more}")
        self._check_shapes(layout, need)
        return layout

    def _check_shapes(self, layout: str, names: list[str]) -> None:
        E, p, d = self.num_experts, self.p, self.hidden_size
        for name in names:
            if layout == "per_expert":
                want = (d, p) if name.endswith(f".{self.spec.down_name}.weight") else (p, d)
            else:
                want = (E, d, p) if name.endswith(".down_proj") else (E, 2 * p, d)
            got = self.shape(name)
            if got != want:
                raise GlobeError(f"{self.dir}: tensor {name} has shape {list(got)}, config.json implies "
                                 f"{list(want)}")
            if self.dtype_str(name) not in FLOAT:
                raise GlobeError(f"{self.dir}: expert tensor {name} is stored as {self.stored_dtype_str(name)}; "
                                 "expert weights must be floating point (fp32, bf16, fp16 or FP8 with block scales)")

    def expert_digest(self, family: str) -> str:
        """A short sha256 of expert 0 of the first MoE layer of `family`, as fp32 values: what a fit records
        to recognise its source later (the same weights saved in another float dtype keep their digest)."""
        import hashlib

        w = self.expert(self.moe_layers[0], 0, family, torch.float32).contiguous()
        return hashlib.sha256(w.numpy().tobytes()).hexdigest()[:16]

    def expert(self, layer: int, e: int, family: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One routed expert's matrix: gate/up (p, d), down (d, p); stored dtype (FP8: dequantized, bf16)
        unless `dtype` is given."""
        if family not in FAMILIES_ALL:
            raise GlobeError(f"unknown expert family {family!r}")
        if self.layout == "per_expert":
            return self.tensor(self.expert_name(layer, e, family), dtype)
        fp = self._fused_prefix(layer)
        name = f"{fp}.{DOWN}" if family == "down" else f"{fp}.{GATE_UP}"
        if name in self._scales:  # dequantize expert e's whole slab with its scales, then take the half
            w = dequantize(self._read(name, e), self._read(self._scales[name], e), self.block,
                           dtype or torch.bfloat16)
            return w if family == "down" else w[(0 if family == "gate" else self.p):][:self.p]
        if family == "down":
            w = self._read(name, e)
        else:
            lo = e * 2 * self.p + (0 if family == "gate" else self.p)  # gate rows first
            w = self._read(name, slice(lo, lo + self.p), merge=2)
        return w.to(dtype) if dtype is not None else w

    def iter_experts(self, family: str, dtype: torch.dtype | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(layer, expert, W) over all routed experts, layer-major (the artifact order)."""
        for L in self.moe_layers:
            for e in range(self.num_experts):
                yield L, e, self.expert(L, e, family, dtype)

    def load_family(self, family: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """All routed experts of a family stacked: (N, p, d) (down: (N, d, p)), N = layers * E.

        dtype None keeps the stored dtype (bf16 for FP8 sources); fp32 dequantizes FP8 straight to fp32.
        """
        N = len(self.moe_layers) * self.num_experts
        first = self.expert(self.moe_layers[0], 0, family, dtype)
        out = torch.empty((N, *first.shape), dtype=first.dtype)
        for i, (_, _, w) in enumerate(self.iter_experts(family, dtype)):
            out[i].copy_(w)
        return out

    def expert_tensor_names(self) -> set[str]:
        if self.layout == "per_expert":
            return {self.expert_name(L, e, f) for L in self.moe_layers for e in range(self.num_experts)
                    for f in FAMILIES_ALL}
        return {f"{self._fused_prefix(L)}.{n}" for L in self.moe_layers for n in (GATE_UP, DOWN)}

    def shared_tensor_names(self) -> list[str]:
        s = self.spec
        out = []
        for L in self.moe_layers:
            pre = self.block_prefix(L)
            for mod in (s.shared, s.shared_gate):
                if mod:
                    out += [k for k in self._keys if k.startswith(f"{pre}.{mod}.")]
        return out
