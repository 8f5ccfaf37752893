"""The `globe fit` driver: config checks, resumable per-family fits, baselines, outputs.

Writes into cfg.output_dir exactly: globe-{f}.safetensors per family + globe.safetensors.index.json +
globe_config.json (the format of globe/artifacts.py; each family's file is written when that family
finishes, so two families' adapters are never in memory together),
metrics.jsonl (one JSON line per log step), summary.json; plus the private resume state under
`.globe_fit/` (run fingerprint, per-family checkpoints and finished results). A re-run with the same
output_dir and the same run resumes; a directory holding anything else is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..artifacts import Artifacts, atomic_write, family_file, finish_fit_dir, write_family_file
from ..config import GlobeConfig
from ..errors import GlobeError
from ..io.checkpoint import Checkpoint
from ..io.outputs import check_writable
from .baselines import mobe_fit, svd_error
from .budget import mobe_rank, svd_rank
from .loop import FamilyFit, fit_family
from .tracking import WandbRun, require_wandb, wandb_on

STATE = ".globe_fit"
OUTPUTS = ("globe.safetensors.index.json", "globe_config.json", "metrics.jsonl", "summary.json")  # + globe-{f}...
_NOT_RESULT = {"checkpoint_every", "log_every", "device", "max_memory_gb", "eval_chunk"}


def pick_device(name: str) -> str:
    """auto -> cuda, then mps, then cpu; a forced device that is missing is a GlobeError."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise GlobeError("train.device=cuda but no CUDA device is available")
    if name == "mps" and not has_mps:
        raise GlobeError("train.device=mps but no MPS device is available")
    return name


def _validate(cfg: GlobeConfig) -> None:
    try:
        for sec in (cfg.model, cfg.bank, cfg.sparsity, cfg.train, cfg.wandb):
            sec.__post_init__()
    except ValueError as e:
        raise GlobeError(str(e)) from None
    if not cfg.output_dir:
        raise GlobeError("output_dir: required for fit")
    check_writable(cfg.output_dir, what="output_dir")  # read-only, not ours, a file in the way: before any work
    if cfg.train.objective == "activation" and not Path(str(cfg.train.calib_text)).is_file():
        raise GlobeError(f"train.calib_text: file not found: {cfg.train.calib_text}")
    if wandb_on(cfg):
        require_wandb(cfg)  # fail before any work: package missing, online without credentials


def fingerprint(cfg: GlobeConfig, ck: Checkpoint) -> dict[str, Any]:
    """What makes two runs the same: the model (config + weight file sizes) and result-relevant config."""
    d = cfg.to_dict()
    train = {k: v for k, v in d["train"].items() if k not in _NOT_RESULT}
    model = {"config_sha": hashlib.sha256(json.dumps(ck.config, sort_keys=True).encode()).hexdigest(),
             "files": {f.name: f.stat().st_size for f in ck.files}}
    body = {"model": model, "bank": d["bank"], "sparsity": d["sparsity"], "train": train}
    return {"sha": hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest(),
            "source": str(ck.dir), **body}


