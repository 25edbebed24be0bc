"""Exact tiling of causal video networks in space *and* time, streaming over frames with bounded memory.

A causal video VAE (the Wan design) runs its reference schedule chunk by chunk: each causal 3-D conv keeps the last
frames of its input in a feature cache (:class:`CausalState`) and prepends them to the next chunk. Its per-frame
operations are local in space (3×3 convs, a norm over channels, stride-2 resamplers) apart from the mid block's
attention over each whole frame at latent resolution. So a call is planned as :class:`Segment` s in order:

* a *tiled* segment is a chain of :class:`~vae_core.tiling.halo.Local` stages whose ``fn(x, state)`` takes a window
  ``[B, C, t, h, w]`` of one chunk. For each spatial tile the window that the tile's core needs (halos from
  :meth:`Local.needs`, aligned to every stride) runs through *all* chunks in order with its own state, so every
  conv sees exactly the frames the reference gives it; only the core is kept. Window edges inside the frame are
  zero-padded by the convs, but the halo keeps every kept pixel clear of them, in every frame, so the tiled result
  equals the untiled reference to float rounding. Tile-outer order keeps one tile's cache alive at a time: memory is
  one tile's window times one chunk, plus its cache, independent of the frame count and of the frame size.
* a *whole* segment (the mid block) runs whole frames chunk by chunk with one state, at latent resolution.

Between segments the result is held at that segment's (latent) resolution; the last segment writes into ``out``
(the caller's tensor, e.g. on the CPU while the network runs on a GPU) piece by piece.

Shapes: videos ``[B, C, T, H, W]``; chunks are ``(in_start, in_end, out_start, out_end)`` frame ranges.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from ..errors import VaeInputError
from .geometry import Interval, split
from .halo import Local, Whole, stage_sizes as _sizes, windows as _windows
from .lagged import lagged_levels, lagged_tiled
from .options import TileOptions, stepper
from .state import CausalState, Chunk, is_first

__all__ = ["CausalState", "Segment", "Chunk", "run_segments", "stream_tiled", "stream_levels", "level_cores",
           "estimate_working_set", "is_first", "SCHEDULES", "encode_chunks", "decode_chunks", "run_chunked"]

#: what passes between stages: a video, or a tuple of same-sized videos (a block split into stages carries its
#: shortcut input beside its branch)
Carry = Union[torch.Tensor, tuple[torch.Tensor, ...]]


@dataclass
class Segment:
    """One step of a streamed plan.

    Attributes:
        stages: a chain of :class:`Local` stages (tiled) or one :class:`Whole` stage (whole frames); each ``fn`` is
            ``fn(x [B, C, t, h, w], state) -> [B, C', t', h', w']``.
        chunks: the reference's chunk schedule for this segment's input.
        image_scale: image pixels per pixel of this segment's input (for the tile size).
        lagged: the chain's layers may lag (non-causal in time): run by :mod:`vae_core.tiling.lagged`, frames
            written in order (the chunks' output ranges unused but the last end: the output frame count).
    """

    stages: Union[list[Local], Whole]
    chunks: list[Chunk]
    image_scale: float
    lagged: bool = False


def _check_strides(chain: Sequence[Local], sizes: list[tuple[int, int]]) -> None:
    for st, (ih, iw) in zip(chain, sizes):
        if st.down > 1 and (ih % st.down or iw % st.down):
            raise VaeInputError(f"tiled input of {ih}×{iw} px at a stride-{st.down} stage; expected sides that are "
                                f"multiples of {st.down}")


def _alloc(out: Optional[torch.Tensor], like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if out is None:
        return like.new_empty(shape)
    if tuple(out.shape) != shape:
        raise VaeInputError(f"out= of shape {tuple(out.shape)}; expected {shape}")
    return out


def _crop(t: Carry, r0: int, r1: int, c0: int, c1: int) -> Carry:
    """Rows ``r0:r1``, cols ``c0:c1`` of a video ``[B, C, t, H, W]`` (or of each in a tuple of them)."""
    if isinstance(t, tuple):
        return tuple(u[:, :, :, r0:r1, c0:c1] for u in t)
    return t[:, :, :, r0:r1, c0:c1]


def _place(y: Optional[Carry], o: Carry, h: int, w: int, r: Interval, c: Interval) -> Carry:
    """Write tile ``o`` (already cropped to its core) at rows ``r``, cols ``c`` of ``y`` (allocated ``h``×``w`` at
    the first tile)."""
    if isinstance(o, tuple):
        ys = y if isinstance(y, tuple) else (None,) * len(o)
        return tuple(_place(a, b, h, w, r, c) for a, b in zip(ys, o))
    if y is None:
        y = o.new_empty((o.shape[0], o.shape[1], o.shape[2], h, w))
    assert isinstance(y, torch.Tensor)
    y[:, :, :, r[0]:r[1], c[0]:c[1]] = o
    return y


def _tile_chunk(chain: Sequence[Local], needs: list[tuple[Interval, Interval]], x: torch.Tensor,
                state: CausalState) -> torch.Tensor:
    """One chunk ``x [B, C, t, H, W]`` (whole frames) through ``chain`` in the window ``needs`` gives, cropped to the
    next stage's window after every stage; returns the core."""
    (r0, r1), (c0, c1) = needs[0]
    t: Carry = x[:, :, :, r0:r1, c0:c1]
    for i, st in enumerate(chain):
        t = st.fn(t, state)
        s0, s1 = st.out_start(r0), st.out_start(c0)
        (r0, r1), (c0, c1) = needs[i + 1]
        t = _crop(t, r0 - s0, r1 - s0, c0 - s1, c1 - s1)
    assert isinstance(t, torch.Tensor), "a chain ends on one tensor"
    return t


def stream_tiled(chain: Sequence[Local], x: torch.Tensor, chunks: list[Chunk], core_px: int, frames_out: int,
                 out: Optional[torch.Tensor] = None, step: Optional[Callable[[], None]] = None,
                 state_type: type = CausalState) -> tuple[torch.Tensor, int, int]:
    """Run ``chain`` on ``x [B, C, T, H, W]`` tile by tile, each tile through every chunk with its own state.

    Returns:
        ``(output [B, C', frames_out, H', W'], tiles, largest state bytes)``; ``step()`` is called after every
        tile-chunk (progress and cancel).
    """
    sizes = _sizes(chain, x.shape[3], x.shape[4])
    _check_strides(chain, sizes)
    oh, ow = sizes[-1]
    rows, cols = split(oh, core_px), split(ow, core_px)
    peak = 0
    for r in rows:
        for c in cols:
            needs = _windows(chain, sizes, r, c)
            state = state_type()
            for index, (i0, i1, o0, o1) in enumerate(chunks):
                state.chunk = index
                t = _tile_chunk(chain, needs, x[:, :, i0:i1], state)
                if t.shape[2] != o1 - o0:
                    raise RuntimeError(f"chunk {index} gave {t.shape[2]} frames; the schedule expects {o1 - o0}")
                out = _alloc(out, t, (x.shape[0], t.shape[1], frames_out, oh, ow))
                out[:, :, o0:o1, r[0]:r[1], c[0]:c[1]] = t
                if step is not None:
                    step()
            peak = max(peak, state.nbytes)
            del state
    assert out is not None
    return out, len(rows) * len(cols), peak


def _stage_grid(st: Local, size_in: tuple[int, int], size_out: tuple[int, int], core: int
                ) -> list[tuple[Interval, Interval, Interval, Interval]]:
    """One stage's output tiles ``(rows, cols)`` of at most ``core`` px and the input window each needs."""
    (ih, iw), (oh, ow) = size_in, size_out
    return [(r, c, st.needs(r, ih), st.needs(c, iw)) for r in split(oh, core) for c in split(ow, core)]


def level_cores(chain: Sequence[Local], image_scale: float, tile: int) -> list[int]:
    """Per stage, the output tile edge of the level-major schedule: ``tile / sqrt(scale)`` stage px at a stage
    whose output has ``scale`` image px per px (channels grow as resolution falls, so a tile's bytes stay about
    the same at every level)."""
    cores, scale = [], float(image_scale)
    for st in chain:
        scale = scale * st.down / st.up
        cores.append(max(8, int(tile / math.sqrt(scale))))
    return cores


def stream_levels(chain: Sequence[Local], x: torch.Tensor, chunks: list[Chunk], cores: list[int], frames_out: int,
                  out: Optional[torch.Tensor] = None, step: Optional[Callable[[], None]] = None,
                  state_type: type = CausalState) -> tuple[torch.Tensor, int, int]:
    """Run ``chain`` on ``x [B, C, T, H, W]`` chunk by chunk, each stage tiled on its own over whole frames.

    The level-major schedule: for every chunk, stage ``i`` runs tile by tile over the frame (tiles of
    ``cores[i]`` output px, each with its *own* causal state, kept across chunks because its window is the same in
    every chunk) and its output is assembled before stage ``i + 1`` starts. A halo then spans one stage instead of
    the whole chain, so the cost is close to the untiled one; the price is memory that grows with the frame size
    (every tile's state, and a chunk's whole-frame activations), never with the frame count.

    Returns:
        ``(output [B, C', frames_out, H', W'], tiles of the largest stage, bytes of all states)``; ``step()`` after
        every stage of every chunk.
    """
    sizes = _sizes(chain, x.shape[3], x.shape[4])
    _check_strides(chain, sizes)
    grids = [_stage_grid(st, sizes[i], sizes[i + 1], cores[i]) for i, st in enumerate(chain)]
    states = [[state_type() for _ in grid] for grid in grids]
    oh, ow = sizes[-1]
    for index, (i0, i1, o0, o1) in enumerate(chunks):
        t: Carry = x[:, :, i0:i1]
        for st, grid, tile_states, (h, w) in zip(chain, grids, states, sizes[1:]):
            y: Optional[Carry] = None
            for (r, c, ir, ic), state in zip(grid, tile_states):
                state.chunk = index
                o = st.fn(_crop(t, ir[0], ir[1], ic[0], ic[1]), state)
                a, b = st.out_start(ir[0]), st.out_start(ic[0])
                y = _place(y, _crop(o, r[0] - a, r[1] - a, c[0] - b, c[1] - b), h, w, r, c)
                del o
            assert y is not None
            t = y
            if step is not None:
                step()
        assert isinstance(t, torch.Tensor), "a chain ends on one tensor"
        if t.shape[2] != o1 - o0:
            raise RuntimeError(f"chunk {index} gave {t.shape[2]} frames; the schedule expects {o1 - o0}")
        out = _alloc(out, t, (x.shape[0], t.shape[1], frames_out, oh, ow))
        out[:, :, o0:o1] = t
        del t
    assert out is not None
    return out, max(len(g) for g in grids), sum(s.nbytes for row in states for s in row)


def encode_chunks(frames: int, ft: int) -> list[Chunk]:
    """The causal video VAEs' encode schedule for ``frames = 1 + ft·k``: frame 0, then ``ft``-frame chunks, one latent
    frame each."""
    return [(0, 1, 0, 1)] + [(1 + ft * i, 1 + ft * (i + 1), 1 + i, 2 + i) for i in range((frames - 1) // ft)]


def decode_chunks(latent_frames: int, ft: int) -> list[Chunk]:
    """Their decode schedule: one latent frame at a time; the first gives 1 frame, the others ``ft``."""
    return [(0, 1, 0, 1)] + [(i, i + 1, 1 + ft * (i - 1), 1 + ft * i) for i in range(1, latent_frames)]


def run_chunked(fn: Callable[[torch.Tensor, CausalState], torch.Tensor], x: torch.Tensor, chunks: list[Chunk],
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A reference schedule, untiled: ``fn(chunk, state)`` on each chunk of ``x [B, C, T, H, W]`` in order with one
    causal state, each result written at its output frames (into ``out`` if given)."""
    state = CausalState()
    for index, (i0, i1, o0, o1) in enumerate(chunks):
        state.chunk = index
        y = fn(x[:, :, i0:i1], state)
        out = _alloc(out, y, (y.shape[0], y.shape[1], chunks[-1][3], y.shape[3], y.shape[4]))
        out[:, :, o0:o1] = y
    assert out is not None
    return out


def _stream_whole(stage: Whole, x: torch.Tensor, chunks: list[Chunk], frames_out: int,
                  out: Optional[torch.Tensor], state_type: type) -> tuple[torch.Tensor, int]:
    state = state_type()
    for index, (i0, i1, o0, o1) in enumerate(chunks):
        state.chunk = index
        t = stage.fn(x[:, :, i0:i1], state)
        out = _alloc(out, t, (x.shape[0], t.shape[1], frames_out, t.shape[3], t.shape[4]))
        out[:, :, o0:o1] = t
    assert out is not None
    return out, state.nbytes


#: the streamed schedules: tile-major (least memory) and level-major (least compute)
SCHEDULES = ("tile", "level")


def run_segments(segments: list[Segment], x: torch.Tensor, tile: Optional[int], opts: TileOptions,
                 out: Optional[torch.Tensor] = None, state_type: type = CausalState,
                 schedule: str = "tile") -> torch.Tensor:
    """Run a streamed plan on ``x``; ``tile`` in image pixels (None: every chain untiled, still streamed);
    ``schedule`` ``"tile"`` (:func:`stream_tiled`) or ``"level"`` (:func:`stream_levels`).

    Progress counts tile-chunks (tile-major) or stage-chunks (level-major) of the tiled segments; ``opts.cancel``
    is checked between them (Cancelled). The report says the schedule (``"stream"`` or ``"stream-levels"``), the
    tiles of the largest chain (stage) and the largest causal state (all tiles' states, level-major).
    """
    if schedule not in SCHEDULES:
        raise VaeInputError(f"schedule={schedule!r}: expected one of {SCHEDULES}")
    levels = schedule == "level" and tile is not None
    s0, (h0, w0) = segments[0].image_scale, x.shape[3:]

    def steps(s: Segment) -> int:
        if levels:
            return len(s.chunks) * (1 if s.lagged else len(s.stages))
        return len(s.chunks) * _tile_count(s, int(h0 * s0 / s.image_scale), int(w0 * s0 / s.image_scale), tile)

    step = stepper(opts, sum(steps(s) for s in segments if isinstance(s.stages, list)), "tiles")

    tiles, peak = 0, 0
    for k, seg in enumerate(segments):
        last = k == len(segments) - 1
        frames_out = seg.chunks[-1][3]
        if isinstance(seg.stages, Whole):
            x, nbytes = _stream_whole(seg.stages, x, seg.chunks, frames_out, out if last else None, state_type)
        elif seg.lagged:
            if levels:
                assert tile is not None
                x, n, nbytes = lagged_levels(seg.stages, x, seg.chunks, level_cores(seg.stages, seg.image_scale, tile),
                                             frames_out, out if last else None, step)
            else:
                x, n, nbytes = lagged_tiled(seg.stages, x, seg.chunks, _core_px(seg, tile, x.shape[3], x.shape[4]),
                                            frames_out, out if last else None, step)
            tiles = max(tiles, n)
        elif levels:
            assert tile is not None
            x, n, nbytes = stream_levels(seg.stages, x, seg.chunks, level_cores(seg.stages, seg.image_scale, tile),
                                         frames_out, out if last else None, step, state_type)
            tiles = max(tiles, n)
        else:
            core = _core_px(seg, tile, x.shape[3], x.shape[4])
            x, n, nbytes = stream_tiled(seg.stages, x, seg.chunks, core, frames_out, out if last else None, step,
                                        state_type)
            tiles = max(tiles, n)
        peak = max(peak, nbytes)
    if opts.report is not None:
        opts.report.schedule = "stream-levels" if levels else "stream"
        opts.report.tiles, opts.report.sweeps = tiles, 1
        opts.report.cache_peak = peak
    return x


def _core_px(seg: Segment, tile: Optional[int], h: int, w: int) -> int:
    """A chain's tile core in its output pixels (the whole frame when ``tile`` is None), for input ``h``×``w``."""
    assert isinstance(seg.stages, list)
    if tile is None:
        oh, ow = _sizes(seg.stages, h, w)[-1]
        return max(oh, ow, 1)
    scale = float(seg.image_scale)
    for st in seg.stages:
        scale = scale * st.down / st.up
    return max(8, int(tile / scale))


def _tile_count(seg: Segment, h: int, w: int, tile: Optional[int]) -> int:
    assert isinstance(seg.stages, list)
    oh, ow = _sizes(seg.stages, h, w)[-1]
    core = _core_px(seg, tile, h, w)
    return len(split(oh, core)) * len(split(ow, core))


def _out_channels(chain: Sequence[Local], x: torch.Tensor) -> int:
    """Channels a chain gives for input ``x`` (one frame through it on the meta device)."""
    with torch.device("meta"):
        t = x[:, :, :1].to("meta")
        for st in chain:
            t = st.fn(t, None)
    return t.shape[1]


def _largest_window(chain: Sequence[Local], h: int, w: int, core_px: int) -> tuple[Interval, Interval]:
    """The output core whose input window is largest (an interior tile where there is one)."""
    sizes = _sizes(chain, h, w)
    oh, ow = sizes[-1]

    def area(rc: tuple[Interval, Interval]) -> int:
        (r0, r1), (c0, c1) = _windows(chain, sizes, *rc)[0]
        return (r1 - r0) * (c1 - c0)

    return max(((r, c) for r in split(oh, core_px) for c in split(ow, core_px)), key=area)


def estimate_working_set(segments: list[Segment], x: torch.Tensor, tile: Optional[int],
                         dtype: torch.dtype, schedule: str = "tile") -> dict[str, int]:
    """Estimated peak bytes of :func:`run_segments` on ``x`` (a ``meta`` tensor of the real shape and ``dtype``;
    ``segments`` from a ``meta`` twin of the network in ``dtype``), by a dry run of the largest tile through its
    first three chunks (level-major: of every stage's tiles through the first three chunks).

    Returns bytes of ``state`` (the largest tile's causal state in steady state, measured), ``activations`` (three
    times the largest tensor one chunk of that tile creates: a block's input, its branch and its output in
    flight), ``stores`` (the latent-resolution results held between segments, all frames) and ``output`` (what
    ``out=`` saves when given), and ``total`` (all but the output).
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    size = torch.empty((), dtype=dtype).element_size()
    largest = [0]

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    largest[0] = max(largest[0], t.numel())
            return out

    state_bytes, stores, t = 0, 0, x
    for k, seg in enumerate(segments):
        frames_out = seg.chunks[-1][3]
        h, w = t.shape[3], t.shape[4]
        if isinstance(seg.stages, Whole):
            probe = CausalState()
            with Track():
                for index, (i0, i1, _, _) in enumerate(seg.chunks[:3]):
                    probe.chunk = index
                    y = seg.stages.fn(t[:, :, i0:i1], probe)
        elif seg.lagged:
            # the first four chunks run as a whole clip (its end drained as a real call drains it): over the
            # largest tile's input window (tile-major), or whole frames (untiled, and level-major, whose tiles'
            # states and assembled stage outputs add up to about a whole-frame run's)
            window = t
            if schedule != "level" and tile is not None:
                (r0, r1), (c0, c1) = _windows(seg.stages, _sizes(seg.stages, h, w),
                                              *_largest_window(seg.stages, h, w, _core_px(seg, tile, h, w)))[0]
                window = t[:, :, :, r0:r1, c0:c1]
            probe_chunks = [(i0, i1, 0, 0) for i0, i1, _, _ in seg.chunks[:4]]
            with Track():
                _, _, nbytes = lagged_tiled(seg.stages, window, probe_chunks, 1 << 30, None)
            state_bytes = max(state_bytes, nbytes)
            probe = CausalState()
            oh, ow = _sizes(seg.stages, h, w)[-1]
            y = x.new_empty((x.shape[0], _out_channels(seg.stages, window), 1, oh, ow))
        elif schedule == "level" and tile is not None:
            probe_chunks = seg.chunks[:3]
            with Track():
                y, _, nbytes = stream_levels(seg.stages, t, probe_chunks,
                                             level_cores(seg.stages, seg.image_scale, tile), probe_chunks[-1][3])
            state_bytes = max(state_bytes, nbytes)
            probe = CausalState()
            y = y[:, :, :1]
        else:
            core = _core_px(seg, tile, h, w)
            r, c = _largest_window(seg.stages, h, w, core)
            sizes = _sizes(seg.stages, h, w)
            needs = _windows(seg.stages, sizes, r, c)
            probe = CausalState()
            with Track():
                for index, (i0, i1, _, _) in enumerate(seg.chunks[:3]):
                    probe.chunk = index
                    y = _tile_chunk(seg.stages, needs, t[:, :, i0:i1], probe)
            oh, ow = sizes[-1]
            y = y.new_empty((y.shape[0], y.shape[1], 1, oh, ow))
        state_bytes = max(state_bytes, probe.nbytes)
        t = y.new_empty((y.shape[0], y.shape[1], frames_out, y.shape[3], y.shape[4]))
        if k < len(segments) - 1:
            stores += t.numel() * size
    return {"state": state_bytes, "activations": 3 * largest[0] * size, "stores": stores,
            "output": t.numel() * size, "total": state_bytes + 3 * largest[0] * size + stores}

