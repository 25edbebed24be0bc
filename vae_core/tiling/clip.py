"""Exact tiling of a video network whose GroupNorms span the whole clip (HunyuanVideo 1.0), with bounded compute
memory: one op at a time over the whole clip, in pieces.

A GroupNorm over ``T×H×W`` makes every output pixel depend on every input pixel, so no tile can run a chain of
layers on its own. But each *op* of such a network — ``conv(SiLU(GroupNorm(x)))`` plus a shortcut, a resampling
conv, the mid block's attention — is local once the norm's statistics are known, and the statistics of an op's
input are those of the previous op's output. So a call runs the network as a :class:`Program` of ops over
*registers* (whole-clip tensors at one resolution):

* each :class:`ConvOp` fills its output register piece by piece (a few frames × a tile of rows and columns); a
  piece gathers the input window its conv reads — the output range mapped back through the conv's stride, front
  padding and nearest upsampling, per axis, with out-of-range indices clamped, which *is* the replicate padding
  of the reference — normalises it with the whole-clip statistics, runs the conv *valid* over it, and adds the
  shortcut. Each output element is computed once (no halo FLOPs: the halo only reads input), so the cost is the
  untiled cost;
* while an op writes its output, the output's per-group statistics are pooled over the pieces (Chan merge in
  float64, :class:`~vae_core.tiling.stats.StatsAccumulator`), so the next op's norm has its whole-clip statistics
  when it starts: one pass per op, no sweep;
* an :class:`AttnOp` (the mid block's single-head attention over every latent pixel of the clip, or, with
  ``causal``, over the frames so far) computes keys and values for the whole clip at latent resolution, then the
  queries frame by frame.

Memory: one piece's window on the compute device, plus the registers alive at once, which grow with the clip.
Registers are held in blocks of frames; pieces run frame-group by frame-group, and an op that is the last reader of
its input (or shortcut) drops the input's blocks its later pieces no longer read, so while an op runs its input
shrinks as its output grows: about two whole-clip registers at a time, plus the register a residual block's branch
needs. At full resolution that is 128 to 256 channels per pixel (HunyuanVideo 1.0 at 1280×720, 121 frames, fp16: 28
to 57 GB per register). Registers live on the compute device when they fit
in half its free memory, else in CPU memory (pieces copied over). This is the price of the whole-clip reference;
the output equals the untiled pass to float rounding.

A *chunked* schedule (HunyuanVideo 1.0 as newer ComfyUI runs it: GroupNorms per chunk of frames, causal convs
reading the previous chunk's last input frames) runs one program per chunk over the chunk alone, with ``carry``
(:class:`Carries`): a conv's window reaching before the chunk's first frame reads the carried frames instead of
replicating, and each conv leaves its input's last frames for the next chunk. Then the registers hold one chunk.

Shapes: registers ``[B, C, T, H, W]``; intervals are half-open ``(start, end)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import split
from .options import TileOptions, stepper
from .stats import StatsAccumulator, apply_norm

__all__ = ["Axis", "ConvOp", "AttnOp", "Attend", "Program", "Clip", "Carries", "run_program", "count_pieces",
           "activation_bytes", "plan_bytes", "PIECE_FRAMES"]

#: output frames per piece
PIECE_FRAMES = 4


@dataclass(frozen=True)
class Axis:
    """How one axis of a conv maps output indices to input indices.

    Attributes:
        k, s: kernel size and stride; ``lo``/``hi``: replicate padding before/after (indices clamped);
        up: nearest upsampling factor before the conv (1 or 2); ``first``: the first input index is not repeated
            (HunyuanVideo's temporal upsampling: frame 0 stays one frame, the others double).
    """

    k: int = 1
    s: int = 1
    lo: int = 0
    hi: int = 0
    up: int = 1
    first: bool = False

    def upsampled(self, n: int) -> int:
        if self.up == 1:
            return n
        return 1 + self.up * (n - 1) if self.first else self.up * n

    def out_len(self, n: int) -> int:
        return (self.upsampled(n) + self.lo + self.hi - self.k) // self.s + 1

    def sources(self, o0: int, o1: int, n: int) -> list[int]:
        """Input indices (length ``n``) the conv reads for outputs ``o0:o1``, in the order it reads them."""
        last = self.upsampled(n) - 1
        out = []
        for i in range(o0 * self.s - self.lo, (o1 - 1) * self.s - self.lo + self.k):
            i = min(max(i, 0), last)
            if self.up > 1:
                i = (0 if i == 0 else (i - 1) // self.up + 1) if self.first else i // self.up
            out.append(i)
        return out


#: a convolution over 3 axes (time, rows, columns)
Axes = tuple[Axis, Axis, Axis]


@dataclass
class ConvOp:
    """``dst = post(conv(SiLU(norm(src))) + shortcut(res))`` (each part optional but the conv).

    ``conv`` is an ``nn.Conv3d`` without padding of its own, run valid over the gathered window; ``axes`` its
    (time, rows, cols) maps; ``norm`` a GroupNorm applied with ``src``'s whole-clip statistics, then SiLU;
    ``res`` a register at the output resolution added after the conv (through ``res_conv``, a 1×1×1 conv, if
    given); ``post`` a pointwise map of each output piece (e.g. a 1×1×1 conv); ``side`` = ``(register, conv)``: also
    write ``conv(src)`` (a 1×1×1 conv at the same resolution) to that register — a residual block's channel-changing
    shortcut computed while its input is read anyway, so the input is not kept for the block's second op."""

    src: str
    dst: str
    conv: nn.Conv3d
    axes: Axes
    norm: Optional[nn.GroupNorm] = None
    res: Optional[str] = None
    res_conv: Optional[nn.Module] = None
    post: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    side: Optional[tuple[str, nn.Module]] = None


#: ``attend(q [B, n·P, C], k, v [B, T·P, C], frames=T, causal, first)``: attention of the queries of frames
#: ``first .. first + n`` (``P`` tokens each) over every frame's keys, or with ``causal`` over frames 0..t for a query
#: of frame t (:func:`vae_core.families.layers.frame_attention`)
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, bool, int], torch.Tensor]


