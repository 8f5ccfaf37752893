"""GloBE: Global-Basis Experts for Mixture-of-Experts compression.

Every routed expert's Up and Gate matrix becomes A_i @ phi(g * sum_j alpha_ij B_j): one global
basis bank per family shared by all MoE layers, sparse entmax codes alpha_i, a small adapter A_i.

Public API (lazy imports keep `import globe` light; one narrow typed config per verb, see globe/api.py):
    compress(model, output_dir, FitCfg(...))               -> summary dict (writes the fit directory)
    export(model, artifacts, output_dir, ExportCfg(...))   -> Path of the export (globe or dense format)
    load_model(path, cache=CacheCfg(...))                  -> model (a globe export rebuilt patched)
    load_tokenizer(path)                                   -> the tokenizer saved with a model or export
    patch_model(model, artifacts, cache=CacheCfg(...)) / unpatch_model(model)
    evaluate(model, EvalCfg(...), artifacts=None, cache=None) -> dict
    generate(model, GenerateCfg(prompt=...), artifacts=None, cache=None) -> str
    inspect(path), Checkpoint, Artifacts, GlobeError; configs: FitCfg, BankCfg, SparsityCfg, TrainCfg,
    WandbCfg, ExportCfg, CacheCfg, EvalCfg, GenerateCfg. GlobeConfig is the CLI's combined config.
"""

from .config import BankCfg, CacheCfg, EvalCfg, ExportCfg, GenerateCfg, GlobeConfig, SparsityCfg, TrainCfg, WandbCfg
from .errors import GlobeError

__version__ = "0.1.0"

_LAZY = {
    "Checkpoint": ("globe.io.checkpoint", "Checkpoint"),
    "inspect": ("globe.io.inspect", "inspect"),
    "Artifacts": ("globe.artifacts", "Artifacts"),
    "compress": ("globe.api", "compress"),
    "evaluate": ("globe.api", "evaluate"),
    "generate": ("globe.api", "generate"),
    "FitCfg": ("globe.api", "FitCfg"),
    "patch_model": ("globe.runtime.patch", "patch_model"),
    "unpatch_model": ("globe.runtime.patch", "unpatch_model"),
    "export": ("globe.runtime.export", "export"),
    "load_model": ("globe.runtime.load", "load_model"),
    "load_tokenizer": ("globe.compat", "load_tokenizer"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'globe' has no attribute {name!r}")


__all__ = ["BankCfg", "CacheCfg", "EvalCfg", "ExportCfg", "GenerateCfg", "GlobeConfig", "GlobeError", "SparsityCfg",
           "TrainCfg", "WandbCfg", *_LAZY]
