"""Model-free checkpoint reader: experts straight from safetensors shards, one tensor at a time.

Why: fitting must never instantiate the full model (Qwen1.5-MoE-A2.7B is 28 GB in fp32). The reader
opens `config.json` plus `model.safetensors` or `model.safetensors.index.json` + shards, reads
lazily and returns tensors in their stored dtype (bf16 stays bf16). Peak memory is about one tensor.

Both expert layouts are read:
  per_expert  {prefix}.{L}.{block}.experts.{e}.{gate,up,down}_proj.weight    (p, d) / (d, p)
  fused       {prefix}.{L}.{block}.experts.gate_up_proj  (E, 2p, d), gate rows first
              {prefix}.{L}.{block}.experts.down_proj     (E, d, p)
A fused expert is read with a slice, so one expert never loads its whole layer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import GlobeError
from ..registry import REGISTRY, ArchSpec, get_spec, moe_layers, num_experts, shared_width
from .stfile import SafetensorsFormatError, STFile

FAMILIES_ALL = ("gate", "up", "down")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


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


def read_config(model_dir: Path) -> dict[str, Any]:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise GlobeError(f"no config.json in {model_dir}: not a Hugging Face model directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise GlobeError(f"corrupt config.json in {model_dir}: {e}") from None
    # Multimodal wrappers keep the language model under text_config.
    if "model_type" in cfg and "num_hidden_layers" not in cfg and "text_config" in cfg:
        cfg = {**cfg["text_config"]}
    return cfg


class Checkpoint:
    """Lazy view of an MoE checkpoint's tensors."""

    def __init__(self, path: str | os.PathLike, revision: str | None = None):
        self.dir = resolve_path(str(path), revision)
        self.config = read_config(self.dir)
        self.model_type = self.config.get("model_type")
        if self.model_type not in REGISTRY and not any(
                self.config.get(k) for k in ("num_experts", "num_local_experts", "n_routed_experts")):
            raise GlobeError(f"{self.dir}: model_type {self.model_type!r} is a dense model (no routed experts); "
                             "GloBE compresses Mixture-of-Experts models")
        self.spec: ArchSpec = get_spec(self.model_type)
        c, s = self.config, self.spec
        self.moe_layers = moe_layers(s, c)
        if not self.moe_layers:
            raise GlobeError(f"{self.dir}: model_type {self.model_type} has no MoE layers in this config "
                             "(dense model?)")
        self.num_experts = num_experts(s, c)
        self.top_k = int(c.get(s.top_k_key) or 0)
        self.hidden_size = int(c["hidden_size"])
        self.p = int(c[s.inter_key])
        self.shared_width = shared_width(s, c)
        self._handles: dict[str, Any] = {}
        self.weight_map = self._weight_map()
        self.layout = self._detect_layout()

    # ---- files -------------------------------------------------------------------------------
    def _weight_map(self) -> dict[str, str]:
        idx = self.dir / "model.safetensors.index.json"
        if idx.is_file():
            try:
                wm = json.loads(idx.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise GlobeError(f"corrupt {idx.name} in {self.dir}: {e}") from None
            missing = sorted({f for f in wm.values() if not (self.dir / f).is_file()})
            if missing:
                raise GlobeError(f"{self.dir}: shard(s) listed in the index are missing: {', '.join(missing[:3])}")
            return dict(wm)
        single = self.dir / "model.safetensors"
        files = [single] if single.is_file() else sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise GlobeError(f"no safetensors weights in {self.dir} (expected model.safetensors or an index)")
        wm: dict[str, str] = {}
        for f in files:
            for k in self._open(f.name).keys():
                wm[k] = f.name
        return wm

    def _open(self, fname: str):
        h = self._handles.get(fname)
        if h is None:
            try:
                h = STFile(self.dir / fname)
            except (SafetensorsFormatError, OSError) as e:
                raise GlobeError(f"corrupt or truncated safetensors file {self.dir / fname}: "
                                 f"{str(e).splitlines()[0]}") from None
            self._handles[fname] = h
        return h

    @property
    def files(self) -> list[Path]:
        return sorted({self.dir / f for f in self.weight_map.values()})

    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._open(self._file(name)).shape(name)

    def dtype_str(self, name: str) -> str:
        return self._open(self._file(name)).dtype_str(name)

    def _file(self, name: str) -> str:
        try:
            return self.weight_map[name]
        except KeyError:
            raise GlobeError(f"tensor {name} not found in {self.dir}") from None

    def tensor(self, name: str) -> torch.Tensor:
        try:
            return self._open(self._file(name)).read(name)
        except (SafetensorsFormatError, OSError) as e:
            raise GlobeError(f"cannot read tensor {name} from {self.dir}: {str(e).splitlines()[0]}") from None

    # ---- experts -----------------------------------------------------------------------------
    def block_prefix(self, layer: int) -> str:
        return f"{self.spec.layers_prefix}.{layer}.{self.spec.disk_block}"

    def _fused_prefix(self, layer: int) -> str:
        return f"{self.spec.layers_prefix}.{layer}.{self.spec.block}.experts"

    def expert_name(self, layer: int, e: int, family: str) -> str:
        name = {"gate": self.spec.gate_name, "up": self.spec.up_name, "down": self.spec.down_name}[family]
        return f"{self.block_prefix(layer)}.experts.{e}.{name}.weight"

    def _detect_layout(self) -> str:
        l0 = self.moe_layers[0]
        if self.expert_name(l0, 0, "up") in self.weight_map:
            layout = "per_expert"
            need = [self.expert_name(L, e, f) for L in self.moe_layers for e in range(self.num_experts)
                    for f in FAMILIES_ALL]
        elif f"{self._fused_prefix(l0)}.gate_up_proj" in self.weight_map:
            layout = "fused"
            need = [f"{self._fused_prefix(L)}.{n}" for L in self.moe_layers for n in ("gate_up_proj", "down_proj")]
        else:
            raise GlobeError(f"{self.dir}: no routed-expert tensors found; expected e.g. "
                             f"{self.expert_name(l0, 0, 'up')} or {self._fused_prefix(l0)}.gate_up_proj")
        missing = [n for n in need if n not in self.weight_map]
        if missing:
            more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
            raise GlobeError(f"{self.dir}: missing expert tensors: {', '.join(missing[:3])}{more}")
        self._check_shapes(layout)
        return layout

    def _check_shapes(self, layout: str) -> None:
        E, p, d = self.num_experts, self.p, self.hidden_size
        for L in self.moe_layers:
            if layout == "per_expert":
                checks = [(self.expert_name(L, e, f), (d, p) if f == "down" else (p, d))
                          for e in range(E) for f in FAMILIES_ALL]
            else:
                fp = self._fused_prefix(L)
                checks = [(f"{fp}.gate_up_proj", (E, 2 * p, d)), (f"{fp}.down_proj", (E, d, p))]
            for name, want in checks:
                got = self.shape(name)
                if got != want:
                    raise GlobeError(f"{self.dir}: tensor {name} has shape {list(got)}, config.json implies "
                                     f"{list(want)}")

    def expert(self, layer: int, e: int, family: str) -> torch.Tensor:
        """One routed expert's matrix in its stored dtype: gate/up (p, d), down (d, p)."""
        if family not in FAMILIES_ALL:
            raise GlobeError(f"unknown expert family {family!r}")
        if self.layout == "per_expert":
            return self.tensor(self.expert_name(layer, e, family))
        fp = self._fused_prefix(layer)
        if family == "down":
            name = f"{fp}.down_proj"
            return self._open(self._file(name)).read(name, e)
        name = f"{fp}.gate_up_proj"
        lo = e * 2 * self.p + (0 if family == "gate" else self.p)  # gate rows first
        return self._open(self._file(name)).read(name, slice(lo, lo + self.p), merge=2)

    def iter_experts(self, family: str) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(layer, expert, W) over all routed experts, layer-major (the artifact order)."""
        for L in self.moe_layers:
            for e in range(self.num_experts):
                yield L, e, self.expert(L, e, family)

    def load_family(self, family: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """All routed experts of a family stacked: (N, p, d) (down: (N, d, p)), N = layers * E."""
        N = len(self.moe_layers) * self.num_experts
        first = self.expert(self.moe_layers[0], 0, family)
        out = torch.empty((N, *first.shape), dtype=dtype or first.dtype)
        for i, (_, _, w) in enumerate(self.iter_experts(family)):
            out[i].copy_(w)
        return out

    def expert_tensor_names(self) -> set[str]:
        if self.layout == "per_expert":
            return {self.expert_name(L, e, f) for L in self.moe_layers for e in range(self.num_experts)
                    for f in FAMILIES_ALL}
        return {f"{self._fused_prefix(L)}.{n}" for L in self.moe_layers for n in ("gate_up_proj", "down_proj")}

    def shared_tensor_names(self) -> list[str]:
        s = self.spec
        out = []
        for L in self.moe_layers:
            pre = self.block_prefix(L)
            for mod in (s.shared, s.shared_gate):
                if mod:
                    out += [k for k in self.weight_map if k.startswith(f"{pre}.{mod}.")]
        return out
