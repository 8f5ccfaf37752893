"""The public verbs, one narrow typed config per stage (the shape of torchao's `quantize_(model, cfg)` and
peft's `get_peft_model(model, cfg)`):

    compress(model, output_dir, FitCfg(...))                 -> summary dict   (`globe fit`)
    export(model, artifacts, output_dir, ExportCfg(...))     -> Path           (`globe export`)
    load_model(path, cache=CacheCfg(...))                    -> nn.Module      (`globe eval/generate` load it)
    patch_model(model, artifacts, cache=CacheCfg(...)) / unpatch_model(model)
    evaluate(model, EvalCfg(...), artifacts=None, cache=None) -> dict          (`globe eval`)
    generate(model, GenerateCfg(prompt=...), artifacts=None, cache=None) -> str (`globe generate`)

Why: a verb that takes the whole combined config makes one field mean different things per verb
(`output_dir` is the fit directory for one and the export directory for another) and lets settings a
verb never reads silently override saved ones. Only the CLI holds the combined `GlobeConfig` (built by
Hydra) and unpacks it; `run_fit`/`run_export`/`run_eval` are those unpacking entry points.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .common import check_type
from .config import BankCfg, CacheCfg, EvalCfg, GenerateCfg, GlobeConfig, ModelCfg, SparsityCfg, TrainCfg, WandbCfg


@dataclass
class FitCfg:
    """What `compress` fits: the bank (atoms m, rank r or budget, sharing scope), the sparse codes, the
    optimisation, and optional wandb logging. Each part validates itself (ValueError naming the key)."""

    bank: BankCfg = field(default_factory=BankCfg)
    sparsity: SparsityCfg = field(default_factory=SparsityCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    wandb: WandbCfg = field(default_factory=WandbCfg)

    def __post_init__(self) -> None:
        for name, cls in (("bank", BankCfg), ("sparsity", SparsityCfg), ("train", TrainCfg), ("wandb", WandbCfg)):
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"{name}: expected a {cls.__name__}, got {type(getattr(self, name)).__name__}")


def _path(x: str | os.PathLike, what: str) -> str:
    if not isinstance(x, (str, os.PathLike)):  # e.g. a loaded model: name its type, not its whole repr
        raise ValueError(f"{what}: expected a path or hub id (a checkpoint or export directory), "
                         f"got a {type(x).__name__}")
    if not str(x):
        raise ValueError(f"{what}: expected a path or hub id, got an empty string")
    return str(x)


def _arts(a: str | os.PathLike | list[str] | None) -> str | list[str] | None:
    return a if a is None or isinstance(a, list) else str(a)


def compress(model: str | os.PathLike, output_dir: str | os.PathLike, config: FitCfg | None = None, *,
             revision: str | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Fit one global basis bank per family (up, gate) for the routed experts of `model` (a checkpoint
    directory or hub id; read shard by shard, never instantiated) and write the fit directory
    `output_dir` (globe-{family}.safetensors, globe_config.json, summary.json, metrics.jsonl). Resumes
    from `output_dir` when a previous run with the same settings was interrupted.

    progress: tqdm bars (True), periodic log lines (False), or by whether stderr is a terminal (None).
    Returns the summary (summary.json): per family the relative Frobenius error, support, stored and
    original parameter counts, baselines. Raises GlobeError on bad input (one line, nothing written)."""
    from .fit.run import run_fit

    c = config or FitCfg()
    if not isinstance(c, FitCfg):
        raise ValueError(f"config: expected a FitCfg, got {type(c).__name__}")
    cfg = GlobeConfig(model=ModelCfg(path=_path(model, "model"), revision=revision), bank=c.bank,
                      sparsity=c.sparsity, train=c.train, wandb=c.wandb,
                      output_dir=_path(output_dir, "output_dir"))
    return run_fit(cfg, progress=progress)


def evaluate(model: str | os.PathLike, config: EvalCfg | None = None, *,
             artifacts: str | os.PathLike | list[str] | None = None, cache: CacheCfg | None = None,
             revision: str | None = None, output: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate `model` (an original checkpoint, a dense export or a globe export) as `config` asks:
    perplexity on config.text/dataset, speed and memory, cache hit rates, lm-eval tasks. `artifacts`
    (a fit directory) patches an original checkpoint on the fly; `cache` overrides the cache settings a
    globe export saved (None keeps them). Returns one dict (globe.eval.run.KEYS); written atomically to
    `output` when given. Raises GlobeError on bad input before the model loads."""
    from .eval.run import run_eval

    cfg = GlobeConfig(model=ModelCfg(path=_path(model, "model"), revision=revision),
                      eval=check_type(config, EvalCfg, "config") or EvalCfg(),
                      cache=check_type(cache, CacheCfg, "cache"), artifacts=_arts(artifacts),
                      output=None if output is None else str(output))
    return run_eval(cfg)


def generate(model: str | os.PathLike, config: GenerateCfg, *, artifacts: str | os.PathLike | list[str] | None = None,
             cache: CacheCfg | None = None, revision: str | None = None) -> str:
    """Greedy-decode config.max_new_tokens tokens after config.prompt with `model` (an original checkpoint,
    a dense export or a globe export; `artifacts` patches an original checkpoint with a fit directory) on
    config.device / config.dtype. Returns prompt + continuation as text. Raises GlobeError on bad input."""
    from .runtime.generate import generate as run_generate

    c = check_type(config, GenerateCfg, "config")
    if c is None:
        raise ValueError("config: expected a GenerateCfg with a prompt")
    return run_generate(GlobeConfig(model=ModelCfg(path=_path(model, "model"), revision=revision), generate=c,
                                    cache=check_type(cache, CacheCfg, "cache"), artifacts=_arts(artifacts)))
