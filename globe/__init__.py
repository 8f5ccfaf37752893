"""GloBE: Global-Basis Experts for Mixture-of-Experts compression.

Every routed expert's Up and Gate matrix becomes A_i @ phi(g * sum_j alpha_ij B_j): one global
basis bank per family shared by all MoE layers, sparse entmax codes alpha_i, a small adapter A_i.

Public API (lazy imports keep `import globe` light):
    GlobeConfig, GlobeError, Checkpoint, inspect
    compress(cfg)                  -> summary dict (fits the banks; writes artifacts to cfg.output_dir)
    patch_model(model, artifacts, cache=CacheCfg()) / unpatch_model(model)
    export(cfg) / load_model(path)
"""

from .config import GlobeConfig
from .errors import GlobeError

__version__ = "0.1.0"

_LAZY = {
    "Checkpoint": ("globe.io.checkpoint", "Checkpoint"),
    "inspect": ("globe.io.inspect", "inspect"),
    "Artifacts": ("globe.artifacts", "Artifacts"),
    "compress": ("globe.fit.run", "run_fit"),
    "patch_model": ("globe.runtime.patch", "patch_model"),
    "unpatch_model": ("globe.runtime.patch", "unpatch_model"),
    "export": ("globe.runtime.export", "export"),
    "load_model": ("globe.runtime.load", "load_model"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'globe' has no attribute {name!r}")


__all__ = ["GlobeConfig", "GlobeError", *_LAZY]
