"""The `globe fit` driver: config checks, resumable per-family fits, baselines, outputs.

Writes into cfg.output_dir exactly: globe-{f}.safetensors per family + globe.safetensors.index.json +
globe_config.json (the format of globe/artifacts.py; each family's file is written when that family
finishes, so two families' adapters are never in memory together),
metrics.jsonl (one JSON line per log step), summary.json; plus the private resume state under
`.globe_fit/` (run fingerprint, per-family checkpoints and finished results). A re-run with the same
output_dir and the same run resumes; a directory holding anything else is refused.
Sharded (torchrun, `train.distributed`, globe/fit/dist.py): every rank runs run_fit on its own MoE
layers; rank 0 alone claims the directory, logs, writes the outputs and the summary.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..artifacts import Artifacts, FamilyWriter, atomic_write, family_file, finish_fit_dir, kept_count
from ..common import has_zero_row, resolve_device
from ..config import GlobeConfig
from ..errors import GlobeError
from ..io.checkpoint import Checkpoint
from ..io.outputs import check_writable
from ..progress import Progress
from ..progress import log as plog
from .baselines import mobe_fit, svd_error
from .budget import fit_rank_plan, mobe_rank, svd_rank
from .calib import calibrated, calibration
from .dist import Dist, RankAWriter, read_checkpoint, wanted
from .init import expert_scales, inv_scales, quiet, spectra
from .keep import account_kept, hide_kept, restore_kept
from .loop import FamilyFit, fit_family
from .share import n_banks
from .tracking import FitLog, require_wandb, wandb_on

STATE = ".globe_fit"
OUTPUTS = ("globe.safetensors.index.json", "globe_config.json", "metrics.jsonl", "summary.json")  # + globe-{f}...
_NOT_RESULT = {"checkpoint_every", "log_every", "device", "max_memory_gb", "eval_chunk", "distributed"}


def _validate(cfg: GlobeConfig) -> None:
    try:
        for sec in (cfg.model, cfg.bank, cfg.sparsity, cfg.train, cfg.wandb):
            sec.__post_init__()
    except ValueError as e:
        raise GlobeError(str(e)) from None
    if not cfg.output_dir:
        raise GlobeError("output_dir: required for fit")
    check_writable(cfg.output_dir, what="output_dir")  # read-only, not ours, a file in the way: before any work
    if float(cfg.bank.keep_fraction) > 0 and not cfg.train.calib_text:
        raise GlobeError("bank.keep_fraction needs train.calib_text: the busiest experts are those the calibration "
                         "text routes the most gate mass to")
    if calibrated(cfg) and not Path(str(cfg.train.calib_text)).is_file():
        what = "is a directory, not a text file" if Path(str(cfg.train.calib_text)).is_dir() else "file not found"
        raise GlobeError(f"train.calib_text: {what}: {cfg.train.calib_text}")
    if wandb_on(cfg):
        require_wandb(cfg)  # fail before any work: package missing, online without credentials


def fingerprint(cfg: GlobeConfig, ck: Checkpoint) -> dict[str, Any]:
    """What makes two runs the same: the model (config + weight file sizes) and result-relevant config."""
    d = cfg.to_dict()
    train = {k: v for k, v in d["train"].items() if k not in _NOT_RESULT}
    if train.get("expert_weights") == "uniform":  # inert: a uniform fit keeps the identity it had before them
        train.pop("expert_weights")
        train.pop("expert_weight_power", None)
    model = {"config_sha": hashlib.sha256(json.dumps(ck.config, sort_keys=True).encode()).hexdigest(),
             "files": {f.name: f.stat().st_size for f in ck.files}}
    body = {"model": model, "bank": d["bank"], "sparsity": d["sparsity"], "train": train}
    if calibrated(cfg):  # the text's content, not its path (relative or absolute, moved or edited)
        digest = hashlib.sha256()
        with open(str(cfg.train.calib_text), "rb") as f:  # in 1 MiB pieces: a large corpus is never held whole
            for piece in iter(lambda: f.read(1 << 20), b""):
                digest.update(piece)
        body["calib_text_sha256"] = digest.hexdigest()
        train.pop("calib_text", None)
    return {"sha": hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest(),
            "source": str(ck.dir), **body}


def _differences(old: dict, new: dict) -> list[str]:
    """Dotted names of the fingerprint entries that differ between two runs (e.g. train.expert_weights)."""
    out = []
    for sec in sorted((set(old) | set(new)) - {"sha", "source"}):
        a, b = old.get(sec), new.get(sec)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{sec}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(sec)
    return out


def _claim(out: Path, fp: dict) -> bool:
    """Refuse an output_dir holding a different run; record ours. True when this call made the claim (a new
    or empty output_dir), False when it resumes an earlier run's."""
    run_json = out / STATE / "run.json"
    if run_json.is_file():
        try:
            old = json.loads(run_json.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("sha") != fp["sha"]:
            diff = _differences(old, json.loads(json.dumps(fp, default=str)))
            what = f" (differs in {', '.join(diff[:4])}{', ...' if len(diff) > 4 else ''})" if diff else \
                " (other model or config)"
            raise GlobeError(f"output_dir {out} holds a different fit{what}; choose a new output_dir or delete it")
        return False
    if out.exists() and any(out.iterdir()):
        raise GlobeError(f"output_dir {out} is not empty and holds no GloBE fit of this run; refusing to overwrite")
    (out / STATE).mkdir(parents=True, exist_ok=True)
    atomic_write(run_json, lambda p: Path(p).write_text(json.dumps(fp, indent=2)))
    return True


def _unclaim(out: Path, existed: bool) -> None:
    """After a fit that failed before saving anything to resume from (bad weights, an error in the first
    steps, Ctrl-C before the first checkpoint): remove the claim and the metrics log this run wrote (its steps
    will be redone; a kept log would block the rerun as a foreign file), and output_dir itself when this run
    created it and nothing else is in it. Any checkpoint or finished family keeps everything."""
    state = out / STATE
    if not state.is_dir() or any(f.name != "run.json" for f in state.iterdir()):
        return
    (state / "run.json").unlink(missing_ok=True)
    state.rmdir()
    (out / "metrics.jsonl").unlink(missing_ok=True)  # only this run wrote it: it made the claim
    if not existed and not any(out.iterdir()):
        out.rmdir()


def _expert_tensor(ck: Checkpoint, L: int, e: int, fam: str) -> str:
    """On-disk name of a routed expert's matrix (fused layouts: the family's rows of expert e)."""
    if ck.layout == "per_expert":
        return ck.expert_name(L, e, fam)
    from ..compat import GATE_UP, experts_prefix
    return f"{experts_prefix(ck.spec, L)}.{GATE_UP}[{e}, {fam} rows]"


def _experts(ck: Checkpoint, fam: str, max_gb: float, progress: bool | None = None, dist: Dist | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """All routed experts of a family (N, p, d), fp32 if that fits the memory budget, else the stored dtype,
    and their RMS scales (N,), computed while reading (no second pass over the family).
    dist (sharded fit): only this rank's layers are read (a dist.Shard; fp32 if the shard fits max_gb);
    the scales of all N experts are gathered.

    Raises GlobeError naming the tensor, layer and expert at the first expert holding NaN/inf, before
    any fitting work on the family. Progress: one line per GLOBE_PROGRESS_EVERY_S seconds (or tqdm).
    """
    dist = dist or Dist()
    E, p, d = ck.num_experts, ck.p, ck.hidden_size
    layers = [ck.moe_layers[li] for li in dist.layers] if dist.on else list(ck.moe_layers)  # [dist] our layers
    N = len(layers) * E
    want = torch.float32 if N * p * d * 4 / 1e9 <= max_gb else None  # None: stored dtype (FP8 sources: bf16)
    dt = want or ck.expert(layers[0], 0, fam).dtype
    W = torch.empty((N, p, d), dtype=dt)
    sc = torch.empty(N)
    experts = ((L, e, ck.expert(L, e, fam, want)) for L in layers for e in range(E))
    with Progress(N, f"read {fam} experts", "experts", bar=progress, quiet=quiet(N * p * d)) as pg:
        for i, (L, e, w) in enumerate(experts):
            sc[i] = expert_scales(w[None])[0]
            if not math.isfinite(float(sc[i])):
                bad = int((~torch.isfinite(w)).sum())
                raise GlobeError(f"tensor {_expert_tensor(ck, L, e, fam)} (layer {L}, expert {e}, family {fam}) "
                                 f"holds {bad} non-finite values (NaN/inf); repair the checkpoint before fitting")
            W[i].copy_(w)
            pg.update(1)
    if dist.on:
        return dist.shard(W), dist.gather_rows(sc)
    return W, sc


def _baselines(W, fit: FamilyFit, sv, scales, ck: Checkpoint, cfg: GlobeConfig, fam: str, dev: str,
               progress: bool | None = None, dist: Dist | None = None, weights: torch.Tensor | None = None) -> dict:
    """SVD baseline (from the spectra: no extra pass) and, with train.baseline_mobe, the MoBE-style bank
    (with the fit's expert weights, if any; per-expert SVD does not depend on them); each entry records its
    own wall time `time_s` (the SVD's includes computing plain spectra if needed)."""
    N, p, d = W.shape
    layers = len(ck.moe_layers)
    stored = fit.metrics["stored_params"]
    k = svd_rank(stored, N, p, d)
    t = time.time()
    if sv is None:  # the warm start decomposed whitened experts: plain spectra needed for the SVD baseline
        sv = _svdvals(W, scales, progress=progress, desc=f"SVD baseline {fam}: spectra", dist=dist)
    out = {"svd": {"rel_fro_error": svd_error(sv, scales, k), "rank": k, "stored_params": N * k * (p + d),
                   "original_params": N * p * d, "time_s": time.time() - t}}
    if not cfg.train.baseline_mobe:
        return out
    m_l = cfg.bank.mobe_m or max(2, cfg.bank.m(fam) // layers)
    r = min(mobe_rank(stored, N, layers, p, d, m_l), p if not cfg.bank.allow_r_above else 4 * p)
    steps = cfg.train.baseline_steps or cfg.train.steps
    t = time.time()
    out["mobe"] = mobe_fit(W, layers, m_l, r, activation=cfg.bank.activation if cfg.bank.activation != "identity"
                           else "silu", steps=steps, lr=cfg.train.lr, seed=cfg.bank.seed, lam=cfg.train.ridge, dev=dev,
                           scales=scales, progress=progress, desc=f"MoBE-style baseline {fam}", dist=dist,
                           weights=weights)
    out["mobe"]["time_s"] = time.time() - t
    return out


def _check_diverged(fam: str, fit: Any, cfg: GlobeConfig, tail: str = "") -> None:
    """GlobeError when the fit's result is no better than zero experts: a non-finite error or gain, an all-zero
    bank, or (weight objective) relative error 1, which ridge-solved adapters over any non-degenerate bank stay
    below; the activation objective minimises another norm, so its weight error may exceed 1 early on. Adam
    steps are of size ~lr: a huge train.lr drives the bank to inf, which the atom normalisation turns into 0."""
    err, art = float(fit.metrics["rel_fro_error"]), fit.artifact
    why = None
    if not math.isfinite(err) or not bool(torch.isfinite(art.gain).all()):
        why = "a non-finite error or gain"
    elif has_zero_row(art.bank):
        why = "an all-zero bank"
    elif cfg.train.objective == "weight" and err >= 1.0 - 1e-6:
        why = f"relative error {err:.6f} (1.0 = no better than all-zero experts)"
    if why:
        tail = tail or "into a new output_dir (this one holds the diverged run: delete it)"
        raise GlobeError(f"fit of family {fam} diverged: {why}; lower train.lr (now {cfg.train.lr:g}) and fit again "
                         f"{tail}")


def run_fit(cfg: GlobeConfig, *, progress: bool | None = None) -> dict:
    """Fit GloBE banks for cfg.train.families of cfg.model.path; write outputs; return the summary.
    """
    t0 = time.time()
    _validate(cfg)
    tr = cfg.train
    if tr.expert_weights == "uniform" and float(tr.expert_weight_power) != 0.5:
        plog("note: train.expert_weight_power=%g has no effect with train.expert_weights=uniform",
             tr.expert_weight_power)
    if tr.calib_text and not calibrated(cfg):
        plog("note: train.calib_text is read only with train.objective=activation, train.expert_weights=routing or "
             "bank.keep_fraction > 0; this fit does not use it")
    ck = Checkpoint(cfg.model.path, cfg.model.revision)  # headers only: no weight is read here
    N = len(ck.moe_layers) * ck.num_experts
    try:
        cfg.check_shapes(ck.p, ck.hidden_size, N, len(ck.moe_layers))
    except ValueError as e:
        raise GlobeError(str(e)) from None
    _check_calib_memory(cfg, ck, N)
    if calibrated(cfg):  # a binary, empty or too-short text fails here, before any output
        from .calib import calib_ids
        calib_ids(ck, cfg.train.calib_text, cfg.train.calib_tokens)
    dev = str(resolve_device(cfg.train.device, "train.device"))  # 'cuda' | 'mps' | 'cpu'
    dist = Dist.setup(dev, len(ck.moe_layers), ck.num_experts) if wanted(cfg.train.distributed) else Dist()
    lead = dist.rank == 0  # [dist] rank 0 claims, logs and writes the outputs; the others only fit
    out = Path(cfg.output_dir)
    plans = {f: fit_rank_plan(cfg, f, N, ck.p, ck.hidden_size, len(ck.moe_layers)) for f in cfg.train.families}
    G = n_banks(cfg.bank.share, len(ck.moe_layers))  # room for the final globe-{f}.safetensors, fp32
    check_writable(out, (2 if dist.on else 1) * 4 * sum(N * ck.p * plans[f].r + cfg.bank.m(f) * (
        G * plans[f].r * ck.hidden_size + N) for f in cfg.train.families), what="output_dir")
    fp = fingerprint(cfg, ck)
    existed = out.exists()
    claimed = dist.on_rank0(lambda: _claim(out, fp))
    for f, pl in plans.items():  # after the claim (no note before a refusal): a budget missed by more than 10%
        # through rounding is said, not silent
        if lead and pl.source == "budget" and pl.unrounded and pl.predicted < 0.9 * pl.budget:
            plog("fit %s: bank.budget=%g gives r=%d, rounded down to r=%d (a multiple of bank.r_multiple=%d), which "
                 "keeps %.3f of the routed parameters; bank.r_multiple=1 keeps %.3f", f, pl.budget, pl.unrounded[0],
                 pl.r, cfg.bank.r_multiple, pl.predicted, pl.unrounded[1])
    if lead and float(cfg.bank.keep_fraction) > 0 and not kept_count(cfg.bank.keep_fraction, N):
        plog("note: bank.keep_fraction=%g of %d experts rounds to 0: no expert is kept uncompressed",
             cfg.bank.keep_fraction, N)
    share, L = str(cfg.bank.share), len(ck.moe_layers)
    if lead and share.startswith("group:") and int(share.split(":")[1]) >= L > 1:
        plog("note: bank.share=%s covers all %d MoE layers: one bank, as bank.share=global", share, L)
    torch.manual_seed(cfg.train.seed)
    log = FitLog(out, cfg, on=lead)  # opens the wandb run, if any: closed in the finally below, also on error
    progress = (sys.stderr.isatty() if progress is None else progress) and lead
    quiet_logger = _quiet_unless(lead)
    results: dict[str, dict] = {}
    ok = diverged = stopped = False
    try:
        cal: list = []  # the calibration pass runs once, and only if a family is still to fit (not on a rerun)
        for fam in cfg.train.families:
            done = out / STATE / f"{fam}.done.json"
            staged = out / STATE / f"{fam}.safetensors"
            if dist.on_rank0(lambda done=done, staged=staged, fam=fam: done.is_file() and (
                    staged.is_file() or (out / family_file(fam)).is_file())):
                if lead:
                    plog("fit %s: finished earlier in %s (same settings): kept, not refitted", fam, out)
                continue  # finished earlier: its tensors stay on disk, never two families' adapters in memory
            if not cal:
                cal.extend(calibration(cfg, ck, progress))
            whiten_for, rows_for, weights, wstats, kept, keep_stats = cal
            ckpt = out / STATE / f"{fam}.ckpt.pt"
            log.rewind(fam, read_checkpoint(ckpt, mmap=True)["step"] if lead and ckpt.is_file() else 0)  # no A read
            W, sc = _experts(ck, fam, cfg.train.max_memory_gb, progress, dist)
            kept_sc = hide_kept(W, sc, kept, dist)  # kept experts: zero, fitted as dead ones (fit/keep.py)
            rows = None if rows_for is None else (lambda idx, w=rows_for[fam]: w[idx.cpu()])
            def sink(family, fam=fam):  # the final adapters stream into the family's file, chunk by chunk
                if dist.on:  # [dist] per-rank files, assembled by rank 0
                    return RankAWriter(dist, out / STATE, fam, family, list(ck.moe_layers),
                                       out / STATE / f"{fam}.safetensors")
                return FamilyWriter(out / STATE / f"{fam}.safetensors", fam, family, list(ck.moe_layers))
            fit = fit_family(W, cfg, fam, whiten=whiten_for, rows=rows, weights=weights, dev=dev, ckpt_path=ckpt,
                             log=log if lead else None, progress=progress, experts_per_layer=ck.num_experts,
                             scales=sc, sink=sink,
                             on_codes=log.codes_hook(fam), dist=dist)
            # spectra of the warm start (mmap: only sv is read, not the whole optimiser state)
            sv = read_checkpoint(ckpt, mmap=True)["sv"].clone() if whiten_for is None else None
            if kept:  # errors over all experts; the baselines compress every expert, kept ones too
                fit.artifact.kept = list(kept)
                fit.metrics = account_kept(fit.metrics, kept, kept_sc, sc, fit.artifact.stored_params())
                sv = restore_kept(W, sc, sv, kept, kept_sc, ck, fam, dist)
            base = _baselines(W, fit, sv, sc, ck, cfg, fam, dev, progress, dist, weights) if cfg.train.baselines else {}
            if base:
                plog("baselines %s: %s", fam, ", ".join(f"{k} error {b['rel_fro_error']:.4f} in {b['time_s']:.1f} s"
                                                        for k, b in base.items()))
            # a diverged run's checkpoints cannot help a rerun (lower lr: another fit); a directory this run
            # created, holding no finished family, goes entirely
            drop = lead and not any((out / STATE).glob("*.done.json"))
            tail = ("" if not drop else "(the output_dir this run created was removed)" if not existed else
                    "(this run's state was removed from the output_dir)")
            try:
                _check_diverged(fam, fit, cfg, tail)
            except GlobeError:
                diverged = drop
                raise
            res = {"metrics": {**fit.metrics, **plans[fam].as_dict()}, "baselines": base,
                   "family_meta": fit.artifact.family_meta(), "expert_weights": wstats, "keep": keep_stats}
            if lead:
                atomic_write(done, lambda p, res=res: Path(p).write_text(json.dumps(res, indent=1)))
            log.family_done(fam, fit)
            del W, fit, res
            dist.barrier()
        peaks = _rank_peaks(dist, dev) if dist.on else None  # [dist] every rank's peak memory

        def finish() -> dict:
            for fam in cfg.train.families:
                results[fam] = json.loads((out / STATE / f"{fam}.done.json").read_text())
                staged = out / STATE / f"{fam}.safetensors"
                if staged.is_file():
                    os.replace(staged, out / family_file(fam))
            meta = _artifacts(ck, cfg, {}).meta()
            meta["families"] = {f: results[f]["family_meta"] for f in cfg.train.families}
            finish_fit_dir(out, meta, list(cfg.train.families))
            summary = _summary(results, cfg, ck, dev, time.time() - t0)
            wstats = next((r["expert_weights"] for r in results.values() if r.get("expert_weights")), None)
            if wstats is not None:
                summary["expert_weights"] = wstats
            kstats = next((r["keep"] for r in results.values() if r.get("keep")), None)
            if kstats is not None:
                summary["keep"] = kstats
            if peaks is not None:
                summary["distributed"] = {**dist.describe(), **peaks}
            atomic_write(out / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2) + "\n"))
            if not (out / "metrics.jsonl").exists():
                (out / "metrics.jsonl").touch()
            log.summary(summary)
            return summary
        summary = dist.on_rank0(finish)
        ok = True
    except Exception:  # an error: its own line stays the last one
        raise
    except BaseException:  # Ctrl-C, SIGTERM (KeyboardInterrupt, the CLI's Terminated): say what a rerun resumes
        stopped = True
        raise
    finally:
        log.close(ok)
        quiet_logger()
        if not ok and claimed and lead:
            if diverged:  # nothing of a diverged run can help a rerun (a lower lr is another fit)
                shutil.rmtree(out if not existed else out / STATE, ignore_errors=True)
                if existed:
                    (out / "metrics.jsonl").unlink(missing_ok=True)
            else:
                _unclaim(out, existed)
        if not ok and lead and stopped:
            _say_kept(out, cfg)
        dist.close(finished=ok)
    return summary


def _say_kept(out: Path, cfg: GlobeConfig) -> None:
    """Log what an interrupted fit left to resume from: finished families and each checkpoint's step."""
    kept = []
    for fam in cfg.train.families:
        if (out / STATE / f"{fam}.done.json").is_file():
            kept.append(f"{fam} finished")
        elif (out / STATE / f"{fam}.ckpt.pt").is_file():
            step = read_checkpoint(out / STATE / f"{fam}.ckpt.pt", mmap=True)["step"]
            kept.append(f"{fam} at step {step} of {cfg.train.steps}")
    if kept:
        plog("fit stopped: %s keeps %s; the same command resumes from there", out, ", ".join(kept))
    else:
        plog("fit stopped before its first checkpoint (train.checkpoint_every=%d): nothing kept; the same command "
             "starts again", cfg.train.checkpoint_every)


def _quiet_unless(lead: bool):
    """Silence the globe logger's INFO lines on ranks other than 0; returns the function that restores it."""
    from ..progress import get_logger
    lg = get_logger()
    level = lg.level
    if not lead:
        lg.setLevel(max(level, 30))
    return lambda: lg.setLevel(level)


def _rank_peaks(dist: Dist, dev: str) -> dict:
    """Peak resident memory (and peak CUDA allocation) of every rank, in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gpu = torch.cuda.max_memory_allocated() if dev == "cuda" else 0
    got = dist.gather_rows(torch.tensor([[rss, gpu]], dtype=torch.float64), [1] * dist.world)
    out = {"peak_rss_bytes_per_rank": [int(x) for x in got[:, 0].tolist()]}
    if dev == "cuda":
        out["peak_cuda_bytes_per_rank"] = [int(x) for x in got[:, 1].tolist()]
    return out


def _artifacts(ck: Checkpoint, cfg: GlobeConfig, families: dict) -> Artifacts:
    return Artifacts(families=families, model_type=ck.model_type, moe_layers=list(ck.moe_layers),
                     num_experts=ck.num_experts, hidden_size=ck.hidden_size, expert_intermediate_size=ck.p,
                     source=str(ck.dir), config=cfg.to_dict(),
                     source_digest={f: ck.expert_digest(f) for f in cfg.train.families})


def _svdvals(W: torch.Tensor, sc: torch.Tensor, chunk: int = 8, progress: bool | None = None,
             desc: str = "spectra", dist: Dist | None = None) -> torch.Tensor:
    """Singular values (N, min(p, d)) of the RMS-normalised experts (`init.spectra`, Gram eigenvectors);
    sharded: each rank decomposes its own experts, the spectra are gathered."""
    inv = inv_scales(sc, sc > 0)
    out = []
    lo, hi = dist.span if dist is not None and dist.on else (0, W.shape[0])
    with Progress(hi - lo, desc, "experts", bar=progress, quiet=quiet(W.numel())) as pg:
        for a in range(lo, hi, chunk):
            b = min(hi, a + chunk)
            out.append(spectra(W[a:b].float() * inv[a:b, None, None])[0])
            pg.update(out[-1].shape[0])
    return dist.gather_rows(torch.cat(out)) if dist is not None else torch.cat(out)


def _check_calib_memory(cfg: GlobeConfig, ck: Checkpoint, N: int) -> None:
    """Per-expert covariances are N x d x d (fp64 sums, fp32 factors): refuse before any work if too big."""
    if cfg.train.objective != "activation" or not cfg.train.calib_per_expert:
        return
    gb = N * ck.hidden_size ** 2 * 12 / 1e9
    if gb > cfg.train.max_memory_gb:
        raise GlobeError(f"train.calib_per_expert: per-expert covariances of {N} experts need {gb:.1f} GB "
                         f"(N x d x d, d = {ck.hidden_size}), above train.max_memory_gb={cfg.train.max_memory_gb}; "
                         "use the per-layer covariance (train.calib_per_expert=false)")


def _summary(results: dict, cfg: GlobeConfig, ck: Checkpoint, dev: str, secs: float) -> dict:
    fam_out, base_out = {}, {}
    for fam, res in results.items():
        mt = res["metrics"]
        fam_out[fam] = {k: mt[k] for k in ("rel_fro_error", "median_support", "stored_params", "original_params",
                                           "rel_fro_error_before_prune", "prune_error_cost", "p95_support",
                                           "init_rel_fro_error", "svd_floor_rank_r", "temperature", "gain", "m", "r",
                                           "best_step", "steps_run", "stopped_early", "fit_time_s")}
        fam_out[fam]["stored_fraction"] = mt["stored_params"] / mt["original_params"]
        for k in ("share", "banks", "m_total", "gains", "rank_source", "budget_asked", "budget_predicted"):
            if k in mt:
                fam_out[fam][k] = mt[k]
        fam_out[fam]["dead_experts"] = mt.get("dead_experts", 0)
        for k in ("kept_experts", "kept_energy_share", "rel_fro_error_fitted"):
            if k in mt:
                fam_out[fam][k] = mt[k]
        fam_out[fam]["baselines_time_s"] = sum(b.get("time_s", 0.0) for b in res["baselines"].values())
        for name, b in res["baselines"].items():
            base_out.setdefault(name, {})[fam] = b
            fam_out[fam][f"ratio_vs_{name}"] = mt["rel_fro_error"] / max(b["rel_fro_error"], 1e-30)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stored = sum(f["stored_params"] for f in fam_out.values())
    orig = sum(f["original_params"] for f in fam_out.values())
    asked = {f["budget_asked"] for f in fam_out.values() if f.get("budget_asked") is not None}
    return {"budget": {"asked": asked.pop() if len(asked) == 1 else (sorted(asked) or None),
                       "achieved": stored / max(orig, 1), "stored_params": stored, "original_params": orig,
                       "rank_source": sorted({f.get("rank_source", "r") for f in fam_out.values()})},
            "model": str(ck.dir), "model_type": ck.model_type, "num_experts_total": len(ck.moe_layers) * ck.num_experts,
            "families": fam_out, "baselines": base_out, "fit_time_s": secs, "peak_rss_bytes": peak, "device": dev,
            "objective": cfg.train.objective, "torch_threads": torch.get_num_threads()}
