"""HunyuanVideo 1.0's chunked schedule (newer ComfyUI, #10995) run exactly by the op engine, in memory that does not
grow with the clip.

The chunked network (:class:`~vae_core.families.hv10.model.HV10VAE` with ``config.chunked``) normalises each chunk on
its own — decode: 2 latent frames after a whole-clip ``conv_in`` and mid block; encode: frame 0, then 8 frames,
before a whole-clip mid block — and hands each causal conv's last input frames to the next chunk. So a call runs
the whole-clip part as one :class:`~vae_core.tiling.clip.Program` at latent resolution and each chunk as another
over the chunk alone, the chunk's registers freed before the next starts and the carried frames
(:class:`~vae_core.tiling.clip.Carries`) read where the chunk's convs reach before its first frame. The pieces,
statistics and FLOPs are as in :func:`~vae_core.tiling.clip.run_program` (every conv computes exactly its output).

Memory: one chunk's registers (at most 8 output frames per resolution), the carried frames (2 per causal conv
outside the whole-clip part) and the latent-resolution clip the whole-clip part reads or writes (about two thirds of
the decoded video's own size at 8× in space and 4× in time) — independent of the clip length but for that.

Shapes as in :mod:`vae_core.families.hv10.model`: videos ``[B, 3, 1 + 4k, H, W]``, raw latents ``[B, z, 1 + k, H/8,
W/8]``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...tiling.clip import Carries, count_pieces, run_program
from ...tiling.options import TileOptions, stepper
from .model import HV10VAE, decode_chunks, encode_chunks, program

__all__ = ["run_chunked", "SCHEDULE"]

#: how reports name the schedule
SCHEDULE = "clip-ops, chunked (ComfyUI's 2-latent-frame chunks)"


def _parts(model: HV10VAE, kind: str, x: torch.Tensor, moments: bool, sample: bool):  # type: ignore[no-untyped-def]
    """``(whole-clip program, [(chunk index, program, input frames, output frames)], chunk count)``; with ``sample`` only the
    first, second and last chunk (the others repeat the second: a dry run's figures)."""
    ft = model.config.temporal_scale
    if kind == "decode":
        spans = decode_chunks(x.shape[2])
        outs, f0 = [], 0
        for i, (t0, t1) in enumerate(spans):
            n = (1 + ft * (t1 - t0 - 1)) if i == 0 else ft * (t1 - t0)
            outs.append((f0, f0 + n))
            f0 += n
        whole = program(model, "decode", part="head")
    else:
        spans = encode_chunks(x.shape[2], ft)
        outs, l0 = [], 0
        for i, (f0, f1) in enumerate(spans):
            n = 1 if i == 0 else (f1 - f0) // ft
            outs.append((l0, l0 + n))
            l0 += n
        whole = program(model, "encode", moments, part="tail")
    keep = range(len(spans)) if not sample else sorted({0, min(1, len(spans) - 1), len(spans) - 1})
    chunks = [(i, program(model, kind, moments, part="chunk", first=i == 0), spans[i], outs[i]) for i in keep]
    return whole, chunks, len(spans)


def run_chunked(model: HV10VAE, kind: str, x: torch.Tensor, tile: Optional[int], image_w: int, opts: TileOptions,
                moments: bool = False, store: Optional[torch.device] = None,
                figures: Optional[dict[str, int]] = None, sample: bool = False) -> torch.Tensor:
    """A ``kind`` call of the chunked network on ``x`` (videos ``[B, 3, F, H, W]``, latents ``[B, z, T, h, w]``),
    equal to ``model.decode``/``encode_moments`` with ``config.chunked``: pieces of about ``tile`` image px (None:
    whole frames), registers on ``store``. ``figures`` (a dict) receives ``store_peak`` (registers and carried
    frames alive at once, on ``store``), ``latents`` (bytes of the latent-resolution clip between the parts, on the
    compute device), ``widest``, ``kv``, ``largest`` and ``pieces`` as :func:`~vae_core.tiling.clip.run_program`
    gives them; ``sample``: a dry run on ``meta`` tensors of the first, second and last chunk only (the figures of
    the whole call, not its output)."""
    whole, chunks, n_spans = _parts(model, kind, x, moments, sample)
    cfg, b = model.config, x.shape[0]
    if kind == "decode":
        n_whole = count_pieces(whole, x, tile, image_w)
        mid_shape = (b, cfg.block_out_channels[-1], *x.shape[2:])
    else:
        f = cfg.downscale
        mid_shape = (b, cfg.block_out_channels[-1], 1 + (x.shape[2] - 1) // cfg.temporal_scale,
                     x.shape[3] // f, x.shape[4] // f)
        n_whole = count_pieces(whole, x.new_empty(mid_shape, device="meta"), tile, image_w)
    total = n_whole + sum(count_pieces(p, x[:, :, s[0]:s[1]], tile, image_w) for _, p, s, _ in chunks)
    step = stepper(opts, total, "pieces")
    figs: dict[str, int] = {"store_peak": 0, "largest": 0, "pieces": 0, "kv": 0, "widest": 0}

    def merge(part: dict[str, int]) -> None:
        figs["store_peak"] = max(figs["store_peak"], part["store_peak"])
        figs["pieces"] += part["pieces"]
        for k in ("largest", "kv", "widest"):
            figs[k] = max(figs[k], part[k])

    part: dict[str, int] = {}
    if kind == "decode":
        mid = run_program(whole, x, tile, image_w, opts, store=store, figures=part, step=step)
        merge(part)
        out: Optional[torch.Tensor] = None
    else:
        mid = x.new_empty(mid_shape)
    held = mid.numel() * mid.element_size()
    carry = Carries()
    for i, prog, (s0, s1), (o0, o1) in chunks:
        carry.keep = i < n_spans - 1
        src = mid[:, :, s0:s1] if kind == "decode" else x[:, :, s0:s1]
        dst = mid[:, :, o0:o1] if kind == "encode" else (out[:, :, o0:o1] if out is not None else None)
        part = {}
        y = run_program(prog, src, tile, image_w, opts, out=dst, store=store, figures=part, carry=carry, step=step)
        if kind == "decode" and out is None:  # the first chunk's output tells the dtype, channels and size
            frames = 1 + cfg.temporal_scale * (x.shape[2] - 1)
            out = y.new_empty((b, y.shape[1], frames, *y.shape[3:]))
            out[:, :, o0:o1] = y
        merge(part)
        carry.advance()
    if kind == "encode":
        part = {}
        out = run_program(whole, mid, tile, image_w, opts, store=store, figures=part, step=step)
        merge(part)
    assert out is not None
    figs["latents"] = held
    if figures is not None:
        figures.update(figs)
    if opts.report is not None:
        opts.report.schedule, opts.report.tiles, opts.report.sweeps = SCHEDULE, figs["pieces"], 1
        opts.report.cache_peak = figs["store_peak"]
    return out
