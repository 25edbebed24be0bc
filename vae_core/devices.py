"""What each device can do, decided in one place: float64 support (for the exact GroupNorm statistics), native bf16
(for ``"auto"`` precision and the NaN guard's retry), and which device names the pack runs on.

* **float64**: CPU and CUDA have it. Apple's MPS and DirectML (``privateuseone``) have none; Intel XPUs report it per
  device (``has_fp64``). Where it is missing, the tiling engine accumulates its statistics in compensated float32 on
  the device instead (:mod:`vae_core.tiling.stats`).
* **bf16**: native only on NVIDIA GPUs of compute capability 8.0 or newer (Ampere, Ada, Hopper, Blackwell) and AMD
  GPUs with bf16 matrix units (CDNA2 ``gfx90a`` and later, RDNA3 ``gfx11``, RDNA4 ``gfx12``), judged for the device
  given, not the current one. ``torch.cuda.is_bf16_supported()`` counts *emulated* bf16 (slow on T4/V100/Turing)
  and looks at the current device, so it is not used.
"""
from __future__ import annotations

from typing import Union

import torch

from .errors import VaeInputError

__all__ = ["has_float64", "bf16_native", "parse_device", "check_available", "DEVICE_TYPES"]

#: Device types without float64 arithmetic.
NO_FLOAT64 = frozenset({"mps", "privateuseone"})
#: AMD architectures (``gcnArchName`` prefixes) with native bf16 matrix instructions.
AMD_BF16_ARCHS = ("gfx90a", "gfx94", "gfx95", "gfx11", "gfx12")
#: NVIDIA compute capability from which bf16 is native.
NVIDIA_BF16_CAPABILITY = (8, 0)
#: Device types the pack runs on (each checked for availability by :func:`parse_device`).
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def has_float64(device: Union[str, torch.device]) -> bool:
    """Whether ``device`` computes in float64 (CPU, CUDA, XPUs that report ``has_fp64``; not MPS or DirectML)."""
    dev = torch.device(device)
    if dev.type in NO_FLOAT64:
        return False
    if dev.type == "xpu":
        try:
            return bool(torch.xpu.get_device_properties(dev).has_fp64)
        except (AttributeError, RuntimeError, AssertionError):
            return False
    return True


def bf16_native(device: Union[str, torch.device]) -> bool:
    """Whether ``device`` runs bf16 natively (see the module docstring); False on CPU, MPS and anything unknown."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return False
    try:
        if not torch.cuda.is_available():
            return False
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if getattr(torch.version, "hip", None):
            arch = str(getattr(torch.cuda.get_device_properties(index), "gcnArchName", ""))
            return arch.startswith(AMD_BF16_ARCHS)
        return tuple(torch.cuda.get_device_capability(index)) >= NVIDIA_BF16_CAPABILITY
    except (RuntimeError, AssertionError, AttributeError, ValueError):
        return False


def _available(kind: str) -> int:
    """How many devices of ``kind`` this torch can use (0 when its backend is missing or not built)."""
    try:
        if kind == "cuda":
            return torch.cuda.device_count() if torch.cuda.is_available() else 0
        if kind == "mps":
            return 1 if torch.backends.mps.is_available() else 0
        if kind == "xpu":
            return torch.xpu.device_count() if hasattr(torch, "xpu") and torch.xpu.is_available() else 0
    except (RuntimeError, AssertionError, AttributeError):
        return 0
    return 1 if kind == "cpu" else 0


def check_available(dev: torch.device, what: str = "device") -> torch.device:
    """``dev`` itself when this torch can use it; devices of kinds the pack cannot check (DirectML's
    ``privateuseone``, ...) are passed through for torch to judge.

    Raises:
        VaeInputError (a ValueError): a CUDA, MPS or XPU device this torch does not have (torch itself answers a CUDA
            device on a CPU-only build with a bare AssertionError), naming it and what this torch sees.
    """
    if dev.type in ("cuda", "mps", "xpu"):
        count = _available(dev.type)
        if count == 0 or (dev.index or 0) >= count:
            raise VaeInputError(f"{what} {str(dev)!r}: this torch ({torch.__version__}) sees {count} {dev.type} "
                                "device(s); expected 'cpu' or a device that exists")
    return dev


def parse_device(value: Union[str, torch.device, int], what: str = "--device") -> torch.device:
    """A device the pack can run on: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"xpu"`` (each only when this
    torch has it), or an int (a CUDA index).

    Raises:
        VaeInputError (a ValueError): not a device name, a device this torch does not have (e.g. ``"cuda"`` with a
            CPU-only torch, which torch itself answers with a bare AssertionError), or a device type the pack does not
            run on (``meta``, ...).
    """
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise VaeInputError(f"{what} {value!r}: not a device ({exc}); expected one of {', '.join(DEVICE_TYPES)} "
                            "(with an index, e.g. 'cuda:1')") from exc
    if dev.type not in DEVICE_TYPES:
        raise VaeInputError(f"{what} {value!r}: device type {dev.type!r}; expected one of {', '.join(DEVICE_TYPES)}")
    return check_available(dev, what)
