"""Reconstruction diagnostics of a fit run against the original checkpoint.

Why: a single error number hides where the fit fails. From a run dir (globe_config.json +
globe.safetensors, optional metrics.jsonl and summary.json) and the original experts we compute,
per family f:
  rel_fro_error        sqrt(sum ||W - W_hat||^2 / sum ||W||^2) overall, per MoE layer and per expert
  spectra              singular values of W_i and W_hat_i for a few experts (first, middle, last)
  effective_rank       smallest k with 95% of the squared singular-value energy, orig vs recon,
                       on up to `max_rank_experts` experts spread over all layers
  support_hist         number of experts with each code support size nnz(alpha_i)
  atom_popularity      experts using each atom (nnz) and the total code mass per atom
  coherence            |cos| between flattened atoms B_j (m x m), its max and mean off-diagonal
and the temperature/support/loss trajectories from metrics.jsonl (numeric fields per family).
Experts are read one layer at a time: memory is one layer's (E, p, d) in fp32 plus its W_hat.
Keys starting with '_' hold large arrays for plotting and are left out of the JSON file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .. import maps
from ..artifacts import Artifacts, Family
from ..errors import GlobeError

ENERGY = 0.95


def effective_rank(s: torch.Tensor, energy: float = ENERGY) -> int:
    """Smallest k with sum_{i<k} s_i^2 >= energy * sum s^2 (s sorted descending)."""
    e = s.double() ** 2
    c = torch.cumsum(e, 0) / e.sum().clamp_min(1e-300)
    return int(torch.searchsorted(c, torch.tensor(energy, dtype=c.dtype) - 1e-12).item()) + 1


def read_metrics(path: str | Path) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """metrics.jsonl -> {family|'all': {field: [(step, value)]}} for every numeric field."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    p = Path(path)
    if not p.is_file():
        return out
    for n, line in enumerate(p.read_text().splitlines()):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run killed mid-write leaves a partial last line
        if not isinstance(rec, dict):
            continue
        fam = str(rec.get("family", "all"))
        step = rec.get("step", n)
        for k, v in rec.items():
            if k in ("step", "family") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            out.setdefault(fam, {}).setdefault(k, []).append((float(step), float(v)))
    return out


def _find_checkpoint(arts: Artifacts, run_dir: Path, checkpoint: str | None):
    from ..io.checkpoint import Checkpoint

    cands = [checkpoint] if checkpoint else [arts.source, (arts.config.get("model") or {}).get("path")]
    for c in cands:
        if not c:
            continue
        for p in (Path(c).expanduser(), run_dir / c):
            if (p / "config.json").is_file():
                return Checkpoint(p)
    if checkpoint:
        raise GlobeError(f"original checkpoint not found: {checkpoint}")
    return None


def _spread(n: int, k: int) -> list[int]:
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def code_stats(fa: Family) -> dict[str, Any]:
    """maps.code_stats of the family's codes (support histogram, atom popularity/mass) plus pairwise
    atom coherence (artifact only)."""
    st = maps.code_stats(fa.codes)
    counts = st.pop("support_counts")
    atoms = fa.bank.float().reshape(-1, fa.bank.shape[-2] * fa.bank.shape[-1])  # every atom of every bank
    unit = atoms / atoms.norm(dim=1, keepdim=True).clamp_min(1e-12)
    coh = (unit @ unit.T).abs()
    m = coh.shape[0]
    off = coh[~torch.eye(m, dtype=torch.bool)] if m > 1 else torch.zeros(1)
    return {"support_hist": {str(k): c for k, c in enumerate(counts) if c}, **st,
            "coherence_max": float(off.max()), "coherence_mean": float(off.mean()), "_coherence": coh}