def _claim(out: Path, fp: dict) -> None:
    """Refuse an output_dir holding a different run; record ours."""
    run_json = out / STATE / "run.json"
    if run_json.is_file():
        try:
            old = json.loads(run_json.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("sha") != fp["sha"]:
            raise GlobeError(f"output_dir {out} holds a different fit (other model or config); "
                             "choose a new output_dir or delete it")
        return
    if out.exists() and any(out.iterdir()):
        raise GlobeError(f"output_dir {out} is not empty and holds no GloBE fit of this run; refusing to overwrite")
    (out / STATE).mkdir(parents=True, exist_ok=True)
    atomic_write(run_json, lambda p: Path(p).write_text(json.dumps(fp, indent=2)))


class _Log:
    """metrics.jsonl (+ optional wandb run): on resume, lines of a family past its checkpoint step are dropped."""

    def __init__(self, out: Path, cfg: GlobeConfig):
        self.path = out / "metrics.jsonl"
        self.wb = WandbRun(cfg, out) if wandb_on(cfg) else None

    def rewind(self, fam: str, step: int) -> None:
        if not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines()
                if ln.strip() and not (json.loads(ln).get("family") == fam and json.loads(ln).get("step", 0) > step)]
        atomic_write(self.path, lambda p: Path(p).write_text("".join(k + "\n" for k in keep)))

    def __call__(self, rec: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.wb is not None:
            self.wb.log(rec)

    def codes_hook(self, fam: str):
        """Per-evaluation code histograms for wandb, or None when wandb is off."""
        return None if self.wb is None else (lambda step, codes: self.wb.codes(fam, step, codes))

    def family_done(self, fam: str, fit: FamilyFit) -> None:
        if self.wb is not None:
            self.wb.family_done(fam, fit.artifact.codes, fit.metrics, fit.metrics["steps_run"])

    def summary(self, summ: dict) -> None:
        if self.wb is not None:
            self.wb.summary(summ)

    def close(self, ok: bool) -> None:
        if self.wb is not None:
            self.wb.close(ok)


def _experts(ck: Checkpoint, fam: str, max_gb: float) -> torch.Tensor:
    """All routed experts of a family; fp32 if that fits the memory budget, else the stored dtype."""
    N = len(ck.moe_layers) * ck.num_experts
    fp32_gb = N * ck.p * ck.hidden_size * 4 / 1e9
    return ck.load_family(fam, dtype=torch.float32 if fp32_gb <= max_gb else None)


def _baselines(W, fit: FamilyFit, sv, scales, ck: Checkpoint, cfg: GlobeConfig, fam: str, dev: str) -> dict:
    N, p, d = W.shape
    layers = len(ck.moe_layers)
    stored = fit.metrics["stored_params"]
    k = svd_rank(stored, N, p, d)
    out = {"svd": {"rel_fro_error": svd_error(sv, scales, k), "rank": k, "stored_params": N * k * (p + d),
                   "original_params": N * p * d}}
    m_l = cfg.bank.mobe_m or max(2, cfg.bank.m(fam) // layers)
    r = min(mobe_rank(stored, N, layers, p, d, m_l), p if not cfg.bank.allow_r_above else 4 * p)
    steps = cfg.train.baseline_steps or cfg.train.steps
    out["mobe"] = mobe_fit(W, layers, m_l, r, activation=cfg.bank.activation if cfg.bank.activation != "identity"
                           else "silu", steps=steps, lr=cfg.train.lr, seed=cfg.bank.seed, lam=cfg.train.ridge, dev=dev)
    return out


def run_fit(cfg: GlobeConfig, *, interrupt_at: dict[str, int] | None = None, progress: bool | None = None) -> dict:
    """Fit GloBE banks for cfg.train.families of cfg.model.path; write outputs; return the summary.

    interrupt_at {family: step} simulates a kill (KeyboardInterrupt) at that step (tests of resume).
    """
    t0 = time.time()
    _validate(cfg)
    ck = Checkpoint(cfg.model.path, cfg.model.revision)  # headers only: no weight is read here
    N = len(ck.moe_layers) * ck.num_experts
    try:
        cfg.check_shapes(ck.p, ck.hidden_size, N)
    except ValueError as e:
        raise GlobeError(str(e)) from None
    dev = pick_device(cfg.train.device)
    out = Path(cfg.output_dir)
    r = cfg.bank.rank(ck.p)  # room for the final globe-{f}.safetensors: A (N, p, r), bank, codes, fp32
    check_writable(out, 4 * sum(N * ck.p * r + cfg.bank.m(f) * (r * ck.hidden_size + N) for f in cfg.train.families),
                   what="output_dir")
    fp = fingerprint(cfg, ck)
    _claim(out, fp)
    torch.manual_seed(cfg.train.seed)
    log = _Log(out, cfg)  # opens the wandb run, if any: closed in the finally below, also on error
    progress = sys.stderr.isatty() if progress is None else progress
    results: dict[str, dict] = {}
    ok = False
    try:
        whiten_for, rows_for = _whitening(cfg, ck)
        for fam in cfg.train.families:
            done = out / STATE / f"{fam}.done.json"
            staged = out / STATE / f"{fam}.safetensors"
            if done.is_file() and (staged.is_file() or (out / family_file(fam)).is_file()):
                continue  # finished earlier: its tensors stay on disk, never two families' adapters in memory
            ckpt = out / STATE / f"{fam}.ckpt.pt"
            log.rewind(fam, torch.load(ckpt, weights_only=False)["step"] if ckpt.is_file() else 0)
            W = _experts(ck, fam, cfg.train.max_memory_gb)
            rows = None if rows_for is None else (lambda idx, w=rows_for[fam]: w[idx.cpu()])
            fit = fit_family(W, cfg, fam, whiten=whiten_for, rows=rows, dev=dev, ckpt_path=ckpt, log=log,
                             progress=progress, experts_per_layer=ck.num_experts,
                             interrupt_at=(interrupt_at or {}).get(fam), on_codes=log.codes_hook(fam))
            state = torch.load(ckpt, weights_only=False)
            from .init import expert_scales
            sc = expert_scales(W)
            sv = state["sv"] if whiten_for is None else _svdvals(W, sc)  # plain-weight spectra for the SVD baseline
            base = _baselines(W, fit, sv, sc, ck, cfg, fam, dev) if cfg.train.baselines else {}
            if not math.isfinite(fit.metrics["rel_fro_error"]):
                raise GlobeError(f"fit of family {fam} produced a non-finite error")
            one = _artifacts(ck, cfg, {fam: fit.artifact})
            write_family_file(out / STATE, fam, one, name=f"{fam}.safetensors")
            res = {"metrics": fit.metrics, "baselines": base, "family_meta": fit.artifact.family_meta()}
            atomic_write(done, lambda p, res=res: Path(p).write_text(json.dumps(res, indent=1)))
            log.family_done(fam, fit)
            del W, fit, res, state, one
        for fam in cfg.train.families:
            results[fam] = json.loads((out / STATE / f"{fam}.done.json").read_text())
            staged = out / STATE / f"{fam}.safetensors"
            if staged.is_file():
                os.replace(staged, out / family_file(fam))
        meta = _artifacts(ck, cfg, {}).meta()
        meta["families"] = {f: results[f]["family_meta"] for f in cfg.train.families}
        finish_fit_dir(out, meta, list(cfg.train.families))
        summary = _summary(results, cfg, ck, dev, time.time() - t0)
        atomic_write(out / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2) + "\n"))
        if not (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").touch()
        log.summary(summary)
        ok = True
    finally:
        log.close(ok)
    return summary


def _artifacts(ck: Checkpoint, cfg: GlobeConfig, families: dict) -> Artifacts:
    return Artifacts(families=families, model_type=ck.model_type, moe_layers=list(ck.moe_layers),
                     num_experts=ck.num_experts, hidden_size=ck.hidden_size, expert_intermediate_size=ck.p,
                     source=str(ck.dir), config=cfg.to_dict())


def _svdvals(W: torch.Tensor, sc: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    return torch.cat([torch.linalg.svdvals(W[a:a + chunk].float() / sc[a:a + chunk, None, None])
                      for a in range(0, W.shape[0], chunk)])


def _whitening(cfg: GlobeConfig, ck: Checkpoint):
    """(whiten callable | None, {family: row weights (N, p)} | None) for the activation objective."""
    if cfg.train.objective != "activation":
        return None, None
    from .calib import input_covariances, row_weights, whitener
    covs, per = input_covariances(ck, cfg.train.calib_text, cfg.train.calib_tokens, cfg.train.calib_per_expert)
    rows = row_weights(ck, cfg.train.calib_text, cfg.train.calib_tokens) if cfg.train.calib_row_weights else None
    return whitener(ck, covs, per, cfg.train.calib_per_expert), rows


def _summary(results: dict, cfg: GlobeConfig, ck: Checkpoint, dev: str, secs: float) -> dict:
    fam_out, base_out = {}, {}
    for fam, res in results.items():
        mt = res["metrics"]
        fam_out[fam] = {k: mt[k] for k in ("rel_fro_error", "median_support", "stored_params", "original_params",
                                           "rel_fro_error_before_prune", "prune_error_cost", "p95_support",
                                           "init_rel_fro_error", "svd_floor_rank_r", "temperature", "gain", "m", "r",
                                           "best_step", "steps_run", "stopped_early", "fit_time_s")}
        fam_out[fam]["stored_fraction"] = mt["stored_params"] / mt["original_params"]
        for name, b in res["baselines"].items():
            base_out.setdefault(name, {})[fam] = b
            fam_out[fam][f"ratio_vs_{name}"] = mt["rel_fro_error"] / max(b["rel_fro_error"], 1e-30)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"model": str(ck.dir), "model_type": ck.model_type, "num_experts_total": len(ck.moe_layers) * ck.num_experts,
            "families": fam_out, "baselines": base_out, "fit_time_s": secs, "peak_rss_bytes": peak, "device": dev,
            "objective": cfg.train.objective, "torch_threads": torch.get_num_threads()}
