"""One format for a fitted family: the fit writes it, the globe export embeds it, the runtime reads it.

Why one format: a fit directory and a globe export hold the same families with the same tensor names
and the same reader; the export only adds the tensors GloBE leaves untouched. Experts are numbered
layer-major over the MoE layers: i = li * E + e (li = position of the layer in `moe_layers`).

Tensors of family f (fit directory: fp32; export: bank, A and mixed in the export dtype):
    globe.{f}.bank       (G, m, r, d)  atoms of G banks (G = 1: one global bank shared by every layer)
    globe.{f}.gain       (G,)          fp32  scalar g of each bank inside phi
    globe.{f}.indptr     (N + 1,)      int64 CSR row pointers of the codes
    globe.{f}.indices    (nnz,)        int32 atom j (within the expert's bank) of each nonzero code
    globe.{f}.values     (nnz,)        fp32  alpha_ij after epsilon-pruning
    globe.{f}.col_scale  (d,)          fp32  optional per-input-column scale folded into tilde_B
    globe.{f}.A_{L}      (E, p, r)     adapters of MoE layer L, per-expert scale folded in
    globe.{f}.mixed_{L}  (E, r, d)     optional (export.save_mixed): precomposed tilde_B

    W_hat_i = A_i @ (phi(g_b * sum_j alpha_ij B_bj) * col_scale),     b = layer_bank[li]

Experts kept uncompressed (`bank.keep_fraction`) are listed in each family's metadata as `kept` (global
ids, the same for every family); in a fit directory they hold A_i = 0 and one code (W_hat_i = 0 here):
their gate/up are the source checkpoint's, which the export and the runtime take from the source.

Metadata (JSON; `globe_config.json` of a fit directory, the `globe` section of an export's config.json):
format "globe", version 2, model_type, moe_layers, num_experts, hidden_size, expert_intermediate_size,
source, families {f: {m, r, banks, layer_bank, activation, col_scale, nnz, map, temperature, ...}},
config (the resolved fit config). A fit directory stores one file per family, `globe-{f}.safetensors`,
listed in `globe.safetensors.index.json`. Version-1 fit directories (`globe.safetensors` with dense
codes and one (N, p, r) A) are read and converted; version-1 exports are refused with the version named.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import GlobeError
from .io.exportmeta import kept_by_layer, kept_problem
from .io.outputs import scratch_dir
from .io.tensors import TensorDir
from .io.writer import ShardedWriter
from .maps import get_activation

FORMAT, VERSION = "globe", 2
CONFIG = "globe_config.json"
PREFIX = "globe"
MIN_GAIN = 1e-20  # |gain| below this makes every composed expert (numerically) zero: a damaged file
KEEP_FP32 = ("gain", "values", "col_scale")  # family tensors that stay fp32 whatever the export dtype


def check_gains(gains: list[float], where: str) -> None:
    """GlobeError naming `where` unless every bank gain is finite with |g| >= MIN_GAIN: a zero (or denormal)
    gain makes phi(g * mix) = phi(0) = 0 for every expert of the bank (a damaged file, never a fit)."""
    if not all(math.isfinite(g) and abs(g) >= MIN_GAIN for g in gains):
        raise GlobeError(f"{where}: bank gain {gains} is not finite and nonzero (damaged file); every expert "
                         "mixing from a zero gain would be zero")


def key(f: str, part: str, layer: int | None = None) -> str:
    """Tensor name of a family part: key('up', 'bank') -> 'globe.up.bank'; key('up', 'A', 3) -> 'globe.up.A_3'."""
    return f"{PREFIX}.{f}.{part}" if layer is None else f"{PREFIX}.{f}.{part}_{layer}"


def sparse_codes(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense (N, m) codes -> CSR: indptr (N+1,) int64, indices (nnz,) int32, values (nnz,) fp32."""
    mask = codes != 0
    indptr = torch.zeros(codes.shape[0] + 1, dtype=torch.int64)
    indptr[1:] = mask.sum(1).cumsum(0)
    rows, cols = mask.nonzero(as_tuple=True)
    return indptr, cols.to(torch.int32), codes[rows, cols].float()


