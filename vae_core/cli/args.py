"""argparse types shared by the CLI's commands: ``--tile``, ``--device``, ``--cache-bytes``."""
from __future__ import annotations

import argparse
from typing import Any

from ..devices import parse_device
from ..errors import VaeInputError

__all__ = ["tile_arg", "device_arg", "cache_arg"]


def tile_arg(value: str) -> object:
    """``--tile``: ``none`` → untiled (None); ``auto`` or ``0`` → ``"auto"`` (as in the hosts); else px ≥ 64."""
    if value.lower() == "none":
        return None
    if value.lower() == "auto" or value == "0":
        return "auto"
    try:
        px = int(value)
    except ValueError:
        px = -1
    if px < 64:
        raise argparse.ArgumentTypeError(f"{value!r}: not a tile size; expected an integer ≥ 64 (image px), "
                                         "0 or 'auto' (automatic), or 'none' (untiled)")
    return px


def device_arg(value: str) -> str:
    """argparse type of ``--device``: a device that exists here (:func:`vae_core.devices.parse_device`)."""
    try:
        return str(parse_device(value))
    except VaeInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def cache_arg(value: str) -> Any:
    """argparse type of ``--cache-bytes``: ``auto`` or an int ≥ 0."""
    if value == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"--cache-bytes {value!r}: expected 'auto' or an int ≥ 0 (bytes)")
    return n
