"""Exact tiled encode/decode with bounded memory, for any family: the sweep engine for GroupNorm networks
(:mod:`.sweep`, with whole-image statistics from :mod:`.stats` and checkpoints in :mod:`.cache`), the halo engine for
local networks (:mod:`.halo`), shared geometry (:mod:`.geometry`), memory estimates and limits (:mod:`.memory`), and
one call with its tile choice and out-of-memory fallback (:mod:`.run`). A family's ``family.py`` says which engine
runs it; :mod:`vae_core.engine` runs a network with its family's plan."""
from ..errors import Cancelled
from .cache import CacheArg
from .memory import MIN_TILE, auto_tile, estimate_bytes, free_memory, is_oom
from .options import Progress, TileArg, TileOptions, TileReport

__all__ = ["TileOptions", "TileReport", "TileArg", "Progress", "CacheArg", "Cancelled", "MIN_TILE", "auto_tile",
           "estimate_bytes", "free_memory", "is_oom"]