@dataclass
class AttnOp:
    """``dst = src + proj_out(attend(q, k, v))`` with q/k/v 1×1×1 convs of ``norm(src)`` (``block`` holds
    ``norm``, ``q``, ``k``, ``v``, ``proj_out``); ``causal``: a query sees the frames up to its own."""

    src: str
    dst: str
    block: nn.Module
    causal: bool
    attend: Attend


Op = Union[ConvOp, AttnOp]


@dataclass
class Program:
    """Ops in order; ``input``: the register holding the call's input, the last op's ``dst`` its output."""

    ops: list[Op]
    input: str = "x"
    norms: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        # registers whose statistics some op needs
        self.norms = {op.src for op in self.ops if isinstance(op, AttnOp) or op.norm is not None}

    def last_use(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for i, op in enumerate(self.ops):
            for r in (op.src, getattr(op, "res", None)):
                if r is not None:
                    out[r] = i
        return out


def frame_groups(n: int, size: int = PIECE_FRAMES) -> list[tuple[int, int]]:
    """``[0, size), [size, 2·size), ...`` up to ``n`` frames: the blocks registers are held in, and the pieces' frame
    ranges (aligned with them)."""
    return [(i, min(i + size, n)) for i in range(0, n, size)]


class Clip:
    """A register: a whole-clip tensor ``[B, C, T, H, W]`` held as blocks of :data:`PIECE_FRAMES` frames, allocated
    when a piece first writes into them and dropped once no later piece reads them (:meth:`free_before`), so an op
    that is its input's last reader hands the input's memory back as its output grows. ``of(t)`` wraps a caller's
    tensor (views: its memory stays the caller's)."""

    def __init__(self, shape: tuple[int, ...], like: torch.Tensor, device: torch.device) -> None:
        self.shape, self.like, self.device = tuple(shape), like, device
        self.blocks: dict[int, torch.Tensor] = {}
        self.owned = True

    @classmethod
    def of(cls, t: torch.Tensor) -> "Clip":
        clip = cls(tuple(t.shape), t, t.device)
        for k, (f0, f1) in enumerate(frame_groups(t.shape[2])):
            clip.blocks[k] = t[:, :, f0:f1]
        clip.owned = False
        return clip

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.blocks.values()) if self.owned else 0

    def window(self, t: tuple[int, int], r: tuple[int, int], c: tuple[int, int]) -> torch.Tensor:
        """Frames ``t``, rows ``r``, cols ``c`` (a view where the frames lie in one block)."""
        parts = []
        for f in range(t[0] // PIECE_FRAMES, (t[1] - 1) // PIECE_FRAMES + 1):
            if f not in self.blocks:
                raise RuntimeError(f"frames {t} of a register: block {f} was freed or never written")
            lo = max(t[0] - f * PIECE_FRAMES, 0)
            hi = min(t[1] - f * PIECE_FRAMES, PIECE_FRAMES)
            parts.append(self.blocks[f][:, :, lo:hi, r[0]:r[1], c[0]:c[1]])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def write(self, t: tuple[int, int], r: tuple[int, int], c: tuple[int, int], y: torch.Tensor) -> None:
        """Write piece ``y`` at frames ``t`` (within one block), rows ``r``, cols ``c``."""
        f = t[0] // PIECE_FRAMES
        block = self.blocks.get(f)
        if block is None:
            n = min(PIECE_FRAMES, self.shape[2] - f * PIECE_FRAMES)
            block = self.blocks[f] = y.new_empty((*self.shape[:2], n, *self.shape[3:]), device=self.device)
        block[:, :, t[0] - f * PIECE_FRAMES:t[1] - f * PIECE_FRAMES, r[0]:r[1], c[0]:c[1]] = y

    def free_before(self, frame: int) -> None:
        """Drop the blocks that end at or before ``frame``."""
        for f in [f for f in self.blocks if (f + 1) * PIECE_FRAMES <= frame]:
            del self.blocks[f]


def _double(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Nearest ×2 along ``dim`` (every element twice, in order)."""
    shape = list(x.shape)
    y = x.unsqueeze(dim + 1).expand(*shape[:dim + 1], 2, *shape[dim + 1:])
    return y.reshape(*shape[:dim], 2 * shape[dim], *shape[dim + 1:])


def _gather(reg: Clip, axes: Axes, ranges: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    """The window a conv with ``axes`` reads for outputs ``ranges`` (time, rows, cols), on ``device``: the source
    box read (a view where it can be) and copied over, upsampled where the axis upsamples, cropped to the conv's input
    range and replicate-padded where that range leaves the (upsampled) clip — the same values as
    ``Axis.sources`` lists, built with slices, expands and one pad (index gathers are slow on CPUs)."""
    n_src = reg.shape[2:]
    boxes = []
    for a, (o0, o1), n in zip(axes, ranges, n_src):
        ids = a.sources(o0, o1, n)
        boxes.append((ids[0], ids[-1] + 1))  # sources are non-decreasing
    win = reg.window(*boxes).to(device)
    pads: list[int] = []
    for axis, (a, (o0, o1), n, (s0, _)) in enumerate(zip(axes, ranges, n_src, boxes)):
        dim = 2 + axis
        u0 = s0  # upsampled index of the window's first element
        if a.up > 1:
            if a.first and s0 == 0:
                win = torch.cat([win.narrow(dim, 0, 1), _double(win.narrow(dim, 1, win.shape[dim] - 1), dim)], dim)
            else:
                win = _double(win, dim)
                u0 = 1 + 2 * (s0 - 1) if a.first else 2 * s0
        n_up = a.upsampled(n)
        lo, hi = o0 * a.s - a.lo, (o1 - 1) * a.s - a.lo + a.k
        c0, c1 = max(lo, 0), min(hi, n_up)
        win = win.narrow(dim, c0 - u0, c1 - c0)
        pads = [c0 - lo, hi - c1] + pads  # F.pad lists the last axis first
    if any(pads):
        win = F.pad(win, pads, mode="replicate")
    return win


def _activate(op: ConvOp, win: torch.Tensor, mean_var: Optional[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``SiLU(norm(win))`` with the register's statistics, or ``win`` for an op without a norm."""
    if op.norm is None or mean_var is None:
        return win
    return F.silu(apply_norm(op.norm, win, *mean_var), inplace=True)


def _window(op: ConvOp, src: Clip, ranges: tuple[tuple[int, int], ...], device: torch.device,
            mean_var: Optional[tuple[torch.Tensor, torch.Tensor]], prefix: Optional[torch.Tensor]) -> torch.Tensor:
    """The activated window ``op``'s conv reads for outputs ``ranges``. With ``prefix`` (an earlier chunk's last
    activated input frames, in upsampled time, ``[B, C, P, H, W]`` at the input's rows and cols), the frames before
    the first come from it instead of replicating the first frame."""
    a = op.axes[0]
    t0, t1 = ranges[0][0] * a.s - a.lo, (ranges[0][1] - 1) * a.s - a.lo + a.k  # in upsampled input frames
    if prefix is None or t0 >= 0:
        return _activate(op, _gather(src, op.axes, ranges, device), mean_var)
    n = prefix.shape[2]
    parts = [_gather(Clip.of(prefix), (Axis(),) + op.axes[1:], ((n + t0, n + min(t1, 0)), *ranges[1:]), device)]
    if t1 > 0:
        axes = (Axis(up=a.up, first=a.first),) + op.axes[1:]
        parts.append(_activate(op, _gather(src, axes, ((0, t1), *ranges[1:]), device), mean_var))
    return torch.cat(parts, dim=2)


def _carry_out(op: ConvOp, src: Clip, run: "_Run", mean_var: Optional[tuple[torch.Tensor, torch.Tensor]],
               prefix: Optional[torch.Tensor], edge: int) -> torch.Tensor:
    """The last ``lo`` frames of ``op``'s activated, upsampled input after ``prefix`` (or after the replicated first
    frame), whole rows and cols, on the register store, built in pieces of ``edge`` px (the compute device holds one
    piece): what the next chunk's run of ``op`` reads before its first frame."""
    a = op.axes[0]
    n_up = a.upsampled(src.shape[2])
    b, ch, _, rows, cols = src.shape
    axes = (Axis(up=a.up, first=a.first), Axis(), Axis())
    keep = min(a.lo, n_up)
    out = torch.empty((b, ch, a.lo, rows, cols), dtype=src.like.dtype, device=run.store)
    for r in split(rows, edge):
        for c in split(cols, edge):
            tail = _activate(op, _gather(src, axes, ((n_up - keep, n_up), r, c), run.device), mean_var)
            run.largest = max(run.largest, tail.numel())
            out[:, :, a.lo - keep:, r[0]:r[1], c[0]:c[1]] = tail
    if keep < a.lo:  # a short input: the frames before it (carried, or its first frame replicated)
        before = (prefix[:, :, prefix.shape[2] - (a.lo - keep):] if prefix is not None
                  else out[:, :, a.lo - keep:a.lo - keep + 1].expand(-1, -1, a.lo - keep, -1, -1))
        out[:, :, :a.lo - keep] = before.to(run.store)
    return out


@dataclass
class Carries:
    """What a chunk of a chunked schedule hands the next (newer ComfyUI's ``conv_carry``): per conv (an op index in
    :func:`run_program` with ``carry``; the conv module in a plain chunked network), the last input frames it reads
    before the next chunk's first. ``prev``: from the chunk before; ``next``: filled by this chunk (when ``keep``);
    ``first``: no chunk came before (convs replicate-pad, a temporal upsampler keeps frame 0 single)."""

    prev: dict[Any, torch.Tensor] = field(default_factory=dict)
    next: dict[Any, torch.Tensor] = field(default_factory=dict)
    keep: bool = True
    first: bool = True

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.prev, self.next) for t in d.values())

    def advance(self) -> None:
        self.prev, self.next, self.first = self.next, {}, False


