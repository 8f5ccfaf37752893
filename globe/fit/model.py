"""Parameters and forward pass of one family's GloBE model (fp32 masters).

Shapes: bank_raw (G, m, r, d) (G banks, `share.py`; G = 1: one global bank); logits z (N, m), each
expert's codes over the m atoms of its own bank (`bank_of` (N,)); gain g (G,). Atoms are kept at unit RMS
(B_j = raw_j / rms(raw_j), weight-norm style) so that the scalar gain alone sets how far into
phi's nonlinear range the mixture goes. alpha_i = sparsemap(z_i / T) lies on the simplex; the
map (globe.maps) always runs in fp32 (entmax NaNs in half precision). A_i is not a parameter here: it is given
in closed form by `solve.ridge_A` (variable projection), so the gradient w.r.t. bank/logits/gain
with A held at its optimum is the gradient of the projected objective (envelope theorem).
"""

from __future__ import annotations

import torch

from ..errors import GlobeError
from ..maps import get_activation, sparse_map

__all__ = ["GlobeParams", "sparse_map", "unit_atoms"]


def unit_atoms(raw: torch.Tensor) -> torch.Tensor:
    """(..., m, r, d) atoms rescaled to unit RMS each."""
    rms = raw.pow(2).mean(dim=(-2, -1), keepdim=True).clamp_min(1e-30).sqrt()
    return raw / rms


class GlobeParams(torch.nn.Module):
    """bank_raw (G, m, r, d), logits (N, m), gain (G,): the trainable part of one family.

    bank: (m, r, d) (one global bank) or (G, m, r, d); gain: a float or (G,); bank_of (N,) int64: the bank
    of every expert (default: all in bank 0). A 3-D bank or a float gain (older checkpoints) is G = 1.
    """

    def __init__(self, bank: torch.Tensor, logits: torch.Tensor, gain: float | torch.Tensor, activation: str = "silu",
                 map_kind: str = "entmax", map_alpha: float = 1.5, bank_of: torch.Tensor | None = None):
        super().__init__()
        bank = bank.detach().float()
        bank = bank[None] if bank.ndim == 3 else bank
        G = bank.shape[0]
        self.bank_raw = torch.nn.Parameter(bank.clone())
        self.logits = torch.nn.Parameter(logits.detach().float().clone())
        g = torch.as_tensor(gain, dtype=torch.float32).detach().reshape(-1)
        self.gain = torch.nn.Parameter(g.expand(G).clone() if g.numel() == 1 else g.clone())
        if self.gain.numel() != G:
            raise GlobeError(f"gain has {self.gain.numel()} entries for {G} banks")
        bo = torch.zeros(logits.shape[0], dtype=torch.int64) if bank_of is None else bank_of.long().reshape(-1)
        if bo.numel() != logits.shape[0] or (bo.numel() and (int(bo.min()) < 0 or int(bo.max()) >= G)):
            raise GlobeError(f"bank_of must give each of the {logits.shape[0]} experts a bank in [0, {G})")
        self.register_buffer("bank_of", bo, persistent=False)
        self.activation, self.map_kind, self.map_alpha = activation, map_kind, map_alpha

    @property
    def n_banks(self) -> int:
        return self.bank_raw.shape[0]

    def codes(self, idx: torch.Tensor | None, T: float) -> torch.Tensor:
        z = self.logits if idx is None else self.logits[idx]
        return sparse_map(z, T, self.map_kind, self.map_alpha)

    def compose(self, alpha: torch.Tensor, autocast: bool = False, idx: torch.Tensor | None = None,
                fixed_bank: bool = False) -> torch.Tensor:
        """tilde_B = phi(g_b * alpha @ B_b): (n, m) -> (n, r, d) fp32, b = bank of each expert.

        idx (n,): the experts of the rows of alpha (needed when G > 1; None: all N experts in order).
        fixed_bank: treat bank and gain as constants (no graph through them; code-only updates).
        """
        raw, gains = (self.bank_raw.detach(), self.gain.detach()) if fixed_bank else (self.bank_raw, self.gain)
        B = unit_atoms(raw)  # (G, m, r, d)
        G, m, r, d = B.shape
        use_ac = autocast and alpha.device.type in ("cuda", "cpu")

        def lin(a: torch.Tensor, g: int) -> torch.Tensor:
            if use_ac:
                with torch.autocast(alpha.device.type, dtype=torch.bfloat16):
                    return (a @ B[g].reshape(m, r * d)).float()
            return a.float() @ B[g].reshape(m, r * d)

        if G == 1:
            pre, gain = lin(alpha, 0), gains[0]
        else:
            b = self.bank_of if idx is None else self.bank_of[idx.to(self.bank_of.device)]
            order = torch.argsort(b, stable=True)
            parts, bs = [], b[order]
            for g in bs.unique().tolist():  # one GEMM per bank present in the batch
                parts.append(lin(alpha[order[bs == g]], g))
            pre = torch.cat(parts)[torch.argsort(order)]
            gain = gains[b][:, None]
        return get_activation(self.activation).fn((gain * pre).reshape(-1, r, d))

    def compose_experts(self, idx: torch.Tensor | None, T: float, autocast: bool = False) -> torch.Tensor:
        """tilde_B of experts idx (all if None) from their current codes at temperature T: (n, r, d)."""
        return self.compose(self.codes(idx, T), autocast, idx)

    @torch.no_grad()
    def constrain_logits(self, z_max: float) -> None:
        """Centre each z_i (entmax is shift invariant: no change) and cap its std at z_max so logits
        cannot outrun the temperature."""
        z = self.logits
        z.sub_(z.mean(-1, keepdim=True))
        if z_max > 0:
            sd = z.std(-1, keepdim=True, unbiased=False).clamp_min(1e-12)
            z.mul_(torch.where(sd > z_max, z_max / sd, torch.ones_like(sd)))
