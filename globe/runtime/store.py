"""Family stores: the on-disk family tensors of the format as module buffers.

Why: `FamilyStore` is an nn.Module whose buffers carry exactly the names of the format
(`globe.{f}.bank`, `.gain`, `.indptr`, `.indices`, `.values`, `.col_scale`, `.A_{L}`, `.mixed_{L}`;
see globe/artifacts.py), so a patched model's state_dict IS the family part of a globe export and
`.to()`, `.half()`, device moves apply to it like to any module. Composition reads it through
`bank_codes()` with the one kernel of cache.py. Codes, gains and col_scale stay fp32 and the bank keeps
its dtype under casts (only A and the composed caches follow the model's dtype), so casting never
changes which bits a compose produces.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..artifacts import KEEP_FP32, check_gains
from ..common import has_zero_row
from ..errors import GlobeError
from .cache import BankCodes, check_codes, compose_many, max_nnz


class FamilyStore(nn.Module):
    """One fitted family shared by every MoE layer: bank (G, m, r, d), CSR codes, gains, A per layer."""

    def __init__(self, name: str, moe_layers: Sequence[int], num_experts: int, p: int, r: int, d: int, m: int,
                 banks: int, layer_bank: Sequence[int], activation: str, nnz: int, col_scale: bool = False,
                 mixed: bool = False, device: torch.device | str | None = "meta", dtype: torch.dtype = torch.float32):
        """An empty store (tensors on `device`, uninitialised) of the given shapes; filled by assigning its
        buffers (globe.runtime.patch.store_from_family, or a loader reading the format's tensors)."""
        super().__init__()
        self.name, self.layers, self.E = name, list(moe_layers), int(num_experts)
        self.p, self.r, self.d, self.m, self.G = int(p), int(r), int(d), int(m), int(banks)
        self.layer_bank, self.activation = [int(b) for b in layer_bank], activation
        self.has_mixed = bool(mixed)
        N = len(self.layers) * self.E
        kw = {"device": device}
        self.register_buffer("bank", torch.empty(self.G, self.m, r, d, dtype=dtype, **kw))
        self.register_buffer("gain", torch.empty(self.G, dtype=torch.float32, **kw))
        self.register_buffer("indptr", torch.empty(N + 1, dtype=torch.int64, **kw))
        self.register_buffer("indices", torch.empty(nnz, dtype=torch.int32, **kw))
        self.register_buffer("values", torch.empty(nnz, dtype=torch.float32, **kw))
        self.register_buffer("col_scale", torch.empty(d, dtype=torch.float32, **kw) if col_scale else None)
        for L in self.layers:
            self.register_buffer(f"A_{L}", torch.empty(self.E, p, r, dtype=dtype, **kw))
            if mixed:
                self.register_buffer(f"mixed_{L}", torch.empty(self.E, r, d, dtype=dtype, **kw))
        self._host: tuple | None = None
        self._bank_of: list[int] | None = None
        self.released = False
        self.kernel = "eager"  # composition kernel, eager | compiled: install() sets it from cache.compile

    # ---- dtype/device: A and composed caches follow the model, the rest keeps its dtype -------------
    def _apply(self, fn, recurse: bool = True):
        keep = {n: b for n, b in self._buffers.items() if b is not None and (n in KEEP_FP32 or n == "bank")}
        super()._apply(fn, recurse)
        for n, old in keep.items():
            new = self._buffers[n]
            if new.dtype != old.dtype:  # move, never round-trip through a narrower dtype
                self._buffers[n] = old.to(new.device)
        return self

    # ---- access ----------------------------------------------------------------------------------
    def A(self, layer: int) -> torch.Tensor:
        """Adapters of MoE layer `layer` (a decoder-layer index): (E, p, r)."""
        return getattr(self, f"A_{layer}")

    def saved_tilde_B(self, layer: int) -> torch.Tensor | None:
        """Stored tilde_B (E, r, d) of a save_mixed export, else None."""
        return getattr(self, f"mixed_{layer}") if self.has_mixed else None

    @property
    def dtype(self) -> torch.dtype:
        return self.A(self.layers[0]).dtype

    def _host_codes(self) -> tuple:
        """Host copies of the codes (read once, so composing never syncs with the device)."""
        if self._host is None:
            ptr = [int(v) for v in self.indptr.tolist()]
            idx = [int(v) for v in self.indices.tolist()]
            val = [float(v) for v in self.values.float().tolist()]
            gains = [float(g) for g in self.gain.float().tolist()]
            check_codes(ptr, idx, val, self.m, len(self.layers) * self.E, f"family {self.name}")
            check_gains(gains, f"family {self.name}")
            if not self.released and self.bank.numel() and has_zero_row(self.bank):
                raise GlobeError(f"family {self.name}: a bank is all zeros (damaged file); every expert mixing "
                                 "from it would be zero")
            self._host = (ptr, idx, val, gains, max_nnz(ptr))
        return self._host

    def nnz(self, i: int) -> int:
        ptr = self._host_codes()[0]
        return ptr[i + 1] - ptr[i]

    def base(self, layer: int) -> int:
        """Global index (layer-major) of expert 0 of MoE layer `layer`."""
        return self.layers.index(layer) * self.E

    def bank_codes(self) -> BankCodes:
        """This family as the composition kernel reads it (banks (G, m, r*d), host CSR codes)."""
        if self.released:
            raise GlobeError(f"family {self.name}: the bank was released after precomposing every expert")
        ptr, idx, val, gains, width = self._host_codes()
        if self._bank_of is None:
            self._bank_of = [b for b in self.layer_bank for _ in range(self.E)]
        return BankCodes(self.bank.reshape(self.G, self.m, self.r * self.d), ptr, idx, val, self.r, self.d, gains,
                         self.activation, self.col_scale, self._bank_of, self.kernel, width)

    def compose(self, layer: int, e: int, dtype: torch.dtype) -> torch.Tensor:
        """tilde_B of expert e of MoE layer `layer`: (r, d) in dtype (stored tilde_B if save_mixed)."""
        mx = self.saved_tilde_B(layer)
        if mx is not None:
            return mx[e].to(dtype)
        return compose_many(self.bank_codes(), [self.base(layer) + e], dtype)[0]

    def release_bank(self) -> None:
        """Drop the bank once every block is precomposed (full cache): saves G * m * r * d numbers."""
        self.bank = torch.empty(0, device=self.bank.device, dtype=self.bank.dtype)
        self.released = True