@dataclass
class _Run:
    """What one call keeps: registers, their statistics, which op reads each register last, and figures for the
    report and the estimate."""

    device: torch.device
    store: torch.device
    last: dict[str, int]
    carry: Optional[Carries] = None
    regs: dict[str, Clip] = field(default_factory=dict)
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    index: int = 0
    store_peak: int = 0
    largest: int = 0
    pieces: int = 0
    kv: int = 0
    widest: int = 0

    def measure(self) -> None:
        held = sum(c.nbytes for c in self.regs.values()) + (self.carry.nbytes if self.carry is not None else 0)
        self.store_peak = max(self.store_peak, held)

    def release(self, name: Optional[str], frame: int) -> None:
        """The op running reads register ``name`` from ``frame`` on only: if it is the last reader, drop the rest."""
        if name is not None and self.last.get(name) == self.index:
            self.regs[name].free_before(frame)


def _edge(tile: Optional[int], scale: float, size: tuple[int, int]) -> int:
    """Piece edge (px at the op's output) for ``tile`` image px at ``scale`` image px per px: ``tile / √scale``
    (channels grow as resolution falls, so a piece's bytes stay about the same); whole frames untiled."""
    if tile is None:
        return max(size)
    return max(8, int(tile / math.sqrt(max(scale, 1.0))))


