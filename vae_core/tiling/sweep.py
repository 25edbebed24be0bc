"""Seam-free tiled encode/decode with bounded memory: tiled output equals untiled output, at about the untiled cost.

How it stays exact where other tilers drift:

* **Low resolution untiled.** The decoder's conv_in, mid block (global attention, query-chunked) and lowest level,
  and the encoder's lowest level and head, run on the whole tensor at latent resolution (1/64 of the pixels).
* **Exact halos, per segment.** The tiled stages are a list of segments (a family's:
  :mod:`vae_core.families.kl.segments`), each starting at a GroupNorm. Each tile's windows are derived backwards from its core through every segment, and each 3×3 conv
  is computed "valid" inside the image (zero-padded only at the image border), so a window shrinks by one pixel
  per conv and no pixel is computed that the core does not need.
* **Exact whole-image GroupNorm statistics** (``mode="exact"``). Output quality is very sensitive to these (on the
  trained fixture a 1 % error costs ~37 dB PSNR) and iterating with stale statistics diverges, so the tiles sweep
  the norms in order: in sweep *k* every tile runs up to norm *k* and the statistics of its core are pooled (Chan
  merge, float64); then norm *k* is frozen and the next sweep starts. Each tile keeps its state at the norm where
  it stopped (its *checkpoint*, :mod:`vae_core.tiling.cache`), so the next sweep resumes there instead of starting
  over: with enough cache every segment runs once per tile and the only overhead is the halo.
* **A planner** picks the schedule from the cache budget: *level-major* (each stage tiled on its own, its output
  assembled, so halos span one stage) when the budget holds a stage's checkpoints and outputs; else *tile-major*
  (halos span all stages, no assembled intermediates), keeping what checkpoints fit and recomputing the rest from
  the last kept one. ``cache_bytes=0`` recomputes everything from the stage input: exact, slowest, smallest.
* ``mode="fast"``: one sweep, with the statistics of a small downscaled *proxy* run (no cache needed; colours
  approximate, for previews).

Peak memory is one tile's working set plus the cache budget, the latent-resolution tensors and the output. Tensor
conventions follow the kl family's ``model.py``: images ``[B, 3, H, W]`` in [-1, 1], raw latents ``[B, C, H/8, W/8]``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..errors import Cancelled
from .cache import CheckpointStore, nbytes, resolve_budget
from .geometry import Rect, Rects, Stats, SweepSegment as Segment, hull, split
from .options import TileOptions, TileReport
from .stats import StatsAccumulator

__all__ = ["sweep_tiled", "proxy_shape", "full_speed_cache"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# plan: tiles, their windows per segment, and the grouping of stages
# ----------------------------------------------------------------------------------------------------------------

def _area(r: Rect) -> int:
    return (r[0][1] - r[0][0]) * (r[1][1] - r[1][0])


@dataclass
class Tile:
    """One tile of a group: ``rects[k]`` the rect of each register at segment k's input (``rects[-1]``: output),
    ``cores[k]`` its core there (for the statistics)."""

    rects: list[Rects]
    cores: list[Rect]


@dataclass
class Group:
    """Consecutive segments run tile by tile over one assembled input; ``sizes[k]`` the (H, W) at segment k's
    input, ``sizes[-1]`` at the output."""

    segs: list[Segment]
    sizes: list[tuple[int, int]]
    tiles: list[Tile] = field(default_factory=list)

    def state_bytes(self, tile: Tile, k: int, elem: int) -> int:
        seg = self.segs[k]
        return sum(seg.channels[r] * _area(rect) for r, rect in tile.rects[k].items()) * elem

    def checkpoint_bytes(self, elem: int, stream_only: bool = False) -> int:
        """Bytes to keep every tile's checkpoint at once (per tile the largest over the group's norms; with
        ``stream_only``, over the norms whose state is the stream ``x`` alone)."""
        norms = [k for k, s in enumerate(self.segs) if s.norm is not None and k > 0 and
                 (not stream_only or len(s.channels) == 1)]
        return sum(max((self.state_bytes(t, k, elem) for k in norms), default=0) for t in self.tiles)

    def sweep_bytes(self, k: int, elem: int) -> int:
        return sum(self.state_bytes(t, k, elem) for t in self.tiles)

    def out_bytes(self, elem: int) -> int:
        h, w = self.sizes[-1]
        return self.segs[-1].out_channels * h * w * elem


def _make_group(segs: list[Segment], size: tuple[int, int], factor: int, lat: tuple[int, int],
                cores: list[tuple[tuple[int, int], tuple[int, int]]]) -> tuple[Group, int]:
    """Sizes, factors and per-tile rects of ``segs`` read at ``size`` (latent factor ``factor``). Returns the group
    and the factor at its output."""
    sizes, factors = [size], [factor]
    for s in segs:
        h, w = sizes[-1]
        sizes.append((s.out_size(h), s.out_size(w)))
        factors.append(factors[-1] * 2 if s.scale == 2 else factors[-1] // 2 if s.scale == -2 else factors[-1])
    group = Group(segs, sizes)

    def core(r: tuple[int, int], k: int, axis: int) -> tuple[int, int]:
        f, n = factors[k], sizes[k][axis]
        return r[0] * f, n if r[1] == lat[axis] else min(n, r[1] * f)

    for ry, rx in cores:
        m = len(segs)
        cs = [(core(ry, k, 0), core(rx, k, 1)) for k in range(m + 1)]
        rects: list[Rects] = [dict() for _ in range(m + 1)]
        rects[m] = {"x": cs[m]}
        for k in reversed(range(m)):
            need = segs[k].needs(rects[k + 1], sizes[k])
            if segs[k].norm is not None:
                r = segs[k].norm_reg
                need[r] = (hull(need[r][0], cs[k][0]), hull(need[r][1], cs[k][1]))
            rects[k] = need
        group.tiles.append(Tile(rects, cs))
    return group, factors[-1]


def _plan(stages: list[list[Segment]], size: tuple[int, int], factor: int, lat: tuple[int, int], core: int,
          elem: int, budget: int, exact: bool, device_budget: Optional[int] = None) -> tuple[list[Group], str]:
    """Level-major (a group per stage) if the budget holds the largest stage's stream checkpoints and its assembled
    input and output (those on the device: ``device_budget``, default ``budget``); else tile-major (one group)."""
    cores = [(ry, rx) for ry in split(lat[0], core) for rx in split(lat[1], core)]
    if exact and len(stages) > 1 and budget > 0:
        groups = _level_major(stages, size, factor, lat, cores)
        assembled = max((g.out_bytes(elem) + (groups[i - 1].out_bytes(elem) if i else 0)
                         for i, g in enumerate(groups[:-1])), default=0)
        if (_level_major_need(groups, elem, stream_only=True) <= budget
                and assembled <= (budget if device_budget is None else device_budget)):
            return groups, "level-major"
    g, _ = _make_group([s for segs in stages for s in segs], size, factor, lat, cores)
    return [g], "tile-major"


def _level_major(stages: list[list[Segment]], size: tuple[int, int], factor: int, lat: tuple[int, int],
                 cores: list) -> list[Group]:
    groups, f, s = [], factor, size
    for segs in stages:
        g, f = _make_group(segs, s, f, lat, cores)
        groups.append(g)
        s = g.sizes[-1]
    return groups


def _level_major_need(groups: list[Group], elem: int, stream_only: bool = False) -> int:
    """Cache bytes for the level-major schedule: per stage, its assembled input and output plus every tile's
    checkpoint (all of them: full speed; ``stream_only``: the stream checkpoints, which costs one conv per resnet
    block in recomputation)."""
    need = 0
    for i, g in enumerate(groups):
        assembled = (groups[i - 1].out_bytes(elem) if i else 0) + (g.out_bytes(elem) if i < len(groups) - 1 else 0)
        need = max(need, assembled + g.checkpoint_bytes(elem, stream_only))
    return need


def full_speed_cache(stages: list[list[Segment]], size: tuple[int, int], factor: int, lat: tuple[int, int],
                     core: int, elem: int) -> int:
    """Cache bytes with which the level-major schedule runs every segment once per tile; 0 when one tile covers
    ``lat``. ``size``: (H, W) at the first stage's input, ``factor``: its pixels per latent pixel, ``core``: tile
    core in latent pixels, ``elem``: bytes per element."""
    if core >= lat[0] and core >= lat[1]:
        return 0
    cores = [(ry, rx) for ry in split(lat[0], core) for rx in split(lat[1], core)]
    return _level_major_need(_level_major(stages, size, factor, lat, cores), elem)


# ----------------------------------------------------------------------------------------------------------------
# execution
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class _Run:
    opts: TileOptions
    report: TileReport
    total: int
    done: int = 0

    def tick(self) -> None:
        self.done += 1
        if self.opts.progress is not None:
            self.opts.progress(self.done, self.total)

    def check_cancel(self) -> None:
        if self.opts.cancel is not None and self.opts.cancel():
            raise Cancelled("tiled VAE call cancelled between tiles")


def _sweeps(group: Group, stats: Stats) -> list[int]:
    """Segments whose GroupNorm statistics are still unknown, in call order (one sweep each, plus the last)."""
    return [k for k, s in enumerate(group.segs) if s.norm is not None and s.norm not in stats]


def _run_group(group: Group, src: torch.Tensor, dst: torch.Tensor, stats: Stats, store: CheckpointStore,
               run: _Run) -> None:
    """Run every tile of ``group`` from ``src`` (the whole input, ``[1, C, H, W]``) and write the tiles' cores into
    ``dst``, sweeping the GroupNorms whose statistics ``stats`` lacks (and adding them to it)."""
    segs, rep = group.segs, run.report
    ran = [0] * len(group.tiles)  # segments each tile has run at least once
    end = len(segs)
    for target in _sweeps(group, stats) + [end]:
        acc = StatsAccumulator()
        # keep this sweep's states if every tile's fits; otherwise only stream-only states, as many as fit
        keep = target != end and (group.sweep_bytes(target, src.element_size()) <= store.free()
                                  or len(segs[target].channels) == 1)
        for i, tile in enumerate(group.tiles):
            run.check_cancel()
            hit = store.get(i)
            k, state = hit if hit is not None else (0, {"x": src[..., slice(*tile.rects[0]["x"][0]),
                                                                   slice(*tile.rects[0]["x"][1])]})
            del hit  # the state alone holds the checkpoint's tensors, so replacing it frees them
            for j in range(k, target):
                state = segs[j].run(state, tile.rects[j], tile.rects[j + 1], group.sizes[j], stats)
                flops = segs[j].flops(tile.rects[j + 1])
                rep.segment_runs += 1
                if j < ran[i]:
                    rep.recomputed_runs += 1
                    rep.flops_recompute += flops
                else:
                    rep.flops_halo += flops
            ran[i] = max(ran[i], target)
            if target == end:
                (oy, ox) = tile.rects[end]["x"]
                dst[..., oy[0]:oy[1], ox[0]:ox[1]] = state["x"]
                store.drop(i)
            else:
                (ry, rx), (cy, cx) = tile.rects[target][segs[target].norm_reg], tile.cores[target]
                t = state[segs[target].norm_reg]
                acc.add(t[..., cy[0] - ry[0]:cy[1] - ry[0], cx[0] - rx[0]:cx[1] - rx[0]], segs[target].norm.num_groups)
                if target > k and keep:
                    store.put(i, target, state)
            del state
            run.tick()
        if target != end:
            stats[segs[target].norm] = acc.result()
    # the halo share is what first runs computed beyond the untiled work of these segments
    useful = sum(s.flops({r: ((0, group.sizes[k + 1][0]), (0, group.sizes[k + 1][1])) for r in s.outputs()})
                 for k, s in enumerate(segs))
    rep.flops_useful += useful
    rep.flops_halo -= useful


def _run_plan(groups: list[Group], src: torch.Tensor, dst: torch.Tensor, stats: Stats, store: CheckpointStore,
              run: _Run) -> None:
    """Run the groups in order; intermediate outputs are assembled whole, on the device (their bytes are taken from
    the device tier of ``store``)."""
    held = 0
    for i, g in enumerate(groups):
        if i == len(groups) - 1:
            out, took = dst, 0
        else:
            h, w = g.sizes[-1]
            out = torch.empty((1, g.segs[-1].out_channels, h, w), device=src.device, dtype=src.dtype)
            took = nbytes({"o": out}) if store.reserve(nbytes({"o": out})) else 0
        _run_group(g, src, out, stats, store, run)
        store.release(held)
        src, held = out, took


def _proxy_stats(stages: list[list[Segment]], proxy_src: torch.Tensor, factor: int) -> Stats:
    """Exact statistics of every norm on a small whole-image proxy (one tile covering it)."""
    h, w = proxy_src.shape[-2:]
    lat = (h // factor, w // factor) if factor > 1 else (h, w)
    lat = (max(1, lat[0]), max(1, lat[1]))
    groups, _ = _plan(stages, (h, w), factor, lat, max(lat), proxy_src.element_size(), 0, exact=False)
    g = groups[0]
    dst = torch.empty((1, g.segs[-1].out_channels, *g.sizes[-1]), device=proxy_src.device, dtype=proxy_src.dtype)
    stats: Stats = {}
    store = CheckpointStore(proxy_src.device, 2**62)
    _run_group(g, proxy_src, dst, stats, store, _Run(TileOptions(), TileReport(), 0))
    return stats


def proxy_shape(h: int, w: int, scale_px: int, budget: int) -> tuple[int, int]:
    f = min(1.0, math.sqrt(budget / max(1, h * w * scale_px * scale_px)))
    return max(1, round(h * f)), max(1, round(w * f))


def sweep_tiled(stages: list[list[Segment]], items: list[Callable[[], torch.Tensor]], size: tuple[int, int],
           factor: int, lat: tuple[int, int], tile_lat: int, out: torch.Tensor,
           proxies: Optional[list[Callable[[], torch.Tensor]]], opts: TileOptions) -> None:
    """Shared driver: ``items[i]()`` gives batch item i's input to the tiled stages, written into ``out[i]``."""
    device, elem = out.device, out.element_size()
    dev_budget, host_budget = resolve_budget(opts.cache_bytes, device) if opts.mode == "exact" else (0, 0)
    store = CheckpointStore(device, dev_budget, host_budget)
    groups, schedule = _plan(stages, size, factor, lat, tile_lat, elem, store.total_budget, opts.mode == "exact",
                             store.budget["device"])
    rep = opts.report if opts.report is not None else TileReport()
    rep.schedule, rep.tiles, rep.cache_budget = schedule, len(groups[0].tiles), store.total_budget
    per_item = sum(len(g.tiles) * (len(_sweeps(g, {})) * (opts.mode == "exact") + 1) for g in groups)
    run = _Run(opts, rep, per_item * len(items))
    log.debug("tiled: %s, %d tiles, %d groups, cache budget %d bytes", schedule, rep.tiles, len(groups),
              store.total_budget)
    try:
        for i, item in enumerate(items):
            stats = _proxy_stats(stages, proxies[i](), factor) if proxies is not None else {}
            rep.sweeps += sum(len(_sweeps(g, stats)) + 1 for g in groups)
            _run_plan(groups, item(), out[i:i + 1], stats, store, run)
            store.clear()
    finally:
        store.close()  # failed or cancelled calls too: no pinned block outlives the call
        rep.cache_peak = max(rep.cache_peak, store.peak)
        rep.pinned_peak = max(rep.pinned_peak, store.pinned_peak)


