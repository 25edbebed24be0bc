"""Memory: allocation-failure detection, free memory per device, activation estimates and the automatic tile."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import torch

from torch import nn

__all__ = ["MIN_TILE", "is_oom", "free_memory", "estimate_bytes", "auto_tile", "plan_call", "tile_bytes",
           "cpu_available"]

#: Smallest tile edge, in image pixels.
MIN_TILE = 64



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
    """Bytes free for new tensors on ``device``: CUDA ``mem_get_info`` plus PyTorch's cached blocks; CPU (and MPS,
    which shares it) :func:`cpu_available`, the tightest of the machine's and the process's limits."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return cpu_available()


#: What :func:`cpu_available` answers when no source can be read (no /proc, no sysconf): a cautious 8 GiB.
UNKNOWN_FREE_BYTES = 8 * 2**30


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def _meminfo_available(proc: Path) -> Optional[int]:
    text = _read(proc / "meminfo")
    for line in (text or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _cgroup_paths(proc: Path) -> tuple[Optional[str], Optional[str]]:
    """This process's cgroup v2 path and cgroup v1 memory-controller path, from ``/proc/self/cgroup``."""
    v2 = v1 = None
    for line in (_read(proc / "self" / "cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def _number(text: Optional[str]) -> Optional[int]:
    return int(text) if text is not None and text.isdigit() else None


def _inactive_file(folder: Path) -> int:
    """Reclaimable page cache of a cgroup (``inactive_file`` in its ``memory.stat``): counted used, freed on demand."""
    for line in (_read(folder / "memory.stat") or "").splitlines():
        key, _, value = line.partition(" ")
        if key in ("inactive_file", "total_inactive_file") and value.isdigit():
            return int(value)
    return 0


def _cgroup_available(proc: Path, cgroup_root: Path) -> Optional[int]:
    """Headroom under the tightest memory limit of this process's cgroup and its ancestors (v2 ``memory.max`` −
    ``memory.current``, v1 ``memory.limit_in_bytes`` − ``memory.usage_in_bytes``, reclaimable page cache counted
    free), or None without a limit."""
    v2, v1 = _cgroup_paths(proc)
    best: Optional[int] = None
    candidates: list[tuple[Path, str, str]] = []
    if v2 is not None:
        rel = Path(v2.lstrip("/"))
        for folder in [cgroup_root / rel, *[cgroup_root / p for p in rel.parents]]:
            candidates.append((folder, "memory.max", "memory.current"))
    if v1 is not None:
        rel = Path(v1.lstrip("/"))
        for folder in [cgroup_root / "memory" / rel, *[cgroup_root / "memory" / p for p in rel.parents]]:
            candidates.append((folder, "memory.limit_in_bytes", "memory.usage_in_bytes"))
    for folder, limit_file, usage_file in candidates:
        limit, usage = _number(_read(folder / limit_file)), _number(_read(folder / usage_file))
        if limit is None or usage is None or limit >= 2**60:  # "max", or v1's "unlimited" (a huge number)
            continue
        room = max(0, limit - usage + _inactive_file(folder))
        best = room if best is None else min(best, room)
    return best


def _rlimit_available(proc: Path) -> Optional[int]:
    """Headroom under the process's address-space and data limits (``RLIMIT_AS`` − VmSize, ``RLIMIT_DATA`` −
    VmData), or None without a limit."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    status = _read(proc / "self" / "status") or ""
    used = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status.splitlines()
            if line.startswith(("VmSize:", "VmData:")) and len(line.split()) >= 2 and line.split()[1].isdigit()}
    best: Optional[int] = None
    for limit_name, field in (("RLIMIT_AS", "VmSize"), ("RLIMIT_DATA", "VmData")):
        soft = resource.getrlimit(getattr(resource, limit_name))[0]
        if soft == resource.RLIM_INFINITY or soft < 0 or field not in used:
            continue
        room = max(0, soft - used[field])
        best = room if best is None else min(best, room)
    return best


def cpu_available(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Bytes a new allocation can take on the CPU: the smallest of the machine's ``MemAvailable``, the headroom under
    a container's cgroup memory limit (Docker, Kubernetes, Colab-like hosts: v2 and v1) and under the process's
    ``RLIMIT_AS``/``RLIMIT_DATA``. Reading ``MemAvailable`` alone overestimates it inside a container."""
    found = [v for v in (_meminfo_available(proc), _cgroup_available(proc, cgroup_root), _rlimit_available(proc))
             if v is not None]
    if not found:
        try:
            found = [int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))]
        except (ValueError, OSError, AttributeError):
            return UNKNOWN_FREE_BYTES
    return min(found)


def _elements_per_pixel(model: nn.Module) -> float:
    """Peak live activation elements per full-resolution pixel (about 4 tensors of the widest stage)."""
    cfg = model.config
    widths = [max(e, d) for e, d in zip(cfg.encoder_widths, cfg.decoder_widths)]
    return max(4 * max(widths[lvl], widths[min(lvl + 1, len(widths) - 1)]) / 4 ** lvl for lvl in range(len(widths)))


def estimate_bytes(model: nn.Module, pixels: int, dtype: torch.dtype) -> int:
    """Rough peak activation bytes of an untiled call over ``pixels`` output (decode) or input (encode) pixels."""
    size = torch.finfo(dtype).bits // 8
    return int(pixels * _elements_per_pixel(model) * size)


#: Safety factor on :func:`estimate_bytes` when deciding whether a call fits a budget.
ESTIMATE_MARGIN = 1.3
#: Largest automatic tile edge (image px): beyond it tiles gain nothing and their working set grows.
MAX_AUTO_TILE = 2048


def auto_tile(model: nn.Module, height: int, width: int, dtype: torch.dtype, device: torch.device,
              budget: Optional[int] = None) -> Optional[int]:
    """Pick a tile edge (image px) that fits ``budget`` (default: half the free memory), or None when the untiled
    call fits."""
    budget = budget if budget is not None else free_memory(device) // 2
    if estimate_bytes(model, height * width, dtype) * ESTIMATE_MARGIN < budget:
        return None
    per_px = estimate_bytes(model, 1, dtype) * ESTIMATE_MARGIN
    edge = int(math.sqrt(max(budget, 1) / per_px)) // 64 * 64
    return max(MIN_TILE, min(edge, MAX_AUTO_TILE))


def plan_call(model: nn.Module, height: int, width: int, batch: int, dtype: torch.dtype,
              usable: int) -> tuple[Optional[int], int]:
    """An automatic call planned for a host that frees device memory on request (ComfyUI's model management):
    untiled when its working set fits ``usable`` (the device's total memory less what must stay: the VAE's weights,
    reserves), else the largest tile that fits. Returns ``(tile or None, bytes to ask the host for)``: the working
    set of the call that will really run, so the host evicts other models only when that buys the untiled call."""
    need = estimate_bytes(model, height * width * batch, dtype)
    if need * ESTIMATE_MARGIN <= usable:
        return None, need
    tile = auto_tile(model, height * batch, width, dtype, torch.device("cpu"), budget=max(1, usable))
    tile = tile or MIN_TILE
    return tile, tile_bytes(model, tile, dtype)


def tile_bytes(model: nn.Module, tile: int, dtype: torch.dtype) -> int:
    """Working set of one ``tile``-px tile (with :data:`ESTIMATE_MARGIN`), for hosts that reserve memory."""
    return int(estimate_bytes(model, tile * tile, dtype) * ESTIMATE_MARGIN)
