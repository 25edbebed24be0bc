"""Where a tiled call keeps each tile's state between GroupNorm sweeps, within an explicit byte budget.

A tile's *checkpoint* is the state (``x``, and ``h`` inside a resnet block) it reached just before a GroupNorm whose
statistics the whole image must supply first. Keeping it lets the tile resume there on the next sweep; without it
the tile recomputes from its last kept checkpoint (at worst from the stage input), which is exact but slower.

Tiers: on CUDA the device tier fills first, then pinned host memory (copies are ``non_blocking`` and ordered on the
current stream); on CPU there is one tier. PyTorch's caching host allocator keeps freed pinned blocks for reuse,
outside any host's memory accounting, so :meth:`CheckpointStore.close` (called when the tiled call ends, failed or
not) hands its cached pinned blocks back (:func:`release_pinned_cache`). ``cache_bytes`` (an int, in bytes) bounds the total; ``"auto"`` (or
None) takes a share of free memory: 40 % of ``MemAvailable`` on CPU; on CUDA a quarter of free device memory plus
40 % of free host memory.
"""
from __future__ import annotations

import logging
from typing import Optional, Union

import torch

from ..errors import VaeInputError
from .memory import free_memory

__all__ = ["CacheArg", "resolve_budget", "CheckpointStore", "nbytes", "release_pinned_cache"]

log = logging.getLogger(__name__)

CacheArg = Union[None, int, str]

#: Shares of free memory that ``cache_bytes="auto"`` takes.
AUTO_HOST_SHARE = 0.4
AUTO_DEVICE_SHARE = 0.25


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def resolve_budget(cache_bytes: CacheArg, device: torch.device) -> tuple[int, int]:
    """``cache_bytes`` → ``(device_tier_bytes, host_tier_bytes)``.

    Raises:
        VaeInputError: anything but None, ``"auto"`` or an int ≥ 0.
    """
    if cache_bytes is None or cache_bytes == "auto":
        if device.type == "cuda":
            return (int(free_memory(device) * AUTO_DEVICE_SHARE),
                    int(free_memory(torch.device("cpu")) * AUTO_HOST_SHARE))
        if device.type == "meta":
            return 0, 0
        return int(free_memory(device) * AUTO_HOST_SHARE), 0
    if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
        raise VaeInputError(f"cache_bytes={cache_bytes!r}: expected 'auto' or an int ≥ 0 (bytes)")
    if device.type == "cuda":
        dev = min(cache_bytes, int(free_memory(device) * AUTO_DEVICE_SHARE))
        return dev, cache_bytes - dev
    return cache_bytes, 0


def release_pinned_cache() -> bool:
    """Return PyTorch's cached (unused) pinned host blocks to the system; blocks in use stay. False where this torch
    has no way to (then nothing happens)."""
    accelerator = getattr(torch, "accelerator", None)
    fn = getattr(accelerator, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if fn is None:
        return False
    fn()
    return True


def _pinned_like(t: torch.Tensor) -> torch.Tensor:
    """A pinned host tensor of ``t``'s shape and dtype, filled from ``t`` (asynchronously, on the current stream)."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if it owns its storage, else a compact copy (a view would keep a larger tensor alive)."""
    if t.device.type != "meta" and t.untyped_storage().nbytes() > t.numel() * t.element_size():
        return t.clone()
    return t


class CheckpointStore:
    """Per-tile checkpoints ``(segment index, state)`` within the device and host budgets."""

    def __init__(self, device: torch.device, device_budget: int, host_budget: int = 0) -> None:
        self.device = device
        self.budget = {"device": device_budget, "host": host_budget if device.type == "cuda" else 0}
        self.used = {"device": 0, "host": 0}
        self.peak = 0
        self.pinned_peak = 0
        self.entries: dict[int, tuple[int, dict[str, torch.Tensor], str]] = {}

    @property
    def total_budget(self) -> int:
        return self.budget["device"] + self.budget["host"]

    def reserve(self, size: int) -> bool:
        """Take ``size`` bytes of the device tier for something else (e.g. an assembled stage output)."""
        if self.used["device"] + size > self.budget["device"]:
            return False
        self.used["device"] += size
        self._note_peak()
        return True

    def release(self, size: int) -> None:
        """Give back ``size`` bytes taken with a successful :meth:`reserve`."""
        self.used["device"] = max(0, self.used["device"] - size)

    def _note_peak(self) -> None:
        self.peak = max(self.peak, self.used["device"] + self.used["host"])

    def free(self) -> int:
        """Bytes not yet used, counting the space held by current checkpoints as free (they are replaced)."""
        held = sum(self._size(e[1], e[2]) for e in self.entries.values())
        return self.total_budget - self.used["device"] - self.used["host"] + held

    def get(self, tile: int) -> Optional[tuple[int, dict[str, torch.Tensor]]]:
        hit = self.entries.get(tile)
        if hit is None:
            return None
        k, state, tier = hit
        if tier == "host":
            state = {r: t.to(self.device, non_blocking=True) for r, t in state.items()}
        return k, state

    @staticmethod
    def _size(state: dict[str, torch.Tensor], tier: str) -> int:
        """Bytes a state costs in ``tier``: pinned host blocks are cached by PyTorch in power-of-two sizes."""
        if tier == "host":
            return sum(1 << max(0, (t.numel() * t.element_size() - 1).bit_length()) for t in state.values())
        return nbytes(state)

    def drop(self, tile: int) -> None:
        old = self.entries.pop(tile, None)
        if old is not None:
            self.used[old[2]] -= self._size(old[1], old[2])

    def put(self, tile: int, k: int, state: dict[str, torch.Tensor]) -> bool:
        """Keep ``state`` as ``tile``'s checkpoint at segment ``k`` if the budget allows (replacing the old one);
        returns whether it was kept. A state that does not fit leaves the old checkpoint in place."""
        old = self.entries.get(tile)
        freed = {"device": 0, "host": 0}
        if old is not None:
            freed[old[2]] = self._size(old[1], old[2])
        for tier in ("device", "host"):
            size = self._size(state, tier)
            if self.used[tier] - freed[tier] + size <= self.budget[tier]:
                self.drop(tile)
                if tier == "host":
                    kept = {r: _pinned_like(t) for r, t in state.items()}
                else:
                    kept = {r: _own(t) for r, t in state.items()}
                self.entries[tile] = (k, kept, tier)
                self.used[tier] += size
                self._note_peak()
                self.pinned_peak = max(self.pinned_peak, self.used["host"])
                return True
        return False

    def clear(self) -> None:
        self.entries.clear()
        self.used = {"device": 0, "host": 0}

    def close(self) -> None:
        """End of the call: drop every checkpoint and, if any went to pinned host memory, hand PyTorch's cached
        pinned blocks back (they would otherwise outlive the call, unaccounted for by the host)."""
        self.clear()
        if self.pinned_peak:
            release_pinned_cache()
