"""GloBE runtime: GloBEExperts, tilde_B precompose + cache, model patching, export and reload, generation.

    patch_model(model, artifacts, cache=CacheCfg(), collect_stats=False) / unpatch_model(model)
    globe.runtime.export.export(cfg) -> Path (streaming, model-free)
    globe.runtime.load.load_model(path, device=None, dtype=None, cache=None)   (memory-bounded)
    globe.runtime.generate.generate(cfg) -> str
"""

from .cache import SlabCache, simulate_lru
from .experts import GloBEExperts, GlobeStore
from .patch import cache_stats, patch_model, reset_cache_stats, to_dense_model, unpatch_model
from .store import FamilyStore

__all__ = ["FamilyStore", "GloBEExperts", "GlobeStore", "SlabCache", "cache_stats", "patch_model",
           "reset_cache_stats", "simulate_lru", "to_dense_model", "unpatch_model"]
