"""Seam-free tiled encode/decode with bounded memory: tiled output equals untiled output, at about the untiled cost.

How it stays exact where other tilers drift:

* **Low resolution untiled.** The decoder's conv_in, mid block (global attention, query-chunked) and lowest level,
  and the encoder's lowest level and head, run on the whole tensor at latent resolution (1/64 of the pixels).
* **Exact halos, per segment.** The tiled stages are a list of segments (:mod:`vae_core.tile_ops`), each starting
  at a GroupNorm. Each tile's windows are derived backwards from its core through every segment, and each 3×3 conv
  is computed "valid" inside the image (zero-padded only at the image border), so a window shrinks by one pixel
  per conv and no pixel is computed that the core does not need.
* **Exact whole-image GroupNorm statistics** (``mode="exact"``). Output quality is very sensitive to these (on the
  trained fixture a 1 % error costs ~37 dB PSNR) and iterating with stale statistics diverges, so the tiles sweep
  the norms in order: in sweep *k* every tile runs up to norm *k* and the statistics of its core are pooled (Chan
  merge, float64); then norm *k* is frozen and the next sweep starts. Each tile keeps its state at the norm where
  it stopped (its *checkpoint*, :mod:`vae_core.tile_cache`), so the next sweep resumes there instead of starting
  over: with enough cache every segment runs once per tile and the only overhead is the halo.
* **A planner** picks the schedule from the cache budget: *level-major* (each stage tiled on its own, its output
  assembled, so halos span one stage) when the budget holds a stage's checkpoints and outputs; else *tile-major*
  (halos span all stages, no assembled intermediates), keeping what checkpoints fit and recomputing the rest from
  the last kept one. ``cache_bytes=0`` recomputes everything from the stage input: exact, slowest, smallest.
* ``mode="fast"``: one sweep, with the statistics of a small downscaled *proxy* run (no cache needed; colours
  approximate, for previews).

Peak memory is one tile's working set plus the cache budget, the latent-resolution tensors and the output. Tensor
conventions follow ``model.py``: images ``[B, 3, H, W]`` in [-1, 1], raw latents ``[B, C, H/8, W/8]``.
"""
from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F

from .errors import VaeError, VaeInputError
from .groupnorm_stats import StatsAccumulator
from .memory import MIN_TILE, auto_tile, estimate_bytes, free_memory, is_oom
from .tile_local import run_stages
from .model import ATTENTION_HOOK, AutoencoderKL
from .tile_cache import CacheArg, CheckpointStore, nbytes, resolve_budget
from .tile_ops import Rect, Rects, Segment, Stats, decoder_segments, encoder_segments, hull

