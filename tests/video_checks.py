"""Checks the video families share: per-frame errors, a causal state that forgets its convs' frames at every
chunk (the negative control), the memory bound of streamed video tiling, measured (peak RSS of one call in a
fresh subprocess, one thread, glibc's mmap threshold fixed so RSS follows the live tensors, and the family's estimate
for the same call); the fp16 fix on a VAE whose stream was blown up."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

import vae_core
from vae_core.tiling.stream import CausalState


def per_frame_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Largest |a − b| per frame of two videos ``[B, C, T, H, W]`` (float64)."""
    return (a.double() - b.double()).abs().amax(dim=(0, 1, 3, 4))


def check_tiled_vs_float64(vae: "vae_core.Vae", model64: torch.nn.Module, kind: str, t: torch.Tensor,
                           schedule: str, cache_bytes: object, frames: int) -> None:
    """Tiled ``kind`` ("encode"/"decode") of ``t`` in ``schedule`` is, frame by frame, no further from the float64
    run of ``model64`` than the untiled float32 call (twice its error at most), with real tiles."""
    from vae_core.tiling import TileReport

    with torch.no_grad():
        exact = getattr(model64, kind)(t.double())
        untiled = getattr(vae, kind)(t)
        report = TileReport()
        tiled = getattr(vae, kind)(t, tile=64, report=report, cache_bytes=cache_bytes)
    assert report.schedule == schedule and report.tiles >= 4
    e_un, e_tiled = per_frame_error(untiled, exact), per_frame_error(tiled, exact)
    assert e_tiled.numel() == frames
    assert bool((e_tiled <= 2 * e_un + 1e-6).all()), (e_tiled, e_un)


def reset_every_chunk(conv_type: type) -> type:
    """A causal state whose ``conv_type`` caches are dropped at every chunk: each chunk restarts as if it were the
    first (the tilers that restart causality per temporal tile do this)."""

    class ResetEveryChunk(CausalState):
        @property
        def chunk(self) -> int:
            return self._chunk

        @chunk.setter
        def chunk(self, value: int) -> None:
            self._chunk = value
            self.cache = {k: v for k, v in getattr(self, "cache", {}).items() if not isinstance(k, conv_type)}

    return ResetEveryChunk

_WORKER = r"""
import ctypes, json, sys
import torch
from vae_core.families.registry import by_name
from vae_core.lab.bench import peak_rss, proc_status_bytes, reset_peak_rss
from vae_core.tiling import TileOptions
from vae_core.tiling.stream import run_segments

TILE = 128
spec, kind, frames, side, impl, schedule = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
    sys.argv[5], sys.argv[6]
torch.set_num_threads(1)
torch.manual_seed(0)
family = by_name(spec["family"])
if "release" in spec:  # LTX: a released block sequence, narrowed
    from vae_core.families.ltx.model import release_config
    cfg = release_config(**spec["release"])
else:
    cfg = family.config_type(**spec["config"])
model = family.build(cfg).eval().requires_grad_(False)
f, ft = cfg.downscale, cfg.temporal_scale
lat = (1, cfg.latent_channels, 1 + (frames - 1) // ft, side // f, side // f)
if kind == "decode":
    t = torch.randn(lat)
    out = torch.zeros(1, 3, frames, side, side)  # the caller's tensor: touched before the measurement
else:
    t = torch.rand(1, 3, frames, side, side) * 2 - 1
    out = torch.zeros(lat)
ctypes.CDLL("libc.so.6").malloc_trim(0)
assert reset_peak_rss()
base = proc_status_bytes("VmRSS")
with torch.no_grad():
    if impl == "tiled":
        run_segments(family.video_plan_for(model, kind, t, False), t, TILE, TileOptions(), out=out, schedule=schedule)
    elif kind == "decode":
        model.decode(t, out=out)
    else:
        out.copy_(model.encode(t))
ws = family.video_working_set(model, kind, frames, side, side, TILE if impl == "tiled" else None, schedule=schedule)
print(json.dumps({"peak": peak_rss() - base, "estimate": ws["total"]}))
"""


def peak_in_subprocess(spec: dict, kind: str, frames: int, side: int, impl: str, schedule: str = "tile") -> dict:
    """``{"peak": bytes, "estimate": bytes}`` of one ``kind`` call (``impl`` ``"tiled"``, 128-px tiles in
    ``schedule``, or ``"untiled"``) on ``frames`` frames of ``side``² px, for the network ``spec`` gives
    (``{"family": registry name, "config": config fields}``, or for LTX ``"release"``: :func:`release_config`'s
    arguments)."""
    # a fixed mmap threshold: glibc otherwise raises it after the first large free and keeps freed tensors in its
    # heap, so RSS would measure its retention policy (±50 % run to run) rather than the live tensors
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    done = subprocess.run([sys.executable, "-c", _WORKER, json.dumps(spec), kind, str(frames), str(side), impl,
                           schedule], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_fp16_fix(plain: "vae_core.Vae", big: "vae_core.Vae", x: torch.Tensor) -> "vae_core.Vae":
    """``big`` is ``plain`` with its stream scaled ×2¹⁶ (the same function in fp32): it overflows fp16 (the guard
    re-runs it in fp32); the fix brings it into range (peaks ≤ 1024) with the fp32 outputs kept, and then runs in
    fp16 without the guard's help. Returns the fixed VAE (fp32)."""
    with torch.no_grad():
        z = plain.encode(x)
        y = plain.decode(z)
    assert (big.encode(x) - z).abs().max() < 1e-3 and (big.decode(z) - y).abs().max() < 1e-3
    fixed = vae_core.make_fp16_safe(big)
    assert fixed.info.fp16_fix["peak_before"] > 65504 >= 1024 >= fixed.info.fp16_fix["peak_after"]
    assert (fixed.decode(z) - y).abs().max() < 1e-3 and (fixed.encode(x) - z).abs().max() < 1e-3
    unfixed = big.clone().to(torch.float16)
    assert torch.isfinite(unfixed.decode(z)).all() and unfixed.guard.working_dtype == torch.float32  # overflowed
    half = fixed.to(torch.float16)
    y16 = half.decode(z)
    assert half.guard.working_dtype is None and (y16 - y).abs().max() < 0.05
    return fixed
