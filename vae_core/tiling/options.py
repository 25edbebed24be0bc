"""What a caller asks of a tiled call (:class:`TileOptions`) and what it did (:class:`TileReport`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

from ..errors import Cancelled, VaeInputError
from .cache import CacheArg

__all__ = ["TileOptions", "TileReport", "TileArg", "Progress", "CacheArg", "check_mode", "stepper"]

Progress = Callable[[int, int], None]
TileArg = Union[None, int, str]


@dataclass
class TileReport:
    """What a tiled call did (filled in when passed as ``TileOptions.report``).

    ``flops_*`` count the convs of the tiled stages (2 per multiply-add): ``flops_useful`` is what an untiled run of
    those stages computes, ``flops_halo`` the extra of first runs over halos, ``flops_recompute`` repeated runs
    from an older checkpoint. ``cache_peak`` is the most checkpoint bytes held at once, ``pinned_peak`` the part of
    it in pinned host memory (CUDA), handed back to the system when the call ends.
    """

    schedule: str = ""
    tiles: int = 0
    sweeps: int = 0
    segment_runs: int = 0
    recomputed_runs: int = 0
    flops_useful: int = 0
    flops_halo: int = 0
    flops_recompute: int = 0
    cache_budget: int = 0
    cache_peak: int = 0
    pinned_peak: int = 0

    @property
    def flops_total(self) -> int:
        return self.flops_useful + self.flops_halo + self.flops_recompute


@dataclass
class TileOptions:
    """How to run a tiled call.

    Attributes:
        tile: tile edge in image pixels; ``None`` untiled; ``"auto"`` chosen from free memory (untiled if it fits).
        mode: ``"exact"`` (exact whole-image GroupNorm statistics) or ``"fast"`` (one sweep, proxy statistics).
        progress: ``progress(done, total)`` after every tile of every sweep.
        cancel: called between tiles; a host raises its own interrupt there, or returns True to raise Cancelled.
        cache_bytes: budget for checkpoints and assembled stage outputs (``exact``): an int in bytes, or
            ``"auto"``/None (a share of free memory, see :mod:`vae_core.tiling.cache`). 0 recomputes instead.
        proxy_pixels: image pixels of the ``fast`` proxy run; default max(256², tile²), about one tile.
        report: a :class:`TileReport` to fill in.
        moments: encode only: return the posterior's mean and log-variance stacked on channels (``2C``) instead
            of the mean (for sampling; a deterministic autoencoder refuses).
        schedule: videos only: ``"auto"`` (level-major where the cache budget holds it, else tile-major),
            ``"level"`` or ``"tile"`` (see :mod:`vae_core.tiling.stream`).
        channels_last: run on channels-last activations (measured 0.5-0.85x the time on CPU, but CPU GroupNorm is
            then ~200x further from a float64 run: ~91 dB instead of ~138 dB; off by default, for measuring with
            ``bench --channels-last``, e.g. on CUDA). The returned tensor is contiguous either way.
    """

    tile: TileArg = None
    mode: str = "exact"
    progress: Optional[Progress] = None
    cancel: Optional[Callable[[], object]] = None
    cache_bytes: CacheArg = "auto"
    proxy_pixels: Optional[int] = None
    report: Optional[TileReport] = None
    channels_last: bool = False
    schedule: str = "auto"
    moments: bool = False


def stepper(opts: TileOptions, total: int, between: str) -> Callable[[], None]:
    """``step()`` after each of ``total`` units of a tiled call: ``opts.progress(done, total)``, and ``opts.cancel``
    checked before the next unit (Cancelled, "... cancelled between ``between``")."""
    done = [0]

    def step() -> None:
        done[0] += 1
        if opts.progress is not None:
            opts.progress(done[0], total)
        if opts.cancel is not None and done[0] < total and opts.cancel():
            raise Cancelled(f"tiled VAE call cancelled between {between}")
    return step


def check_mode(opts: TileOptions) -> None:
    if opts.mode not in ("exact", "fast"):
        raise VaeInputError(f"mode={opts.mode!r}: expected 'exact' or 'fast'")
    if opts.schedule not in ("auto", "tile", "level"):
        raise VaeInputError(f"schedule={opts.schedule!r}: expected 'auto', 'tile' or 'level'")