def dense_codes(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, m: int,
                where: str = "codes") -> torch.Tensor:
    """CSR -> dense (N, m) fp32. GlobeError naming `where` for codes that are not CSR over m atoms."""
    from .runtime.cache import check_codes

    n = indptr.numel() - 1
    check_codes(indptr.tolist(), indices.tolist(), values.float().tolist(), m, n, where)
    rows = torch.repeat_interleave(torch.arange(n), (indptr[1:] - indptr[:-1]).long())
    out = torch.zeros(n, m)
    out[rows, indices.long()] = values.float()
    return out


def kept_count(fraction: float, N: int) -> int:
    """Experts kept uncompressed for bank.keep_fraction over N experts: round(fraction N)."""
    return int(round(float(fraction) * N))


def globe_params(N: int, p: int, d: int, m: int, r: int, nnz: int, banks: int = 1) -> int:
    """Stored numbers of one fitted family: banks x (m r d atoms + 1 gain) + N adapters (p, r) + nnz codes
    (the one formula; Family.stored_params adds the optional column scale)."""
    return banks * (m * r * d + 1) + N * p * r + nnz


@dataclass
class Family:
    """One fitted family in memory. A is held per MoE layer (or loaded on demand from disk)."""

    bank: torch.Tensor  # (G, m, r, d)
    codes: torch.Tensor  # (N, m) dense; zeros are pruned codes
    gain: torch.Tensor  # (G,) fp32
    layer_bank: list[int]  # bank index of each MoE layer (by position li)
    num_experts: int  # E, experts per layer
    activation: str = "silu"
    col_scale: torch.Tensor | None = None  # (d,)
    meta: dict[str, Any] = field(default_factory=dict)  # map, temperature, eps_prune, share, ...
    A_layers: list[torch.Tensor] | None = None  # li -> (E, p, r)
    load_A: Callable[[int], torch.Tensor] | None = field(default=None, repr=False)
    p: int = 0  # expert width (needed when A is loaded lazily)
    kept: list[int] = field(default_factory=list)  # global ids kept uncompressed (weights: the source's)

    @classmethod
    def from_fit(cls, bank: torch.Tensor, codes: torch.Tensor, A: torch.Tensor | None, gain: float | torch.Tensor,
                 num_experts: int, layer_bank: list[int] | None = None, activation: str = "silu",
                 col_scale: torch.Tensor | None = None, meta: dict[str, Any] | None = None,
                 p: int | None = None) -> Family:
        """From a global bank (m, r, d) or banks (G, m, r, d), codes (N, m) and A (N, p, r) (or None with
        the expert width p: adapters written later, e.g. by a FamilyWriter)."""
        bank = bank if bank.ndim == 4 else bank[None]
        n_layers = codes.shape[0] // num_experts
        g = torch.as_tensor(gain, dtype=torch.float32).reshape(-1).expand(bank.shape[0]).clone()
        return cls(bank=bank, codes=codes, gain=g, layer_bank=list(layer_bank or [0] * n_layers),
                   num_experts=num_experts, activation=activation, col_scale=col_scale, meta=dict(meta or {}),
                   A_layers=None if A is None else list(A.split(num_experts)), p=A.shape[1] if A is not None else p)

    # ---- shapes ----------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """(N, m, p, r, d); m is atoms per bank."""
        _, m, r, d = self.bank.shape
        return self.codes.shape[0], m, self.p or self.A_layer(0).shape[1], r, d

    @property
    def n_banks(self) -> int:
        return self.bank.shape[0]

    @property
    def n_layers(self) -> int:
        return len(self.layer_bank)

    def nnz(self) -> int:
        return int((self.codes != 0).sum())

    def A_layer(self, li: int) -> torch.Tensor:
        """Adapters of the li-th MoE layer: (E, p, r)."""
        if self.A_layers is not None:
            return self.A_layers[li]
        if self.load_A is None:
            raise GlobeError("family has no adapters loaded")
        return self.load_A(li)

    @property
    def A(self) -> torch.Tensor:
        """All adapters (N, p, r): loads every layer (small models, tests)."""
        return torch.cat([self.A_layer(li) for li in range(self.n_layers)])

    def bank_of(self, idx: torch.Tensor) -> torch.Tensor:
        """Bank index of each expert in idx: (n,) int64."""
        lb = torch.tensor(self.layer_bank, dtype=torch.int64)
        return lb[idx.long() // self.num_experts]

    # ---- math ------------------------------------------------------------------------------------
    def compose(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """tilde_B for experts idx (all if None): (n, r, d) = phi(g_b * codes @ bank_b) * col_scale."""
        idx = torch.arange(self.codes.shape[0]) if idx is None else idx.reshape(-1).cpu()
        G, m, r, d = self.bank.shape
        b = self.bank_of(idx)
        out = torch.empty(idx.numel(), r, d, dtype=self.bank.dtype, device=self.bank.device)
        phi = get_activation(self.activation).fn
        for g in b.unique().tolist():
            sel = (b == g).nonzero().flatten()
            codes = self.codes[idx[sel]].to(self.bank.device, self.bank.dtype)
            mix = (codes @ self.bank[g].reshape(m, r * d)).reshape(-1, r, d)
            out[sel.to(out.device)] = phi(float(self.gain[g]) * mix)
        if self.col_scale is not None:
            out = out * self.col_scale.to(out)
        return out

    def reconstruct(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """W_hat for experts idx (all if None): (n, p, d) in fp32."""
        idx = torch.arange(self.codes.shape[0]) if idx is None else idx.reshape(-1).cpu()
        E = self.num_experts
        li = idx // E
        A = torch.empty(idx.numel(), *self.A_layer(int(li[0])).shape[1:]) if idx.numel() else torch.empty(0)
        for layer in li.unique().tolist():
            sel = (li == layer).nonzero().flatten()
            A[sel] = self.A_layer(layer)[idx[sel] % E].float().cpu()
        return torch.bmm(A, self.compose(idx).float().cpu())

    def stored_params(self) -> int:
        """Everything stored for this family: banks, all A_i, nonzero codes, gains, column scale, and p d per
        expert kept uncompressed (bank.keep_fraction; held by the export and the runtime, not the fit dir)."""
        n, m, p, r, d = self.shape
        return (globe_params(n, p, d, m, r, self.nnz(), self.n_banks) + (0 if self.col_scale is None else d)
                + len(self.kept) * p * d)

    def family_meta(self) -> dict[str, Any]:
        n, m, p, r, d = self.shape
        return {**self.meta, "m": m, "r": r, "banks": self.n_banks, "layer_bank": list(self.layer_bank),
                "activation": self.activation, "col_scale": self.col_scale is not None, "nnz": self.nnz(),
                "kept": list(self.kept)}

    # ---- the on-disk representation ----------------------------------------------------------------
    def plan(self, f: str, layers: list[int], dtype: torch.dtype = torch.float32,
             mixed: bool = False) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, dtype, shape) of every tensor of this family as written with weights in `dtype`."""
        n, m, p, r, d = self.shape
        E, nnz = self.num_experts, self.nnz()
        out = [(key(f, "bank"), dtype, tuple(self.bank.shape)), (key(f, "gain"), torch.float32, (self.n_banks,)),
               (key(f, "indptr"), torch.int64, (n + 1,)), (key(f, "indices"), torch.int32, (nnz,)),
               (key(f, "values"), torch.float32, (nnz,))]
        if self.col_scale is not None:
            out.append((key(f, "col_scale"), torch.float32, (d,)))
        for L in layers:
            out.append((key(f, "A", L), dtype, (E, p, r)))
            if mixed:
                out.append((key(f, "mixed", L), dtype, (E, r, d)))
        return out

    def tensors(self, f: str, layers: list[int], dtype: torch.dtype = torch.float32,
                compose: Callable[[int], torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in plan order, one layer's A at a time. compose(i) -> (r, d) for `mixed`."""
        indptr, indices, values = sparse_codes(self.codes.cpu())
        yield key(f, "bank"), self.bank.detach().to("cpu", dtype).contiguous()
        yield key(f, "gain"), self.gain.detach().float().cpu()
        yield key(f, "indptr"), indptr
        yield key(f, "indices"), indices
        yield key(f, "values"), values
        if self.col_scale is not None:
            yield key(f, "col_scale"), self.col_scale.detach().float().cpu()
        E = self.num_experts
        for li, L in enumerate(layers):  # layers=[] yields everything but A
            yield key(f, "A", L), self.A_layer(li).detach().to("cpu", dtype).contiguous()
            if compose is not None:
                yield key(f, "mixed", L), torch.stack([compose(li * E + e) for e in range(E)]).to(dtype)


@dataclass
class Artifacts:
    """Every fitted family of one model plus what identifies the model."""

    families: dict[str, Family]
    model_type: str
    moe_layers: list[int]
    num_experts: int
    hidden_size: int
    expert_intermediate_size: int
    source: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # resolved fit config as a dict
    source_digest: dict[str, str] = field(default_factory=dict)  # family -> Checkpoint.expert_digest at fit time

    @property
    def kept(self) -> list[int]:
        """Global ids of the experts kept uncompressed (the same for every family; `validate` checks it)."""
        return next((list(fa.kept) for fa in self.families.values()), [])

    def kept_in_layer(self, layer: int) -> list[int]:
        """Local ids (ascending) of the experts of MoE layer `layer` kept uncompressed."""
        return kept_by_layer(self.kept, self.moe_layers, self.num_experts).get(layer, [])

    def layer_slice(self, layer: int) -> slice:
        li = self.moe_layers.index(layer)
        return slice(li * self.num_experts, (li + 1) * self.num_experts)

    def meta(self) -> dict[str, Any]:
        """The JSON metadata (see the module docstring)."""
        return {"format": FORMAT, "version": VERSION, "model_type": self.model_type, "source": self.source,
                "moe_layers": list(self.moe_layers), "num_experts": self.num_experts,
                "hidden_size": self.hidden_size, "expert_intermediate_size": self.expert_intermediate_size,
                "families": {f: fa.family_meta() for f, fa in self.families.items()}, "config": self.config,
                "source_digest": dict(self.source_digest)}

    def validate(self) -> None:
        n = len(self.moe_layers) * self.num_experts
        for f, fa in self.families.items():
            nn_, m, p, r, d = fa.shape
            if nn_ != n or fa.num_experts != self.num_experts or fa.n_layers != len(self.moe_layers):
                raise GlobeError(f"artifact family {f}: expected {n} experts ({len(self.moe_layers)} layers x "
                                 f"{self.num_experts}), codes {tuple(fa.codes.shape)}")
            if p != self.expert_intermediate_size or d != self.hidden_size:
                raise GlobeError(f"artifact family {f}: expert shape ({p}, {d}) does not match "
                                 f"({self.expert_intermediate_size}, {self.hidden_size})")
            if not all(0 <= b < fa.n_banks for b in fa.layer_bank):
                raise GlobeError(f"artifact family {f}: layer_bank {fa.layer_bank} refers to missing banks")
        problem = kept_problem({f: fa.kept for f, fa in self.families.items()}, n)
        if problem and problem[2]:
            raise GlobeError(f"artifact families keep different experts uncompressed (family {problem[0]} "
                             f"{problem[1]}): fitted with different bank.keep_fraction or calibration texts; fit "
                             "them together")
        if problem:
            raise GlobeError(f"artifact family {problem[0]}: kept experts {problem[1]} (damaged file)")
        k = self.kept
        q = (self.config.get("bank") or {}).get("keep_fraction") if isinstance(self.config, dict) else None
        if isinstance(q, (int, float)) and len(k) != kept_count(q, n):
            raise GlobeError(f"artifacts: {len(k)} experts listed as kept, but the fit's bank.keep_fraction={q:g} "
                             f"keeps {kept_count(q, n)} of {n} (damaged metadata)")
        for f, fa in self.families.items():  # a kept expert holds the fit's placeholder: one code of 1.0, A = 0
            rows = fa.codes[k]
            if k and not bool((((rows != 0).sum(1) == 1) & (rows.sum(1) == 1.0)).all()):
                raise GlobeError(f"artifact family {f}: experts listed as kept hold fitted codes, not the "
                                 "placeholder of a kept expert (damaged metadata: another list of kept experts)")

    # ---- writing ---------------------------------------------------------------------------------
    def save(self, out_dir: str | os.PathLike) -> None:
        """Write a fit directory: globe-{f}.safetensors per family, the index, globe_config.json."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for f in self.families:
            write_family_file(out, f, self)
        finish_fit_dir(out, self.meta(), list(self.families))

    # ---- reading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike | Sequence[str | os.PathLike],
             device: str | torch.device = "cpu") -> Artifacts:
        """A fit directory (v2 or v1), a globe export, or a list of fit directories of the same model that
        hold different families (e.g. [DIR_UP, DIR_GATE], fitted separately), merged.

        Raises GlobeError when a directory is missing, unreadable, of another format version, or when the
        listed directories disagree about the model or repeat a family."""
        from .io.fitdir import from_meta, merge, open_dir

        if isinstance(path, (list, tuple)):
            if not path:
                raise GlobeError("artifacts: empty list of fit directories")
            parts = [cls.load(p, device) for p in path]
            return parts[0] if len(parts) == 1 else merge(parts, ", ".join(map(str, path)))
        d = Path(path)
        if not d.is_dir():
            raise GlobeError(f"artifacts directory not found: {d}")
        meta, src = open_dir(d)
        return from_meta(meta, src, device)


def write_A_rows(w, f: str, layers: list[int], E: int, idx: torch.Tensor, A: torch.Tensor) -> None:
    """Write rows A (n, p, r) of global experts idx (n,) (ascending, consecutive within a layer) into the
    per-layer tensors `A_{layer}` (E, p, r) of a ShardedWriter `w`, one contiguous run at a time."""
    idx = idx.reshape(-1).tolist()
    A = A.detach().to("cpu", torch.float32)
    s = 0
    while s < len(idx):
        li, e0 = divmod(idx[s], E)
        t = s + 1
        while t < len(idx) and idx[t] == idx[t - 1] + 1 and idx[t] // E == li:
            t += 1
        w.write_rows(key(f, "A", layers[li]), e0, A[s:t].contiguous())
        s = t


def family_file(f: str) -> str:
    return f"{PREFIX}-{f}.safetensors"


class FamilyWriter:
    """Stream one family to `dest` (a safetensors file) while its adapters are computed.

    Everything but A is written at once from `fam` (A may be absent); `write_A(idx, A)` writes the rows
    of global experts idx (n,) as they come, e.g. chunk by chunk from the final evaluation, so the whole
    (N, p, r) never sits in memory (5.7 GB per family at Qwen1.5-MoE's size in fp32). `close()` renames
    the file into place and returns a loader li -> A (E, p, r) reading it back lazily.
    """

    def __init__(self, dest: str | os.PathLike, f: str, fam: Family, layers: list[int]):
        self.dest, self.f, self.fam, self.layers = Path(dest), f, fam, list(layers)
        self.tmp = scratch_dir(self.dest.parent)
        self.w = ShardedWriter(self.tmp, fam.plan(f, self.layers), prefix="family", max_shard_bytes=1 << 62)
        try:
            for k, t in fam.tensors(f, [], torch.float32):  # no layers: every tensor but A
                self.w.write(k, t)
        except BaseException:
            self.abort()
            raise

    def write_A(self, idx: torch.Tensor, A: torch.Tensor) -> None:
        """Rows A (n, p, r) of global experts idx (n,), ascending and consecutive within a layer."""
        write_A_rows(self.w, self.f, self.layers, self.fam.num_experts, idx, A)

    def close(self) -> Callable[[int], torch.Tensor]:
        try:
            self.w.close()
            os.replace(self.tmp / "family.safetensors", self.dest)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
        src = TensorDir(self.dest.parent, self.dest.name.removesuffix(".safetensors"))
        return lambda li: src.tensor(key(self.f, "A", self.layers[li]))

    def abort(self) -> None:
        self.w.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_family_file(out: Path, f: str, arts: Artifacts, name: str | None = None) -> Path:
    """One family's tensors (fp32) into out/`name` (default globe-{f}.safetensors), atomically."""
    fam = arts.families[f]
    tmp = scratch_dir(out)
    try:
        with ShardedWriter(tmp, fam.plan(f, arts.moe_layers), prefix="family", max_shard_bytes=1 << 62) as w:
            for k, t in fam.tensors(f, arts.moe_layers):
                w.write(k, t)
            w.close()
        dest = out / (name or family_file(f))
        os.replace(tmp / "family.safetensors", dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def finish_fit_dir(out: Path, meta: dict[str, Any], families: list[str]) -> None:
    """Write the index over the family files present and globe_config.json (both atomically)."""
    wm: dict[str, str] = {}
    total = 0
    for f in families:
        src = TensorDir(out, f"{PREFIX}-{f}")
        wm.update(dict.fromkeys(src.keys(), family_file(f)))
        total += (out / family_file(f)).stat().st_size
    idx = {"metadata": {"total_size": total, "format": FORMAT, "version": VERSION}, "weight_map": wm}
    atomic_write(out / f"{PREFIX}.safetensors.index.json", lambda p: Path(p).write_text(json.dumps(idx, indent=1)))
    atomic_write(out / CONFIG, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))


def atomic_write(path: str | os.PathLike, writer) -> None:
    """Write via a temporary file in the same directory, then rename: never a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the file should look like any other
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