__all__ = ["TileOptions", "TileReport", "CacheArg", "cache_needed", "decode", "encode", "decoder_forward", "encoder_forward", "Cancelled",
           "MIN_TILE", "auto_tile", "estimate_bytes", "free_memory", "is_oom"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
TileArg = Union[None, int, str]


class Cancelled(VaeError):
    """Raised between tiles when the cancel hook returns True."""


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
            ``"auto"``/None (a share of free memory, see :mod:`vae_core.tile_cache`). 0 recomputes instead.
        proxy_pixels: image pixels of the ``fast`` proxy run; default max(256², tile²), about one tile.
        report: a :class:`TileReport` to fill in.
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


# ----------------------------------------------------------------------------------------------------------------
# plan: tiles, their windows per segment, and the grouping of stages
# ----------------------------------------------------------------------------------------------------------------

def _split(size: int, core: int) -> list[tuple[int, int]]:
    n = max(1, math.ceil(size / core))
    cuts = [round(i * size / n) for i in range(n + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(n)]


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
    cores = [(ry, rx) for ry in _split(lat[0], core) for rx in _split(lat[1], core)]
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


def cache_needed(model: AutoencoderKL, op: str, height: int, width: int, tile: int,
                 dtype: torch.dtype = torch.float32) -> int:
    """Bytes of ``cache_bytes`` with which exact tiling of one ``height``×``width`` image (image pixels) runs every
    segment once per tile (the level-major schedule); 0 when one tile covers the image. Less still gives the
    exact result, with recomputation."""
    down, elem = model.config.downscale, torch.finfo(dtype).bits // 8
    if op == "decode":
        stages, size, factor = decoder_segments(model), (height // down, width // down), 1
        lat = size
    elif op == "encode":
        stages, size = encoder_segments(model), (height, width)
        factor, lat = 2 ** len(stages), (height // 2 ** len(stages), width // 2 ** len(stages))
    else:
        raise VaeInputError(f"op={op!r}: expected 'decode' or 'encode'")
    core = max(1, tile // down)
    if core >= lat[0] and core >= lat[1]:
        return 0
    cores = [(ry, rx) for ry in _split(lat[0], core) for rx in _split(lat[1], core)]
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


def _proxy_shape(h: int, w: int, scale_px: int, budget: int) -> tuple[int, int]:
    f = min(1.0, math.sqrt(budget / max(1, h * w * scale_px * scale_px)))
    return max(1, round(h * f)), max(1, round(w * f))


def _check_mode(opts: TileOptions) -> None:
    if opts.mode not in ("exact", "fast"):
        raise VaeInputError(f"mode={opts.mode!r}: expected 'exact' or 'fast'")


def _tiled(stages: list[list[Segment]], items: list[Callable[[], torch.Tensor]], size: tuple[int, int],
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


def decoder_forward_tiled(model: AutoencoderKL, h: torch.Tensor, tile: int, opts: TileOptions) -> torch.Tensor:
    """Tiled ``model.decoder`` forward: decoder input ``[B, z, h, w]`` (after post_quant_conv) → ``[B, 3, 8h, 8w]``
    in the model's dtype. Untiled when one tile covers the latent."""
    _check_mode(opts)
    dec, down = model.decoder, model.config.downscale
    core = max(1, tile // down)
    b, _, lh, lw = h.shape
    if core >= lh and core >= lw:
        return _untiled(dec, h, opts)

    def low(t: torch.Tensor) -> torch.Tensor:
        t = dec.stem(t)
        for blk in dec.up[-1].block:
            t = blk(t)
        return t

    proxies = None
    if opts.mode == "fast":
        ph, pw = _proxy_shape(lh, lw, down, opts.proxy_pixels or max(256 * 256, tile * tile))
        proxies = [lambda i=i: low(F.adaptive_avg_pool2d(h[i:i + 1], (ph, pw)) if (ph, pw) != (lh, lw)
                                   else h[i:i + 1]) for i in range(b)]
    out = torch.empty((b, model.config.out_channels, lh * down, lw * down), device=h.device, dtype=h.dtype)
    _tiled(decoder_segments(model), [lambda i=i: low(h[i:i + 1]) for i in range(b)], (lh, lw), 1, (lh, lw),
           core, out, proxies, opts)
    return out


def encoder_forward_tiled(model: AutoencoderKL, x: torch.Tensor, tile: int, opts: TileOptions) -> torch.Tensor:
    """Tiled ``model.encoder`` forward: images ``[B, 3, H, W]`` → moments ``[B, 2z, H//8, W//8]`` (before
    quant_conv), in the model's dtype. Untiled when one tile covers the latent."""
    _check_mode(opts)
    enc, down = model.encoder, model.config.downscale
    b, _, hh, ww = x.shape
    stages = encoder_segments(model)
    lat = (hh, ww)
    for _ in stages:
        lat = (lat[0] // 2, lat[1] // 2)
    core = max(1, tile // down)
    if core >= lat[0] and core >= lat[1]:
        return _untiled(enc, x, opts)
    proxies = None
    if opts.mode == "fast":
        ph, pw = _proxy_shape(hh, ww, 1, opts.proxy_pixels or max(256 * 256, tile * tile))
        ph, pw = (hh, ww) if (ph, pw) == (hh, ww) else (max(down, ph // down * down), max(down, pw // down * down))
        proxies = [lambda i=i: x[i:i + 1] if (ph, pw) == (hh, ww) else F.interpolate(
            x[i:i + 1].float(), size=(ph, pw), mode="bilinear", antialias=True, align_corners=False).to(x.dtype)
            for i in range(b)]
    width = stages[-1][-1].out_channels
    low = torch.empty((b, width, lat[0], lat[1]), device=x.device, dtype=x.dtype)
    _tiled(stages, [lambda i=i: x[i:i + 1] for i in range(b)], (hh, ww), 2 ** len(stages), lat, core, low,
           proxies, opts)
    for blk in enc.down[-1].block:
        low = blk(low)
    return enc.head(low)


def decode_tiled(model: AutoencoderKL, z: torch.Tensor, tile: int, opts: TileOptions) -> torch.Tensor:
    """Tiled decode of raw latents ``z`` ``[B, C, h, w]`` → ``[B, 3, 8h, 8w]`` (dtype of the model)."""
    return decoder_forward_tiled(model, model.decode_input(z), tile, opts)


def encode_tiled(model: AutoencoderKL, x: torch.Tensor, tile: int, opts: TileOptions) -> torch.Tensor:
    """Tiled encode of images ``x`` ``[B, 3, H, W]`` → raw posterior mean ``[B, C, H//8, W//8]``."""
    return model.moments_to_mean(encoder_forward_tiled(model, x, tile, opts))


def _untiled(fn: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor, opts: TileOptions) -> torch.Tensor:
    """An untiled call: no autograd graph, and one progress step so hosts see the call finish."""
    with torch.no_grad():
        out = fn(t)
    if opts.progress is not None:
        opts.progress(1, 1)
    return out


def _free_after_oom(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _run(kind: str, model: AutoencoderKL, t: torch.Tensor, opts: TileOptions, pixels: tuple[int, int],
         untiled: Callable[[torch.Tensor], torch.Tensor],
         tiled: Callable[[AutoencoderKL, torch.Tensor, int, TileOptions], torch.Tensor]) -> torch.Tensor:
    _check_mode(opts)  # on every path, tiled or not: a wrong mode is a caller's bug whether or not it tiles
    tile = opts.tile
    if isinstance(tile, str):
        if tile != "auto":
            raise VaeInputError(f"tile={tile!r}: expected None, 'auto' or an int ≥ {MIN_TILE} (image pixels)")
        tile = auto_tile(model, pixels[0] * t.shape[0], pixels[1], t.dtype, t.device)
        if tile is not None:
            log.info("%s: auto tile %d px for %dx%d (batch %d)", kind, tile, pixels[1], pixels[0], t.shape[0])
    elif tile is not None:
        if isinstance(tile, bool) or not isinstance(tile, int):
            raise VaeInputError(f"tile={tile!r}: expected None, 'auto' or an int ≥ {MIN_TILE} (image pixels)")
        if tile < MIN_TILE:
            raise VaeInputError(f"tile={tile}: below the minimum of {MIN_TILE} image pixels")
    resolve_budget(opts.cache_bytes, torch.device("meta"))  # validate the argument early
    if opts.channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    token = ATTENTION_HOOK.set(lambda done, total: _attention_cancel(opts))
    try:
        with torch.no_grad():  # inference only: no autograd graph may outlive a tile
            return _run_hooked(kind, model, t, opts, pixels, untiled, tiled, tile).contiguous()
    finally:
        ATTENTION_HOOK.reset(token)


def _attention_cancel(opts: TileOptions) -> None:
    """Between attention query chunks: the host's cancel check (it may raise its own interrupt)."""
    if opts.cancel is not None and opts.cancel():
        raise Cancelled("VAE call cancelled during attention")


def _run_hooked(kind: str, model: AutoencoderKL, t: torch.Tensor, opts: TileOptions, pixels: tuple[int, int],
                untiled: Callable[[torch.Tensor], torch.Tensor],
                tiled: Callable[[AutoencoderKL, torch.Tensor, int, TileOptions], torch.Tensor],
                tile: Optional[int]) -> torch.Tensor:
    if tile is not None:
        return tiled(model, t, tile, opts)
    failed: Optional[str] = None
    try:
        return _untiled(untiled, t, opts)
    except Exception as exc:  # noqa: BLE001 - only allocation failures are handled, the rest re-raised
        if not is_oom(exc):
            raise
        failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    # outside the except block, so the failed attempt's frames and tensors can be freed
    _free_after_oom(t.device)
    budget = free_memory(t.device) // 2
    largest = max(pixels)
    if largest <= MIN_TILE:
        raise VaeError(f"{kind}: out of memory on a {pixels[1]}x{pixels[0]} image ({failed}), too small to tile")
    tile = min(auto_tile(model, pixels[0], pixels[1], t.dtype, t.device, budget) or largest, largest // 2)
    tile = max(MIN_TILE, tile // 8 * 8)
    f = model.config.downscale
    if tile // f >= max(pixels[0] // f, pixels[1] // f):  # one tile would cover the latent: the same call again
        raise VaeError(f"{kind}: out of memory on a {pixels[1]}x{pixels[0]} image ({failed}); the smallest tile "
                       f"({MIN_TILE} px) covers it, so tiling cannot help")
    log.warning("%s: out of memory untiled (%s); retrying tiled with %d px tiles", kind, failed, tile)
    return tiled(model, t, tile, opts)


def decoder_forward(model: AutoencoderKL, h: torch.Tensor, opts: Optional[TileOptions] = None) -> torch.Tensor:
    """``model.decoder`` forward per ``opts`` (post-quant latent → image), with the same OOM fallback."""
    opts = opts or TileOptions()
    f = model.config.downscale
    return _run("decode", model, h, opts, (h.shape[2] * f, h.shape[3] * f), model.decoder, decoder_forward_tiled)


def encoder_forward(model: AutoencoderKL, x: torch.Tensor, opts: Optional[TileOptions] = None) -> torch.Tensor:
    """``model.encoder`` forward per ``opts`` (image → moments), with the same OOM fallback."""
    opts = opts or TileOptions()
    return _run("encode", model, x, opts, (x.shape[2], x.shape[3]), model.encoder, encoder_forward_tiled)


def _local_tiled(kind: str) -> Callable[[Any, torch.Tensor, int, TileOptions], torch.Tensor]:
    """Tiled call of a network whose stages are local (``encode_stages``/``decode_stages``, see
    :mod:`vae_core.tile_local`): halos make it exact, in one pass, in either mode."""

    def run(model: Any, t: torch.Tensor, tile: int, opts: TileOptions) -> torch.Tensor:
        stages = model.decode_stages() if kind == "decode" else model.encode_stages()
        scale = model.config.downscale if kind == "decode" else 1
        out, tiles = run_stages(stages, t, tile, scale, opts.progress, opts.cancel)
        if opts.report is not None:
            opts.report.schedule, opts.report.tiles, opts.report.sweeps = "halo", tiles, 1
        return out

    return run


def decode(model: AutoencoderKL, z: torch.Tensor, opts: Optional[TileOptions] = None) -> torch.Tensor:
    """Decode raw latents ``[B, C, h, w]`` → images ``[B, 3, 8h, 8w]`` per ``opts`` (untiled, tiled or auto),
    falling back to tiles when an untiled call runs out of memory. ``model``: a kl-f8 AutoencoderKL (GroupNorm
    sweeps) or a network with local stages (TAESD: halos)."""
    opts = opts or TileOptions()
    f = model.config.downscale
    tiled = decode_tiled if isinstance(model, AutoencoderKL) else _local_tiled("decode")
    return _run("decode", model, z, opts, (z.shape[2] * f, z.shape[3] * f), model.decode, tiled)


def encode(model: AutoencoderKL, x: torch.Tensor, opts: Optional[TileOptions] = None) -> torch.Tensor:
    """Encode images ``[B, 3, H, W]`` in [-1, 1] → raw posterior means ``[B, C, H//8, W//8]``; see :func:`decode`."""
    opts = opts or TileOptions()
    tiled = encode_tiled if isinstance(model, AutoencoderKL) else _local_tiled("encode")
    return _run("encode", model, x, opts, (x.shape[2], x.shape[3]), model.encode, tiled)