@torch.no_grad()
def recon_stats(fa: Family, arts: Artifacts, ckpt, family: str, n_spectra: int = 3,
                max_rank_experts: int = 64) -> dict[str, Any]:
    """Relative errors per layer/expert, spectra and effective ranks against the original experts."""
    E = arts.num_experts
    N = len(arts.moe_layers) * E
    spec_idx = set(_spread(N, n_spectra))
    rank_idx = set(_spread(N, max_rank_experts))
    per_layer, per_expert = {}, []
    num = den = 0.0
    spectra: dict[str, list] = {"experts": [], "orig": [], "recon": []}
    ranks: dict[str, list] = {"experts": [], "orig": [], "recon": []}
    for li, L in enumerate(arts.moe_layers):
        W = torch.stack([ckpt.expert(L, e, family, torch.float32) for e in range(E)])  # (E, p, d)
        idx = torch.arange(li * E, (li + 1) * E)
        Wh = fa.reconstruct(idx)  # (E, p, d)
        for e in arts.kept_in_layer(L):  # kept uncompressed: the runtime runs the source's own weights
            Wh[e] = W[e]
        r2 = ((W - Wh) ** 2).sum((1, 2)).double()
        w2 = (W**2).sum((1, 2)).double()
        per_expert += (r2 / w2.clamp_min(1e-300)).sqrt().tolist()
        per_layer[str(L)] = float((r2.sum() / w2.sum().clamp_min(1e-300)).sqrt())
        num, den = num + float(r2.sum()), den + float(w2.sum())
        for e in range(E):
            i = li * E + e
            if i not in spec_idx and i not in rank_idx:
                continue
            so, sr = torch.linalg.svdvals(W[e]), torch.linalg.svdvals(Wh[e])
            if i in spec_idx:
                spectra["experts"].append(i)
                spectra["orig"].append(so.tolist())
                spectra["recon"].append(sr.tolist())
            if i in rank_idx:
                ranks["experts"].append(i)
                ranks["orig"].append(effective_rank(so))
                ranks["recon"].append(effective_rank(sr))
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {
        "rel_fro_error": (num / den) ** 0.5 if den else float("nan"),
        "per_layer": per_layer,
        "_per_expert": per_expert,
        "per_expert_max": max(per_expert),
        "spectra": spectra,
        "effective_rank": {**ranks, "energy": ENERGY, "orig_mean": mean(ranks["orig"]),
                           "recon_mean": mean(ranks["recon"])},
    }


def diagnose(run_dir: str | Path, checkpoint: str | None = None, n_spectra: int = 3,
             max_rank_experts: int = 64) -> dict[str, Any]:
    """All diagnostics of a fit run dir; checkpoint defaults to the path recorded in the artifacts.

    Without a reachable checkpoint only the artifact-side figures are computed (noted under 'notes').
    """
    run = Path(run_dir).expanduser()
    arts = Artifacts.load(run)
    ckpt = _find_checkpoint(arts, run, checkpoint)
    out: dict[str, Any] = {"run_dir": str(run), "model_type": arts.model_type, "moe_layers": arts.moe_layers,
                           "num_experts": arts.num_experts, "families": {}, "notes": []}
    if ckpt is None:
        out["notes"].append(f"original checkpoint {arts.source!r} not found: errors and spectra skipped")
    for f, fa in arts.families.items():
        n, m, p, r, d = fa.shape
        st: dict[str, Any] = {"N": n, "m": m, "p": p, "r": r, "d": d, "stored_params": fa.stored_params(),
                              "original_params": n * p * d, **code_stats(fa)}
        if ckpt is not None:
            st.update(recon_stats(fa, arts, ckpt, f, n_spectra, max_rank_experts))
        out["families"][f] = st
    out["trajectories"] = read_metrics(run / "metrics.jsonl")
    summ = run / "summary.json"
    if summ.is_file():
        try:
            out["summary"] = json.loads(summ.read_text())
        except json.JSONDecodeError:
            out["notes"].append("summary.json is not valid JSON")
    return out


def public(d: Any) -> Any:
    """Drop '_'-prefixed keys (large plotting arrays) recursively: the JSON-friendly view."""
    if isinstance(d, dict):
        return {k: public(v) for k, v in d.items() if not str(k).startswith("_")}
    if isinstance(d, list):
        return [public(v) for v in d]
    return d