#: the statistics an op pools over its output: the accumulator and the norm's group count
Pool = Optional[tuple[StatsAccumulator, int]]

#: where an op writes: a register, or the call's output tensor
Sink = Union[Clip, torch.Tensor]


def _put(dst: Sink, t: tuple[int, int], r: tuple[int, int], c: tuple[int, int], y: torch.Tensor) -> None:
    if isinstance(dst, Clip):
        dst.write(t, r, c, y)
    else:
        dst[:, :, t[0]:t[1], r[0]:r[1], c[0]:c[1]] = y


def _sink(run: _Run, op: Op, out: Optional[torch.Tensor], final: bool, y: torch.Tensor,
          shape: list[int]) -> Sink:
    """Where ``op`` writes (allocated at its first piece ``y``): ``out``, a new output tensor, or a register."""
    full = (y.shape[0], y.shape[1], *shape)
    if final:
        return out if out is not None else y.new_empty(full, device=run.device)
    clip = run.regs[op.dst] = Clip(full, y, run.store)
    run.widest = max(run.widest, math.prod(full) * y.element_size())
    return clip


def _conv_op(op: ConvOp, run: _Run, out: Optional[torch.Tensor], final: bool, tile: Optional[int], image_w: int,
             step: Callable[[], None], pool: Pool) -> Sink:
    src = run.regs[op.src]
    n_in = src.shape[2:]
    shape = [a.out_len(n) for a, n in zip(op.axes, n_in)]
    edge = _edge(tile, image_w / shape[2], (shape[1], shape[2]))
    mean_var = run.stats.get(op.src) if op.norm is not None else None
    if op.norm is not None and mean_var is None:
        raise RuntimeError(f"no statistics for register {op.src}")
    prefix = None
    if run.carry is not None and op.axes[0].lo > 0:
        prefix = run.carry.prev.get(run.index)
        if run.carry.keep:  # before this op frees its input: the input's last frames, for the next chunk
            edge_in = _edge(tile, image_w / n_in[2], (n_in[1], n_in[2]))
            run.carry.next[run.index] = _carry_out(op, src, run, mean_var, prefix, edge_in)
    dst: Optional[Sink] = None
    for f in frame_groups(shape[0]):
        for r in split(shape[1], edge):
            for c in split(shape[2], edge):
                win = _window(op, src, (f, r, c), run.device, mean_var, prefix)
                y = op.conv(win)
                run.largest = max(run.largest, win.numel(), y.numel())
                del win
                if op.res is not None:
                    res = run.regs[op.res].window(f, r, c).to(run.device)
                    y = y.add_(res if op.res_conv is None else op.res_conv(res))
                if op.post is not None:
                    y = op.post(y)
                if op.side is not None:
                    name, conv = op.side
                    s = conv(src.window(f, r, c).to(run.device))
                    if name not in run.regs:
                        run.regs[name] = Clip((s.shape[0], s.shape[1], *shape), s, run.store)
                    run.regs[name].write(f, r, c, s)
                    del s
                if dst is None:
                    dst = _sink(run, op, out, final, y, shape)
                _put(dst, f, r, c, y)
                if pool is not None:
                    pool[0].add(y, pool[1])
                run.pieces += 1
                run.measure()
                step()
        if f[1] < shape[0]:  # the next frames read their inputs from here on
            run.release(op.src, op.axes[0].sources(f[1], f[1] + 1, n_in[0])[0])
            run.release(op.res, f[1])
        if prefix is not None and run.carry is not None and f[1] * op.axes[0].s >= op.axes[0].lo:
            run.carry.prev.pop(run.index, None)  # no later piece reads the carried frames
            prefix = None
    assert dst is not None
    return dst


