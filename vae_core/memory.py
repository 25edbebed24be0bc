"""Memory: allocation-failure detection, free memory per device, activation estimates and the automatic tile."""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from .model import AutoencoderKL

__all__ = ["MIN_TILE", "is_oom", "free_memory", "estimate_bytes", "auto_tile", "parse_device"]

#: Smallest tile edge, in image pixels.
MIN_TILE = 64



def parse_device(value: "str | torch.device") -> torch.device:
    """A device the pack can run on: ``"cpu"``, ``"cuda"``, ``"cuda:1"``... (CUDA only when this torch has it).

    Raises:
        VaeInputError (a ValueError): not a device name, a CUDA device without CUDA, or a device type the pack does
            not run on (``meta``, ...).
    """
    from .errors import VaeInputError

    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise VaeInputError(f"--device {value!r}: not a device ({exc}); expected 'cpu' or 'cuda[:N]'") from exc
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index or 0) >= count:
            raise VaeInputError(f"--device {value!r}: this torch sees {count} CUDA device(s); expected 'cpu' or a "
                                "CUDA device that exists")
    elif dev.type != "cpu":
        raise VaeInputError(f"--device {value!r}: device type {dev.type!r}; expected 'cpu' or 'cuda[:N]'")
    return dev


def is_oom(exc: BaseException) -> bool:
    """True for CUDA/CPU allocation failures (``torch.cuda.OutOfMemoryError``, ``MemoryError``, allocator errors)."""
    if isinstance(exc, MemoryError):
        return True
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "failed to allocate" in text)


def free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device`` (CUDA ``mem_get_info`` + cached blocks; CPU ``MemAvailable``)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _elements_per_pixel(model: AutoencoderKL) -> float:
    """Peak live activation elements per full-resolution pixel (about 4 tensors of the widest stage)."""
    cfg = model.config
    widths = [max(e, d) for e, d in zip(cfg.encoder_widths, cfg.decoder_widths)]
    return max(4 * max(widths[lvl], widths[min(lvl + 1, len(widths) - 1)]) / 4 ** lvl for lvl in range(len(widths)))


def estimate_bytes(model: AutoencoderKL, pixels: int, dtype: torch.dtype) -> int:
    """Rough peak activation bytes of an untiled call over ``pixels`` output (decode) or input (encode) pixels."""
    size = torch.finfo(dtype).bits // 8
    return int(pixels * _elements_per_pixel(model) * size)


def auto_tile(model: AutoencoderKL, height: int, width: int, dtype: torch.dtype, device: torch.device,
              budget: Optional[int] = None) -> Optional[int]:
    """Pick a tile edge (image px) that fits half the free memory, or None when the untiled call fits."""
    budget = budget if budget is not None else free_memory(device) // 2
    if estimate_bytes(model, height * width, dtype) * 1.3 < budget:
        return None
    per_px = estimate_bytes(model, 1, dtype) * 1.3
    edge = int(math.sqrt(max(budget, 1) / per_px)) // 64 * 64
    return max(MIN_TILE, min(edge, 2048))
