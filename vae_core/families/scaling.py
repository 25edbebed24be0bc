"""Model families and their latent scaling, with the source each value came from.

SD1/2 and SDXL VAEs have identical shapes (4 channels, quant convs); SD3 and Flux likewise (16 channels, none).
Scaling therefore comes, in order of priority, from: an explicit argument, a diffusers ``config.json``,
safetensors metadata, the other keys of a full checkpoint (SDXL's ``conditioner.``, SD3's ``joint_blocks``,
Flux's ``double_blocks``), a hint in the file name, and last a per-channel-count default. ``VaeInfo.sources``
records which one was used.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

from ..errors import VaeInputError, VaeLoadError

__all__ = ["FAMILIES", "Family", "resolve_family", "check_factor", "check_factors", "SCALE_RANGE", "MAX_ABS_SHIFT"]

log = logging.getLogger(__name__)


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
    # Flux.2 normalises its latents with BatchNorm statistics stored in the VAE (over 2×2-patchified latents), not
    # with a scalar: scale 1 and no shift here; see Vae.scale_latents.
    "flux2": Family("flux2", 32, 1.0, None, "Flux.2"),
}
_DEFAULT = {4: "sd1", 16: "flux", 32: "flux2"}


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


#: Bounds on latent scaling factors (and per-channel standard deviations) and on shifts (and per-channel means).
#: Real VAEs use 0.1–3.5 and |shift| < 2; values far outside would turn scaled latents into inf or 0 (a 1e300 scale,
#: a 1e-300 std), so they are refused rather than run.
SCALE_RANGE = (1e-4, 1e4)
MAX_ABS_SHIFT = 1e4


def check_factor(value: object, name: str, source: str, *, positive: bool, path: Optional[object] = None
                 ) -> Optional[float]:
    """Validate a scaling (``positive=True``: finite, in :data:`SCALE_RANGE`) or shift (finite, at most
    :data:`MAX_ABS_SHIFT` in magnitude) factor; None and "" mean absent.

    Args:
        value: the number (or numeric string, as safetensors metadata stores it).
        name: ``"scaling_factor"`` or ``"shift_factor"``; ``source``: where it came from (e.g. ``"config.json"``).
        path: the file it came from; then a :class:`VaeLoadError` is raised, else :class:`VaeInputError`.
    Raises:
        VaeLoadError / VaeInputError (both ValueError): naming the source, the value and what was expected.
    """
    if value is None or value == "":
        return None
    lo, hi = SCALE_RANGE
    expected = (f"a finite number from {lo:g} to {hi:g} (beyond that, scaled latents overflow or vanish)" if positive
                else f"a finite number from {-MAX_ABS_SHIFT:g} to {MAX_ABS_SHIFT:g}")
    try:
        if isinstance(value, bool):
            raise TypeError("a boolean")
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        number = math.nan
        ok = False
    else:
        ok = math.isfinite(number) and (lo <= number <= hi if positive else abs(number) <= MAX_ABS_SHIFT)
    if ok:
        return number
    found = f"{name} {value!r} from {source}"
    if path is not None:
        raise VaeLoadError(path, found, f"{name} to be {expected}")
    raise VaeInputError(f"{found}: expected {expected}")


def check_factors(values: object, name: str, source: str, *, positive: bool, count: int, path: object) -> tuple:
    """A list of ``count`` per-channel factors (Qwen-Image's ``latents_std``: ``positive``; ``latents_mean``), each
    as :func:`check_factor` wants it.

    Raises:
        VaeLoadError: not a list of ``count`` numbers, or a value out of range, naming it and its index.
    """
    if not isinstance(values, (list, tuple)) or len(values) != count:
        raise VaeLoadError(path, f"{name} {str(values)[:80]} from {source}", f"a list of {count} numbers, one per "
                           "latent channel")
    out = tuple(check_factor(v, f"{name}[{i}]", source, positive=positive, path=path) for i, v in enumerate(values))
    if None in out:
        i = out.index(None)
        raise VaeLoadError(path, f"{name}[{i}] {values[i]!r} from {source}", "a number")
    return out


def resolve_family(latent_channels: int, *, family: Optional[str] = None, scaling_factor: Optional[float] = None,
                   shift_factor: Optional[float] = None, config: Optional[Mapping] = None,
                   metadata: Optional[Mapping[str, str]] = None, checkpoint_keys: Iterable[str] = (),
                   path: Optional[Path] = None, config_path: Optional[Path] = None,
                   metadata_path: Optional[Path] = None, latent_bn: bool = False
                   ) -> tuple[str, float, Optional[float], dict[str, str]]:
    """Decide family, scaling and shift factors (``latent_bn``: the VAE holds Flux.2's latent BatchNorm statistics;
    only such a VAE is ``flux2``, a 32-channel VAE without them is ``custom``).

    Returns:
        ``(family, scaling_factor, shift_factor, sources)`` where ``sources`` maps ``"family"``,
        ``"scaling_factor"`` and ``"shift_factor"`` to a short description of where each came from.
    A family named by ``config.json`` or safetensors metadata that does not match ``latent_channels`` is ignored
    with a logged warning (and noted in ``sources["family"]``); an unknown family name there likewise.

    Raises:
        VaeInputError (a ValueError): ``family`` names no known family or belongs to another channel count;
            ``scaling_factor``/``shift_factor`` arguments non-finite (scaling: or ≤ 0).
        VaeLoadError (a ValueError): the same for values from ``config.json`` / metadata, naming the file.
    """
    if family is not None:
        if family not in FAMILIES:
            raise VaeInputError(f"family={family!r}: unknown; expected one of {sorted(FAMILIES)}")
        if family == "flux2" and not latent_bn:
            raise VaeInputError("family='flux2' for a VAE without latent BatchNorm statistics (bn.running_mean, "
                                "bn.running_var); expected a Flux.2 VAE file that has them")
        if FAMILIES[family].latent_channels != latent_channels:
            raise VaeInputError(f"family={family!r} has {FAMILIES[family].latent_channels} latent channels, but this "
                                f"VAE has {latent_channels}; expected a family with {latent_channels} channels")
    name, src = family, "argument"
    scale = shift = None
    s_src = h_src = ""
    ignored: list[str] = []
    if scaling_factor is not None:
        scale, s_src = check_factor(scaling_factor, "scaling_factor", "argument", positive=True), "argument"
    if shift_factor is not None:
        shift, h_src = check_factor(shift_factor, "shift_factor", "argument", positive=False), "argument"
    for label, table, where in (("config.json", config or {}, config_path or path),
                                ("safetensors metadata", metadata or {}, metadata_path or path)):
        c_scale = check_factor(table.get("scaling_factor"), "scaling_factor", label, positive=True,
                               path=where or label)
        c_shift = check_factor(table.get("shift_factor"), "shift_factor", label, positive=False, path=where or label)
        if scale is None and c_scale is not None:
            scale, s_src = c_scale, label
            if shift is None and "shift_factor" in table:
                shift, h_src = c_shift, label
        stated = table.get("family")
        if name is None and stated is not None and stated != "custom":  # save_vae writes "custom" for others
            fam_obj = FAMILIES.get(stated) if isinstance(stated, str) else None
            if fam_obj is not None and fam_obj.latent_channels == latent_channels:
                name, src = str(stated), label
            else:
                why = (f"{fam_obj.latent_channels} latent channels, this VAE has {latent_channels}" if fam_obj
                       else f"unknown; known: {sorted(FAMILIES)}")
                log.warning("%s: ignoring family %r from %s (%s)", where or label, stated, label, why)
                ignored.append(f"ignored family {stated!r} from {label} ({why})")
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
    if name == "flux2" and not latent_bn:
        log.warning("%s: ignoring family 'flux2' from %s: no latent BatchNorm statistics", path or "VAE", src)
        name, src = None, f"{src} (ignored: no Flux.2 BatchNorm statistics)"
    if name is None:
        name = _DEFAULT.get(latent_channels, "custom")
        src = (f"default for {latent_channels}-channel VAEs (pass family= or scaling_factor= to override)"
               if name != "custom" else f"no known family has {latent_channels} latent channels")
        if name == "flux2" and not latent_bn:
            name, src = "custom", ("32 latent channels without Flux.2's latent BatchNorm statistics (bn.running_mean/"
                                   "var): raw latents only")
    fam = FAMILIES.get(name)
    if scale is None:
        scale, s_src = (fam.scaling_factor, f"family {name}") if fam else (1.0, "none known; 1.0")
    if not h_src:
        shift, h_src = (fam.shift_factor, f"family {name}") if fam else (None, "none known")
    if ignored:
        src = f"{src}; {'; '.join(ignored)}"
    return name, scale, shift, {"family": src, "scaling_factor": s_src, "shift_factor": h_src}