def _attn_op(op: AttnOp, run: _Run, out: Optional[torch.Tensor], final: bool, step: Callable[[], None],
             pool: Pool) -> Sink:
    src, blk = run.regs[op.src], op.block
    b, c, t, h, w = src.shape
    whole = ((0, h), (0, w))
    mean, var = run.stats[op.src]

    def normed(f0: int, f1: int) -> torch.Tensor:
        return apply_norm(blk.norm, src.window((f0, f1), *whole).to(run.device), mean, var)

    def tokens(u: torch.Tensor) -> torch.Tensor:
        return u.reshape(b, c, -1).transpose(1, 2).contiguous()

    keys: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    for f0, f1 in frame_groups(t):
        hn = normed(f0, f1)
        k, v = tokens(blk.k(hn)), tokens(blk.v(hn))
        if keys is None or values is None:
            keys, values = k.new_empty((b, t * h * w, c)), v.new_empty((b, t * h * w, c))
        keys[:, f0 * h * w:f1 * h * w], values[:, f0 * h * w:f1 * h * w] = k, v
    assert keys is not None and values is not None
    run.kv = max(run.kv, 2 * keys.numel() * keys.element_size())  # on the compute device, whatever the store
    dst: Optional[Sink] = None
    # causal: one frame of queries at a time (each sees its own prefix); otherwise PIECE_FRAMES frames
    for f0, f1 in frame_groups(t, 1 if op.causal else PIECE_FRAMES):
        q = tokens(blk.q(normed(f0, f1)))
        a = op.attend(q, keys, values, t, op.causal, f0)
        y = blk.proj_out(a.transpose(1, 2).reshape(b, c, f1 - f0, h, w))
        y = y.add_(src.window((f0, f1), *whole).to(run.device))
        run.largest = max(run.largest, q.numel())
        if dst is None:
            dst = _sink(run, op, out, final, y, [t, h, w])
        _put(dst, (f0, f1), *whole, y)
        if pool is not None:
            pool[0].add(y, pool[1])
        run.measure()
        run.release(op.src, f1)
        step()
    assert dst is not None
    return dst


