"""Model families and their latent scaling, with the source each value came from.

SD1/2 and SDXL VAEs have identical shapes (4 channels, quant convs); SD3 and Flux likewise (16 channels, none).
Scaling therefore comes, in order of priority, from: an explicit argument, a diffusers ``config.json``,
safetensors metadata, the other keys of a full checkpoint (SDXL's ``conditioner.``, SD3's ``joint_blocks``,
Flux's ``double_blocks``), a hint in the file name, and last a per-channel-count default. ``VaeInfo.sources``
records which one was used.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

__all__ = ["FAMILIES", "Family", "resolve_family"]


@dataclass(frozen=True)
class Family:
    name: str
    latent_channels: int
    scaling_factor: float
    shift_factor: Optional[float]
    label: str


FAMILIES: dict[str, Family] = {
    "sd1": Family("sd1", 4, 0.18215, None, "Stable Diffusion 1.x/2.x"),
    "sdxl": Family("sdxl", 4, 0.13025, None, "Stable Diffusion XL"),
    "sd3": Family("sd3", 16, 1.5305, 0.0609, "Stable Diffusion 3"),
    "flux": Family("flux", 16, 0.3611, 0.1159, "Flux"),
}
_DEFAULT = {4: "sd1", 16: "flux"}


def _by_value(scale: float, channels: int) -> str:
    for fam in FAMILIES.values():
        if fam.latent_channels == channels and abs(fam.scaling_factor - scale) < 1e-6:
            return fam.name
    return "custom"


def _from_keys(keys: Iterable[str]) -> Optional[str]:
    for k in keys:
        if k.startswith("conditioner.embedders.1"):
            return "sdxl"
        if ".joint_blocks." in k:
            return "sd3"
        if ".double_blocks." in k:
            return "flux"
    return None


def _from_name(path: Optional[Path], channels: int) -> Optional[str]:
    if path is None:
        return None
    tokens = set(re.split(r"[^a-z0-9]+", " ".join(p.lower() for p in path.parts[-2:])))
    if channels == 4 and (tokens & {"sdxl", "xl"} or any(t.startswith("sdxl") for t in tokens)):
        return "sdxl"
    if channels == 16 and (tokens & {"flux", "ae"} or any(t.startswith("flux") for t in tokens)):
        return "flux"
    if channels == 16 and any(t.startswith("sd3") for t in tokens):
        return "sd3"
    return None


def _float(value: object) -> Optional[float]:
    try:
        return None if value is None or value == "" else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def resolve_family(latent_channels: int, *, family: Optional[str] = None, scaling_factor: Optional[float] = None,
                   shift_factor: Optional[float] = None, config: Optional[Mapping] = None,
                   metadata: Optional[Mapping[str, str]] = None, checkpoint_keys: Iterable[str] = (),
                   path: Optional[Path] = None) -> tuple[str, float, Optional[float], dict[str, str]]:
    """Decide family, scaling and shift factors.

    Returns:
        ``(family, scaling_factor, shift_factor, sources)`` where ``sources`` maps ``"family"``,
        ``"scaling_factor"`` and ``"shift_factor"`` to a short description of where each came from.
    Raises:
        ValueError: ``family`` names no known family, or belongs to another channel count.
    """
    if family is not None:
        if family not in FAMILIES:
            raise ValueError(f"family={family!r}: unknown; expected one of {sorted(FAMILIES)}")
        if FAMILIES[family].latent_channels != latent_channels:
            raise ValueError(f"family={family!r} has {FAMILIES[family].latent_channels} latent channels, but this "
                             f"VAE has {latent_channels}")
    name, src = family, "argument"
    scale = shift = None
    s_src = h_src = ""
    if scaling_factor is not None:
        scale, s_src = float(scaling_factor), "argument"
    if shift_factor is not None:
        shift, h_src = float(shift_factor), "argument"
    for label, table in (("config.json", config or {}), ("safetensors metadata", metadata or {})):
        c_scale = _float(table.get("scaling_factor"))
        if scale is None and c_scale is not None:
            scale, s_src = c_scale, label
            if shift is None and "shift_factor" in table:
                shift, h_src = _float(table.get("shift_factor")), label
        if name is None and table.get("family") in FAMILIES:
            name, src = str(table["family"]), label
        arch = str(table.get("modelspec.architecture", "")).lower()
        if name is None and arch:
            guess = "sdxl" if "xl" in arch else "sd3" if "sd3" in arch else "flux" if "flux" in arch else None
            if guess and FAMILIES[guess].latent_channels == latent_channels:
                name, src = guess, f"{label} (modelspec.architecture)"
    if name is None and scale is not None:
        name, src = _by_value(scale, latent_channels), f"scaling factor from {s_src}"
    if name is None:
        guess = _from_keys(checkpoint_keys)
        if guess and FAMILIES[guess].latent_channels == latent_channels:
            name, src = guess, "other keys of the full checkpoint"
    if name is None:
        guess = _from_name(path, latent_channels)
        if guess:
            name, src = guess, f"file name hint ({path.name if path else ''})"
    if name is None:
        name = _DEFAULT.get(latent_channels, "custom")
        src = (f"default for {latent_channels}-channel VAEs (pass family= or scaling_factor= to override)"
               if name != "custom" else f"no known family has {latent_channels} latent channels")
    fam = FAMILIES.get(name)
    if scale is None:
        scale, s_src = (fam.scaling_factor, f"family {name}") if fam else (1.0, "none known; 1.0")
    if not h_src:
        shift, h_src = (fam.shift_factor, f"family {name}") if fam else (None, "none known")
    return name, scale, shift, {"family": src, "scaling_factor": s_src, "shift_factor": h_src}
