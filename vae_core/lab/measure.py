"""The VAE lab's measurements: a call's wall time and peak memory, and the round trip that reports the dtypes the
NaN guard really used (shared by ``python -m vae_core eval`` and ComfyUI's VAE Compare).

Memory: on CUDA ``max_memory_allocated`` above the allocation before the call; on CPU the rise of the process's
peak RSS (``VmHWM``) during the call, after returning freed memory to the OS (``malloc_trim``), so it is the call's
working set, not the models held (approximate: the allocator may reuse memory it kept).
"""
from __future__ import annotations

import ctypes
import time
from typing import Any, Callable, Optional

import torch

from ..tiling.options import TileReport
from ..vae import Vae

__all__ = ["measured", "roundtrip", "dtype_name"]

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` → ``"fp16"`` (``fp32``, ``bf16``; other dtypes by their torch name)."""
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measured(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, Optional[int]]:
    """``fn()`` with its wall time (CUDA synchronised) and peak memory above the start (see the module docstring);
    peak None where it cannot be read (CPU without ``/proc``)."""
    from .bench import peak_rss, proc_status_bytes, reset_peak_rss

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base: Optional[int] = torch.cuda.memory_allocated(device)
    else:
        _trim()
        base = proc_status_bytes("VmRSS") if reset_peak_rss() else None
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak: Optional[int] = torch.cuda.max_memory_allocated(device) - (base or 0)
    else:
        peak = max(0, peak_rss() - base) if base else None
    return out, seconds, peak


def roundtrip(vae: Vae, x: torch.Tensor, tile: Optional[int], mode: str = "exact", cache_bytes: Any = "auto",
              report: Optional[TileReport] = None) -> tuple[torch.Tensor, str]:
    """Encode then decode ``x`` (``[B, 3, H, W]`` in [-1, 1]) → (images ``[B, 3, H, W]`` float32 about [-1, 1],
    the dtypes the NaN guard really used, e.g. ``"fp16"`` or ``"fp16 encode, fp32 decode"``).

    Each call is tried in the VAE's own dtype: the guard's remembered fallback is set aside for the call and put
    back afterwards, and after a fallback (or a failure) the VAE is cast back to its dtype, from the weights as
    loaded (the guard keeps them before a rounding retry such as fp16 → bf16: :class:`~vae_core.precision.guard.GuardState`),
    so the next call sees exactly the same weights.

    A clip ``[B, 3, F, H, W]`` goes through a video VAE whole and through an image VAE frame by frame (what it ran
    as: each distinct value, joined)."""
    if x.dim() == 5 and not vae.family.video:
        runs = [roundtrip(vae, x[:, :, i], tile, mode, cache_bytes, report) for i in range(x.shape[2])]
        return torch.stack([y for y, _ in runs], 2), "; ".join(dict.fromkeys(ran for _, ran in runs))
    dtype, remembered = vae.dtype, vae.guard.working_dtype
    used = []
    kw = dict(tile=tile, mode=mode, cache_bytes=cache_bytes, report=report)
    out = x

    def restore() -> None:
        if vae.dtype != dtype:  # the guard re-ran a call in a wider dtype
            vae.guard.cast(vae.model, dtype)

    try:
        for op in ("encode", "decode"):
            vae.guard.working_dtype = None
            out = getattr(vae, op)(out, **kw)
            used.append(vae.guard.working_dtype or dtype)
            restore()
    finally:
        restore()
        vae.guard.working_dtype = remembered
    names = [dtype_name(d) for d in used]
    return out, names[0] if names[0] == names[1] else f"{names[0]} encode, {names[1]} decode"


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)`` by ``time.perf_counter`` (a host's own round trip, for VAE Compare's fallback)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def timed_roundtrip(vae: Vae, x: torch.Tensor, tile: Optional[int], mode: str = "exact",
                    precision: str = "as loaded", tile_label: Optional[int] = None) -> tuple[torch.Tensor, float, str]:
    """:func:`roundtrip` of ``x`` timed, in ``precision`` (``"as loaded"`` or a dtype name: run on a temporary copy
    in that dtype). Returns ``(images, seconds of the encode + decode alone, how it ran)``; ``tile_label``: the tile
    the user asked for, shown in "how" (default ``tile``; 0/None: untiled)."""
    if precision != "as loaded":
        vae = vae.clone().to(dtype=precision)
    (y, ran), seconds = timed(lambda: roundtrip(vae, x, tile, mode))
    shown = tile if tile_label is None else tile_label
    how = f"vae_core engine, {vae.info.family}, {ran}, " + (f"tile {shown} {mode}" if shown else "untiled")
    return y, seconds, how
