"""argparse types shared by the CLI's commands: ``--tile``, ``--device``, ``--cache-bytes``, ``--size``."""
from __future__ import annotations

import argparse
import json
from typing import Any

from ..devices import parse_device
from ..errors import VaeInputError

__all__ = ["tile_arg", "device_arg", "cache_arg", "size_arg", "setting_arg", "settings_of"]


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


def size_arg(value: str) -> tuple[int, int]:
    """argparse type of ``bench --size``: ``N`` (a square) or ``WxH``, each side 8..65536 px → ``(W, H)``."""
    parts = value.lower().split("x")
    try:
        w, h = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except ValueError:
        w = h = -1
    if len(parts) > 2 or not (8 <= w <= 65536 and 8 <= h <= 65536):
        raise argparse.ArgumentTypeError(f"--size {value!r}: expected N or WxH with sides of 8..65536 px "
                                         "(e.g. 512 or 1280x720)")
    return w, h


def setting_arg(value: str) -> tuple[str, Any]:
    """argparse type of ``--set KEY=VALUE`` (a load setting, :func:`vae_core.load_vae`'s ``settings``): VALUE as JSON
    (``true``, ``false``, ``32``), else as a string."""
    key, sep, raw = value.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--set {value!r}: expected KEY=VALUE (e.g. chunked=true)")
    try:
        parsed: Any = json.loads(raw)
    except ValueError:
        parsed = raw
    return key.strip(), parsed


def settings_of(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """The ``--set`` pairs as a dict; a key given twice is refused (not the last one silently kept)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise VaeInputError(f"--set {key}: given twice ({out[key]!r}, {value!r}); expected each setting once")
        out[key] = value
    return out
