"""Exact streamed tiling of video networks whose layers may *lag*: a non-causal conv (the LTX decoder's, padded in
time by replicating the clip's first and last frames) needs the next frame before it can give a frame, so a chunk
of input frames does not map to a fixed range of output frames.

Each layer of such a network keeps its own state (:class:`~vae_core.tiling.stream.CausalState`): the input frames it
has not consumed yet. It gives whatever frames its input allows; on its *final* call (``state.final``: every input
frame has arrived) it pads the clip's end as the reference does and gives the rest. Chained, the frames of the whole
clip come out in order, exactly as a whole-clip pass gives them, whatever the chunking (a causal layer simply never
lags, so causal networks run here too).

The engine feeds the chain's input chunk by chunk through *rounds*: in a round every stage takes frames from its
input queue, runs on them and appends what it gives to the next stage's queue. A stage may take at most as many
frames per round as it took in the steadiest round so far (at least one): when the input ends, the frames still in
flight (a lag of one frame per conv, tens of latent frames in a deep decoder) drain through later rounds a few frames
at a time instead of in one burst, so memory stays bounded by the chunk, not by the lag (the first stage takes
whole chunks). A stage is called final once its upstream has finished and its queue is empty.

Spatial tiling is as in :mod:`vae_core.tiling.stream`: tile-major (each spatial tile runs the whole chain through all
rounds with its own state; halos over the chain) or level-major (each stage runs tile by tile over whole frames with a
state per tile; halos over one stage). Stages learn the origin of their input window in the frame
(``state.window``): a stage that adds a pre-drawn whole-frame noise map slices it there.

Shapes: ``[B, C, T, H, W]``; a chunk's output range is not used (frames are written in order); the last chunk's
output end is the total output frame count.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..errors import VaeInputError
from .geometry import Interval, split
from .halo import Local, stage_sizes as _sizes, windows as _windows
from .state import CausalState, Chunk

__all__ = ["lagged_tiled", "lagged_levels", "Rounds"]


class Rounds:
    """The queues of one chain (or of one stage's tiles, level-major) between rounds: per stage, the frames not
    taken yet, the most it has taken in a round, and whether it has finished."""

    def __init__(self, stages: int) -> None:
        self.queues: list[Optional[torch.Tensor]] = [None] * stages
        self.cap = [1] * stages
        self.done = [False] * stages
        self.ended = False  # the chain's input has ended (the last chunk was queued)

    def put(self, i: int, t: torch.Tensor) -> None:
        q = self.queues[i]
        self.queues[i] = t if q is None or not q.shape[2] else torch.cat([q, t], 2)

    def take(self, i: int) -> Optional[tuple[torch.Tensor, bool]]:
        """``(frames, final)`` for stage ``i`` this round, or None when it has nothing to do."""
        if self.done[i]:
            return None
        q = self.queues[i]
        avail = 0 if q is None else q.shape[2]
        upstream = self.ended if i == 0 else self.done[i - 1]
        if not upstream or i == 0:  # the first stage takes whole chunks
            self.cap[i] = max(self.cap[i], avail)
        n = min(avail, self.cap[i])
        final = upstream and n == avail
        if n == 0 and not final:
            return None
        assert q is not None or final
        if q is None:
            return None, final  # type: ignore[return-value]
        # what stays is copied (a view would keep the whole input of the round alive); an emptied queue holds nothing
        piece, self.queues[i] = q[:, :, :n], (q[:, :, n:].clone() if n < avail else q.new_empty((*q.shape[:2], 0,
                                                                                                 *q.shape[3:])))
        return piece, final


def _crop(t: torch.Tensor, r: Interval, c: Interval) -> torch.Tensor:
    return t[:, :, :, r[0]:r[1], c[0]:c[1]]


def _empty_like_frames(x: torch.Tensor) -> torch.Tensor:
    return x[:, :, :0]


class _Writer:
    """Writes output frames in order into ``out`` (allocated at the first non-empty piece); ``frames`` None: keeps
    nothing (a measuring run)."""

    def __init__(self, out: Optional[torch.Tensor], batch: int, frames: Optional[int], h: int, w: int) -> None:
        self.out, self.shape, self.pos = out, (batch, frames, h, w), {}

    def write(self, key: object, t: torch.Tensor, r: Interval, c: Interval) -> None:
        b, frames, h, w = self.shape
        if frames is None:
            return
        if self.out is None:
            self.out = t.new_empty((b, t.shape[1], frames, h, w))
        elif tuple(self.out.shape) != (b, t.shape[1], frames, h, w):
            raise VaeInputError(f"out= of shape {tuple(self.out.shape)}; expected {(b, t.shape[1], frames, h, w)}")
        p = self.pos.get(key, 0)
        if p + t.shape[2] > frames:
            raise RuntimeError(f"the chain gave {p + t.shape[2]} frames; the reference gives {frames}")
        self.out[:, :, p:p + t.shape[2], r[0]:r[1], c[0]:c[1]] = t
        self.pos[key] = p + t.shape[2]

    def check(self) -> torch.Tensor:
        frames = self.shape[1]
        if frames is None:
            return None  # type: ignore[return-value]
        short = {k: v for k, v in self.pos.items() if v != frames}
        if self.out is None or short:
            raise RuntimeError(f"the chain gave {sorted(short.values()) or 0} frames; the reference gives {frames}")
        return self.out


def _drain(rounds: Rounds, run: Callable[[int, torch.Tensor, bool], Optional[torch.Tensor]],
           emit: Callable[[torch.Tensor], None], until_done: bool) -> None:
    """Rounds until every queue is empty (or, ``until_done``, every stage has finished)."""
    n = len(rounds.queues)
    while True:
        moved = False
        for i in range(n):
            got = rounds.take(i)
            if got is None:
                continue
            piece, final = got
            y = run(i, piece, final)
            rounds.done[i] = final
            moved = True
            if y is None:
                continue
            if i + 1 < n:
                rounds.put(i + 1, y)
            elif y.shape[2]:
                emit(y)
        if not until_done and not any(q is not None and q.shape[2] for q in rounds.queues):
            return
        if until_done and rounds.done[-1]:
            return
        if not moved:
            raise RuntimeError("a lagged chain stalled: no stage could run")


def lagged_tiled(chain: Sequence[Local], x: torch.Tensor, chunks: list[Chunk], core_px: int,
                 frames_out: Optional[int],
                 out: Optional[torch.Tensor] = None, step: Optional[Callable[[], None]] = None
                 ) -> tuple[torch.Tensor, int, int]:
    """Tile-major: each spatial tile runs ``chain`` through every chunk (and the drain) with its own state.

    Returns ``(output [B, C', frames_out, H', W'], tiles, the largest state's peak bytes)`` (``frames_out`` None: no
    output, a measuring run); ``step()`` after every chunk of every tile."""
    sizes = _sizes(chain, x.shape[3], x.shape[4])
    oh, ow = sizes[-1]
    rows, cols = split(oh, core_px), split(ow, core_px)
    writer = _Writer(out, x.shape[0], frames_out, oh, ow)
    peak = 0
    for r in rows:
        for c in cols:
            needs = _windows(chain, sizes, r, c)
            state, rounds, peaks = CausalState(), Rounds(len(chain)), [0]

            def run(i: int, piece: Optional[torch.Tensor], final: bool) -> torch.Tensor:
                (r0, r1), (c0, c1) = needs[i]
                st = chain[i]
                state.final, state.window = final, (r0, c0)
                if piece is None:
                    piece = _empty_like_frames(_crop(x, needs[0][0], needs[0][1])) if i == 0 else None
                    if piece is None:
                        raise RuntimeError(f"stage {i} finished before any frame reached it")
                y = st.fn(piece, state)
                peaks[0] = max(peaks[0], state.nbytes)  # shortcut queues fill mid-clip, empty at its end
                s0, s1 = st.out_start(r0), st.out_start(c0)
                (q0, q1), (p0, p1) = needs[i + 1]
                return y[:, :, :, q0 - s0:q1 - s0, p0 - s1:p1 - s1]

            def emit(y: torch.Tensor, r: Interval = r, c: Interval = c) -> None:
                writer.write((r, c), y, r, c)

            for index, (i0, i1, _, _) in enumerate(chunks):
                state.chunk = index
                rounds.put(0, _crop(x[:, :, i0:i1], needs[0][0], needs[0][1]))
                last = index == len(chunks) - 1
                rounds.ended = last
                _drain(rounds, run, emit, until_done=last)
                if step is not None:
                    step()
            peak = max(peak, peaks[0])
            del state, rounds
    return writer.check(), len(rows) * len(cols), peak


def lagged_levels(chain: Sequence[Local], x: torch.Tensor, chunks: list[Chunk], cores: list[int], frames_out: int,
                  out: Optional[torch.Tensor] = None, step: Optional[Callable[[], None]] = None
                  ) -> tuple[torch.Tensor, int, int]:
    """Level-major: per round, each stage runs tile by tile over whole frames (tiles of ``cores[i]`` output px,
    each with its own state) on what it takes from its queue.

    Returns ``(output, tiles of the largest stage, the most bytes all states held at once)``; ``step()`` after every
    chunk."""
    sizes = _sizes(chain, x.shape[3], x.shape[4])
    grids = []
    for i, st in enumerate(chain):
        (ih, iw), (oh_, ow_) = sizes[i], sizes[i + 1]
        grids.append([(r, c, st.needs(r, ih), st.needs(c, iw))
                      for r in split(oh_, cores[i]) for c in split(ow_, cores[i])])
    states = [[CausalState() for _ in grid] for grid in grids]
    oh, ow = sizes[-1]
    writer = _Writer(out, x.shape[0], frames_out, oh, ow)
    rounds = Rounds(len(chain))
    held, peak = [0] * len(chain), [0]  # state bytes per stage (all its tiles), the most of their sum

    def run(i: int, piece: Optional[torch.Tensor], final: bool) -> torch.Tensor:
        st, (h, w) = chain[i], sizes[i + 1]
        if piece is None:
            piece = x[:, :, :0] if i == 0 else None
            if piece is None:
                raise RuntimeError(f"stage {i} finished before any frame reached it")
        y: Optional[torch.Tensor] = None
        for (r, c, ir, ic), state in zip(grids[i], states[i]):
            state.final, state.window = final, (ir[0], ic[0])
            o = st.fn(_crop(piece, ir, ic), state)
            a, b = st.out_start(ir[0]), st.out_start(ic[0])
            if y is None:
                y = o.new_empty((o.shape[0], o.shape[1], o.shape[2], h, w))
            y[:, :, :, r[0]:r[1], c[0]:c[1]] = o[:, :, :, r[0] - a:r[1] - a, c[0] - b:c[1] - b]
            del o
        assert y is not None
        held[i] = sum(s.nbytes for s in states[i])
        peak[0] = max(peak[0], sum(held))
        return y

    def emit(y: torch.Tensor) -> None:
        writer.write("all", y, (0, oh), (0, ow))

    for index, (i0, i1, _, _) in enumerate(chunks):
        for row in states:
            for s in row:
                s.chunk = index
        rounds.put(0, x[:, :, i0:i1])
        last = index == len(chunks) - 1
        rounds.ended = last
        _drain(rounds, run, emit, until_done=last)
        if step is not None:
            step()
    return writer.check(), max(len(g) for g in grids), peak[0]
