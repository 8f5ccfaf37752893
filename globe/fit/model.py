"""Parameters and forward pass of one family's GloBE model (fp32 masters).

Shapes: bank_raw (m, r, d); logits z (N, m); gain g (). Atoms are kept at unit RMS
(B_j = raw_j / rms(raw_j), weight-norm style) so that the scalar gain alone sets how far into
phi's nonlinear range the mixture goes. alpha_i = sparsemap(z_i / T) lies on the simplex; the
map (globe.maps) always runs in fp32 (entmax NaNs in half precision). A_i is not a parameter here: it is given
in closed form by `solve.ridge_A` (variable projection), so the gradient w.r.t. bank/logits/gain
with A held at its optimum is the gradient of the projected objective (envelope theorem).
"""

from __future__ import annotations

import torch

from ..maps import get_activation, sparse_map

__all__ = ["GlobeParams", "sparse_map", "support", "unit_atoms"]


def unit_atoms(raw: torch.Tensor) -> torch.Tensor:
    """(m, r, d) atoms rescaled to unit RMS each."""
    rms = raw.pow(2).mean(dim=(1, 2), keepdim=True).clamp_min(1e-30).sqrt()
    return raw / rms


def support(alpha: torch.Tensor) -> torch.Tensor:
    """Number of nonzero codes per expert: (n,) int."""
    return (alpha > 0).sum(-1)


class GlobeParams(torch.nn.Module):
    """bank_raw (m, r, d), logits (N, m), gain (): the trainable part of one family."""

    def __init__(self, bank: torch.Tensor, logits: torch.Tensor, gain: float, activation: str = "silu",
                 map_kind: str = "entmax", map_alpha: float = 1.5):
        super().__init__()
        self.bank_raw = torch.nn.Parameter(bank.detach().float().clone())
        self.logits = torch.nn.Parameter(logits.detach().float().clone())
        self.gain = torch.nn.Parameter(torch.tensor(float(gain)))
        self.activation, self.map_kind, self.map_alpha = activation, map_kind, map_alpha

    def codes(self, idx: torch.Tensor | None, T: float) -> torch.Tensor:
        z = self.logits if idx is None else self.logits[idx]
        return sparse_map(z, T, self.map_kind, self.map_alpha)

    def mix(self, alpha: torch.Tensor, autocast: bool = False) -> torch.Tensor:
        """tilde_B = phi(g * alpha @ B): (n, m) -> (n, r, d), fp32 result."""
        B = unit_atoms(self.bank_raw)
        m, r, d = B.shape
        if autocast and alpha.device.type in ("cuda", "cpu"):
            with torch.autocast(alpha.device.type, dtype=torch.bfloat16):
                pre = (alpha @ B.reshape(m, r * d)).float()
        else:
            pre = alpha.float() @ B.reshape(m, r * d)
        return get_activation(self.activation).fn(self.gain * pre.reshape(-1, r, d))

    def mixed(self, idx: torch.Tensor | None, T: float, autocast: bool = False) -> torch.Tensor:
        return self.mix(self.codes(idx, T), autocast)

    @torch.no_grad()
    def constrain_logits(self, z_max: float) -> None:
        """Centre each z_i (entmax is shift invariant: no change) and cap its std at z_max so logits
        cannot outrun the temperature."""
        z = self.logits
        z.sub_(z.mean(-1, keepdim=True))
        if z_max > 0:
            sd = z.std(-1, keepdim=True, unbiased=False).clamp_min(1e-12)
            z.mul_(torch.where(sd > z_max, z_max / sd, torch.ones_like(sd)))