def _groups(program: Program, reg: str) -> int:
    for op in program.ops:
        if op.src == reg:
            norm = op.block.norm if isinstance(op, AttnOp) else op.norm
            return norm.num_groups  # type: ignore[union-attr]
    raise KeyError(reg)


def run_program(program: Program, x: torch.Tensor, tile: Optional[int], image_w: int, opts: TileOptions,
                out: Optional[torch.Tensor] = None, store: Optional[torch.device] = None,
                figures: Optional[dict[str, int]] = None, carry: Optional[Carries] = None,
                step: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """Run ``program`` on ``x [B, C, T, H, W]``: pieces of about ``tile`` image px (None: whole frames), frames in
    groups of :data:`PIECE_FRAMES`; ``image_w`` the image-side width (for the piece size at each resolution);
    registers on ``store`` (default: ``x``'s device); the output into ``out`` if given. ``figures`` (a dict)
    receives ``store_peak`` (bytes of the registers alive at once, at most), ``widest`` (bytes of the largest
    register), ``kv`` (bytes of the attention's keys and values, on the compute device), ``largest`` (elements of the
    largest piece tensor) and ``pieces``. ``carry``: the program is one chunk of a chunked schedule (its causal
    convs read the previous chunk's last frames from ``carry.prev`` and leave theirs in ``carry.next``; counted in
    ``store_peak``). ``step``: called after each piece instead of the call's own progress (a caller running several
    programs as one call).

    Progress counts pieces over all ops (``opts.progress``); ``opts.cancel`` is checked between them (Cancelled).
    """
    run = _Run(x.device, x.device if store is None else store, program.last_use(), carry)
    run.regs[program.input] = Clip.of(x)
    if step is None:
        step = stepper(opts, count_pieces(program, x, tile, image_w), "pieces")
    if program.input in program.norms:  # the first op normalises the input itself (a chunk of a chunked schedule)
        acc = StatsAccumulator()
        for f0, f1 in frame_groups(x.shape[2]):
            acc.add(x[:, :, f0:f1].to(run.device), _groups(program, program.input))
        run.stats[program.input] = acc.result()

    y: Optional[Sink] = None
    for i, op in enumerate(program.ops):
        run.index = i
        final = i == len(program.ops) - 1
        pool = (StatsAccumulator(), _groups(program, op.dst)) if op.dst in program.norms else None
        if isinstance(op, AttnOp):
            y = _attn_op(op, run, out if final else None, final, step, pool)
        else:
            y = _conv_op(op, run, out if final else None, final, tile, image_w, step, pool)
        if pool is not None:
            run.stats[op.dst] = pool[0].result()
        for r in [r for r, j in run.last.items() if j == i]:
            run.regs.pop(r, None)
            run.stats.pop(r, None)
    assert isinstance(y, torch.Tensor), "a program ends on its output"
    if figures is not None:
        figures.update(store_peak=run.store_peak, largest=run.largest, pieces=run.pieces, kv=run.kv,
                       widest=run.widest)
    if opts.report is not None:
        opts.report.schedule, opts.report.tiles, opts.report.sweeps = "clip-ops", run.pieces, 1
        opts.report.cache_peak = run.store_peak
    return y


def count_pieces(program: Program, x: torch.Tensor, tile: Optional[int], image_w: int) -> int:
    sizes = {program.input: tuple(x.shape[2:])}
    total = 0
    for op in program.ops:
        n = sizes[op.src]
        if isinstance(op, AttnOp):
            sizes[op.dst] = n
            total += len(frame_groups(n[0], 1 if op.causal else PIECE_FRAMES))
            continue
        shape = tuple(a.out_len(m) for a, m in zip(op.axes, n))
        sizes[op.dst] = shape
        edge = _edge(tile, image_w / shape[2], (shape[1], shape[2]))
        total += len(frame_groups(shape[0])) * len(split(shape[1], edge)) * len(split(shape[2], edge))
    return total


def activation_bytes(figures: dict[str, int], size: int) -> int:
    """What the compute device holds besides the registers, from a run's ``figures`` and the element size: the
    attention's keys and values and about three copies of the largest piece tensor (a window, its normalised copy,
    the conv's output; in fp16/bf16 two more in float32, as the norm computes)."""
    return figures["kv"] + (3 * size + (2 * 4 if size < 4 else 0)) * figures["largest"]


def plan_bytes(program: Program, x: torch.Tensor, tile: Optional[int], image_w: int) -> dict[str, int]:
    """Estimated bytes of :func:`run_program` on ``x`` (a ``meta`` tensor of the real shape and dtype, ``program``
    from a ``meta`` twin of the network): a dry run. ``stores``: the registers alive at once; ``widest``: the
    largest register; ``activations``: what the compute device holds besides them — the attention's keys and values
    and about three copies of the largest piece tensor (a window, its normalised copy, the conv's output; in fp16/bf16
    two more in float32, as the norm computes); ``output``; ``total``: stores and activations."""
    figures: dict[str, int] = {}
    y = run_program(program, x, tile, image_w, TileOptions(), figures=figures)
    size = x.element_size()
    act = activation_bytes(figures, size)
    return {"state": 0, "stores": figures["store_peak"], "widest": figures["widest"], "activations": act,
            "output": y.numel() * size, "total": figures["store_peak"] + act}
