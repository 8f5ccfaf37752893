"""Optional Weights & Biases logging of `globe fit` (cfg.wandb), imported lazily only when enabled.

Why a separate module: wandb is an optional dependency; nothing here imports it unless
`wandb.enabled=true` and `wandb.mode != disabled`. Offline mode (the default) writes the run under
`$WANDB_DIR` or `output_dir/.globe_fit/wandb/offline-run-*` (push later with `wandb sync DIR`), never
asks for a login and turns off wandb's own telemetry so nothing leaves the machine. Online mode needs
configured credentials (WANDB_API_KEY, `wandb login`); it never prompts.

`FitLog` writes metrics.jsonl (one JSON line per log step) and forwards each record to the wandb run.

Logged: the run config (cfg.to_dict()); per log step the numeric fields of each metrics.jsonl record as
`<family>/<key>` against the x-axis `<family>/step`; at evaluations histograms of the per-expert
support size (codes (N, m) > 0 summed over atoms) and of atom popularity (experts using each atom,
one bin per atom); at the end of a family the same for the final pruned codes under `<family>/final/`
plus its scalar metrics in the run summary; the scalars of summary.json under `summary/`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..artifacts import atomic_write
from ..config import GlobeConfig
from ..errors import GlobeError
from ..maps import code_stats

MAX_BINS = 512  # wandb.Histogram limit


def wandb_on(cfg: GlobeConfig) -> bool:
    """True when the config asks for a wandb run (enabled and mode online/offline)."""
    return bool(cfg.wandb.enabled) and cfg.wandb.mode != "disabled"


def require_wandb(cfg: GlobeConfig):
    """The wandb module, ready for cfg.wandb.mode; a one-line GlobeError when it is not installed or an
    online run has no credentials (checked without prompting and without network)."""
    if cfg.wandb.mode == "offline":  # wandb-core's telemetry/error reports would go to the network
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    try:
        import wandb
    except ImportError:
        raise GlobeError("wandb.enabled=true but the wandb package is not installed "
                         "(pip install wandb, or set wandb.enabled=false)") from None
    if os.environ.get("WANDB_DIR"):  # a file in the way, read-only: before the fit claims its output_dir
        from ..io.outputs import check_writable

        check_writable(os.environ["WANDB_DIR"], what="WANDB_DIR")
    if cfg.wandb.mode == "online" and not wandb.login(prompt=False, verify=False):
        raise GlobeError("wandb.mode=online but no W&B credentials are configured "
                         "(set WANDB_API_KEY or run `wandb login`), or use wandb.mode=offline")
    return wandb


def _bars(counts: list[int]) -> tuple[list[int], list[int]]:
    """(counts, edges) for wandb.Histogram: bin i covers [i, i+1), merged to at most MAX_BINS bins."""
    n = max(1, len(counts))
    k = -(-n // MAX_BINS)
    c = [int(sum(counts[i:i + k])) for i in range(0, n, k)] if counts else [0]
    return c, [i * k for i in range(len(c))] + [n]


class WandbRun:
    """One wandb run for one `run_fit` call; `close(ok)` finishes it (exit code 0 or 1)."""

    def __init__(self, cfg: GlobeConfig, out: Path):
        self.wandb = wandb = require_wandb(cfg)
        w = cfg.wandb
        # read here, not left to wandb: its settings snapshot the environment once per process
        root = Path(os.environ.get("WANDB_DIR") or out / ".globe_fit")
        root.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=w.project, entity=w.entity, name=w.run_name, tags=list(w.tags) or None,
                                  mode=w.mode, dir=str(root), config=cfg.to_dict(),
                                  reinit="create_new", settings=wandb.Settings(console="off"))
        except Exception as e:  # noqa: BLE001 - wandb raises many kinds; the user gets one line
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GlobeError(f"wandb.init failed: {msg}") from None
        self.fams: set[str] = set()

    def _axis(self, fam: str) -> None:
        if fam not in self.fams:
            self.run.define_metric(f"{fam}/step")
            self.run.define_metric(f"{fam}/*", step_metric=f"{fam}/step")
            self.fams.add(fam)

    def _hists(self, codes: torch.Tensor, prefix: str) -> dict[str, Any]:
        st = code_stats(codes)
        sup, pop = st["support_counts"], st["atom_popularity"]
        H = self.wandb.Histogram
        return {f"{prefix}support_size": H(np_histogram=_bars(sup)),
                f"{prefix}atom_popularity": H(np_histogram=_bars(pop))}

    def log(self, rec: dict) -> None:
        """A metrics.jsonl record -> `<family>/<key>` for its numeric fields."""
        fam = rec["family"]
        self._axis(fam)
        self.run.log({f"{fam}/{k}": v for k, v in rec.items() if isinstance(v, (int, float))})

    def codes(self, fam: str, step: int, codes: torch.Tensor) -> None:
        """Histograms of support size and atom popularity of codes (N, m) at an evaluation."""
        self._axis(fam)
        self.run.log({f"{fam}/step": step, **self._hists(codes, f"{fam}/")})

    def family_done(self, fam: str, codes: torch.Tensor, metrics: dict, step: int) -> None:
        """Final (pruned) code histograms and the family's scalar metrics (also into the run summary)."""
        self._axis(fam)
        scal = {f"{fam}/final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.run.log({f"{fam}/step": step, **self._hists(codes, f"{fam}/final/"), **scal})
        self.run.summary.update(scal)

    def summary(self, summ: dict) -> None:
        """Numeric leaves of summary.json as `summary/a/b/c` in the run summary."""
        flat: dict[str, Any] = {}

        def walk(d: dict, pre: str) -> None:
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(v, f"{pre}{k}/")
                elif isinstance(v, (int, float)):
                    flat[f"{pre}{k}"] = v
        walk(summ, "summary/")
        self.run.summary.update(flat)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class FitLog:
    """`globe fit`'s metrics.jsonl (+ optional wandb run): on resume, lines of a family past its checkpoint
    step are dropped."""

    def __init__(self, out: Path, cfg: GlobeConfig, on: bool = True):
        self.path, self.on = out / "metrics.jsonl", on  # on=False: a rank other than 0 of a sharded fit
        self.wb = WandbRun(cfg, out) if wandb_on(cfg) and on else None

    def rewind(self, fam: str, step: int) -> None:
        if not self.on or not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines()
                if ln.strip() and not (json.loads(ln).get("family") == fam and json.loads(ln).get("step", 0) > step)]
        atomic_write(self.path, lambda p: Path(p).write_text("".join(k + "\n" for k in keep)))

    def __call__(self, rec: dict) -> None:
        if not self.on:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.wb is not None:
            self.wb.log(rec)

    def codes_hook(self, fam: str):
        """Per-evaluation code histograms for wandb, or None when wandb is off."""
        return None if self.wb is None else (lambda step, codes: self.wb.codes(fam, step, codes))

    def family_done(self, fam: str, fit) -> None:  # a loop.FamilyFit
        if self.wb is not None:
            self.wb.family_done(fam, fit.artifact.codes, fit.metrics, fit.metrics["steps_run"])

    def summary(self, summ: dict) -> None:
        if self.wb is not None:
            self.wb.summary(summ)

    def close(self, ok: bool) -> None:
        if self.wb is not None:
            self.wb.close(ok)
