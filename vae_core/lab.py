"""The VAE lab: round-trip your own images through VAEs, dtypes and tilers and measure what each one does.

:func:`run_lab` runs every combination of ``vaes × dtypes × tiles × modes`` over every image and returns a
:class:`LabResult`: per image and setting PSNR / SSIM / MS-SSIM against the original (:mod:`vae_core.metrics`,
float64 on [0, 1]), round-trip time and peak memory; tiled runs also against their own untiled output and
half-precision runs against fp32 (those references are run even when not asked for, and marked
``requested=False``). :func:`aggregate` gives mean ± std per setting, like the model cards' tables.
:func:`compare_pair` is the two-VAE comparison behind the ComfyUI node **VAE Compare**.

Settings:

* ``dtype``: ``fp32``, ``bf16``, ``fp16`` (as loaded, no fix), ``fp16-fix`` (fp16 after :func:`make_fp16_safe`).
  The NaN guard stays on; when it re-runs a call in a wider dtype the result says so (``ran_as``), so an fp16 row
  that is really fp32 is never passed off as fp16.
* ``tile``: None (untiled) or image px; ``mode``: ``exact`` / ``fast`` (vae_core's engine) or ``diffusers``
  (diffusers' ``enable_tiling`` on the same weights, kl-f8 AutoencoderKL only, when diffusers is installed), a peer
  row labelled as such.

Memory: on CUDA ``max_memory_allocated`` above the allocation before the call; on CPU the rise of the process's
peak RSS (``VmHWM``) during the call, after returning freed memory to the OS (``malloc_trim``), so it is the
call's working set, not the models held.
"""
from __future__ import annotations

import ctypes
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from . import metrics
from .errors import VaeInputError
from .tiling import TileReport
from .vae import Vae, make_fp16_safe

__all__ = ["Setting", "Run", "LabResult", "DTYPE_CHOICES", "MODE_CHOICES", "IMAGE_EXTENSIONS", "find_images",
           "prepare_image", "make_settings", "run_lab", "aggregate", "roundtrip", "compare_pair", "METRICS"]

log = logging.getLogger(__name__)

DTYPE_CHOICES = ("fp32", "bf16", "fp16", "fp16-fix")
MODE_CHOICES = ("exact", "fast", "diffusers")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp16-fix": torch.float16}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
#: The numbers of a run, in table order: (key, label, unit, higher is better).
METRICS = (("psnr", "PSNR", "dB", True), ("ssim", "SSIM", "", True), ("ms_ssim", "MS-SSIM", "", True),
           ("lpips", "LPIPS", "", False), ("seconds", "round trip", "s", False),
           ("peak_bytes", "peak memory", "MiB", False), ("psnr_vs_untiled", "PSNR vs untiled", "dB", True),
           ("psnr_vs_fp32", "PSNR vs fp32", "dB", True))


@dataclass(frozen=True)
class Setting:
    """One combination: a VAE (by label), a dtype, a tile size (None = untiled) and a tiling mode (``-`` untiled)."""

    vae: str
    dtype: str
    tile: Optional[int]
    mode: str

    @property
    def label(self) -> str:
        tiling = "untiled" if self.tile is None else f"tile {self.tile} {self.mode}"
        return f"{self.vae} · {self.dtype} · {tiling}"

    def untiled(self) -> "Setting":
        return dataclasses.replace(self, tile=None, mode="-")

    def fp32(self) -> "Setting":
        return dataclasses.replace(self, dtype="fp32")

    def references(self) -> dict[str, "Setting"]:
        """What this run is also compared with: its untiled run (tiled settings), its fp32 run (other dtypes)."""
        refs = {}
        if self.tile is not None:
            refs["untiled"] = self.untiled()
        if self.dtype != "fp32":
            refs["fp32"] = self.fp32()
        return refs


@dataclass
class Run:
    """One setting on one image. ``values`` holds the :data:`METRICS` that apply (None where not: SSIM below 11 px,
    MS-SSIM below 161 px, LPIPS without weights, references for untiled/fp32 runs); ``ran_as`` the dtypes the NaN guard really
    used (``"fp16"``, or e.g. ``"fp16 encode, fp32 decode"``); ``tiles`` the tiles the engine used (0 = untiled)."""

    setting: Setting
    image: str
    values: dict[str, Optional[float]]
    ran_as: str
    tiles: int
    max_diff_255: dict[str, int] = field(default_factory=dict)


@dataclass
class LabResult:
    """Everything a report needs. ``settings`` in run order with ``requested`` flags; ``panels[image]`` the
    pictures :mod:`vae_core.lab_report` made for that image (crops and heat maps as PNG bytes)."""

    settings: list[Setting]
    requested: set[Setting]
    images: list[dict[str, Any]]
    runs: list[Run]
    machine: dict[str, str]
    panels: dict[str, dict[str, Any]] = field(default_factory=dict)
    vaes: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# -- inputs ----------------------------------------------------------------------------------------------------
def find_images(paths: Sequence[os.PathLike | str], limit: int = 100_000) -> list[Path]:
    """Image files among ``paths``: files as given, folders walked (links not followed, sorted) for files with an
    :data:`IMAGE_EXTENSIONS` suffix.

    Raises:
        VaeInputError: a path that does not exist, a folder with no images, or no paths.
    """
    out: list[Path] = []
    for given in paths:
        p = Path(given)
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            found = []
            for root, dirs, files in os.walk(p):
                dirs.sort()
                found += [Path(root) / f for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
                if len(found) > limit:
                    raise VaeInputError(f"{p}: more than {limit} images; expected a smaller folder")
            if not found:
                raise VaeInputError(f"{p}: a folder with no images; expected files ending in "
                                    f"{', '.join(IMAGE_EXTENSIONS)}")
            out += found
        else:
            raise VaeInputError(f"{p}: no such file or folder; expected an image file or a folder of images")
    if not out:
        raise VaeInputError("no images given; expected one or more image files or folders")
    return out


def prepare_image(x: torch.Tensor, size: Optional[int], multiple: int) -> torch.Tensor:
    """``[1, 3, H, W]`` in [-1, 1] → the lab's input: with ``size``, the shorter side resized to ``size`` (bicubic,
    antialiased) and centre-cropped to ``size × size`` (the model cards' protocol, e.g. COCO at 256²); then
    centre-cropped to multiples of ``multiple`` (the largest downscale factor of the VAEs compared).

    Raises:
        VaeInputError: ``size`` below ``multiple``, or an image smaller than ``multiple`` px.
    """
    if size is not None:
        if size < multiple:
            raise VaeInputError(f"--size {size}: expected at least {multiple} px (the VAEs' downscale factor)")
        h, w = x.shape[-2:]
        s = size / min(h, w)
        nh, nw = max(size, round(h * s)), max(size, round(w * s))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
        y0, x0 = (nh - size) // 2, (nw - size) // 2
        x = x[..., y0:y0 + size, x0:x0 + size]
    h, w = x.shape[-2] // multiple * multiple, x.shape[-1] // multiple * multiple
    if h == 0 or w == 0:
        raise VaeInputError(f"image of {x.shape[-1]}x{x.shape[-2]} px; expected sides of at least {multiple} px")
    y0, x0 = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., y0:y0 + h, x0:x0 + w].contiguous()


def make_settings(vaes: Sequence[str], dtypes: Sequence[str], tiles: Sequence[Optional[int]],
                  modes: Sequence[str]) -> tuple[list[Setting], set[Setting], list[str]]:
    """Every requested combination plus the references it needs, in run order (references first), the set of
    requested ones, and notes on combinations left out. Untiled settings ignore ``modes`` (one each); diffusers'
    tiling is not run with ``fp16-fix`` (diffusers' network would not carry the fix's GroupNorm eps)."""
    for d in dtypes:
        if d not in DTYPE_CHOICES:
            raise VaeInputError(f"dtype {d!r}; expected one of {', '.join(DTYPE_CHOICES)}")
    for m in modes:
        if m not in MODE_CHOICES:
            raise VaeInputError(f"mode {m!r}; expected one of {', '.join(MODE_CHOICES)}")
    requested: list[Setting] = []
    notes: list[str] = []
    for v in vaes:
        for d in dtypes:
            for t in tiles:
                for m in (["-"] if t is None else modes):
                    s = Setting(v, d, t, m)
                    if m == "diffusers" and d == "fp16-fix":
                        notes.append(f"{s.label}: not run (diffusers' network does not carry the fp16 fix's "
                                     "rescaled GroupNorm eps; compare fp16 instead)")
                    elif s not in requested:
                        requested.append(s)
    needed: list[Setting] = []

    def add(s: Setting) -> None:
        for ref in s.references().values():
            add(ref)
        if s not in needed:
            needed.append(s)

    for s in requested:
        add(s)
    return needed, set(requested), notes


# -- running ---------------------------------------------------------------------------------------------------
def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measured(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float, Optional[int]]:
    """``fn()`` with its wall time (CUDA synchronised) and peak memory above the start (see the module docstring);
    peak None where it cannot be read (CPU without ``/proc``)."""
    from .bench import peak_rss, reset_peak_rss

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        _trim()
        ok = reset_peak_rss()
        base = _rss() if ok else None
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak: Optional[int] = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = max(0, peak_rss() - base) if base else None
    return out, seconds, peak


def roundtrip(vae: Vae, x: torch.Tensor, tile: Optional[int], mode: str = "exact", cache_bytes: Any = "auto",
              report: Optional[TileReport] = None) -> tuple[torch.Tensor, str]:
    """Encode then decode ``x`` (``[B, 3, H, W]`` in [-1, 1]) → (images ``[B, 3, H, W]`` float32 about [-1, 1],
    the dtypes the NaN guard really used). The guard's memory is cleared before each call and the VAE cast back to
    its dtype afterwards, so every call is tried in the dtype asked for."""
    dtype = vae.dtype
    used = []
    kw = dict(tile=tile, mode=mode, cache_bytes=cache_bytes, report=report)
    out = x
    for op in ("encode", "decode"):
        vae.guard.working_dtype = None
        out = getattr(vae, op)(out, **kw)
        used.append(vae.guard.working_dtype or dtype)
        vae.guard.working_dtype = None
        if vae.dtype != dtype:
            vae.model.to(dtype=dtype)
    names = [_DTYPE_NAMES.get(d, str(d).replace("torch.", "")) for d in used]
    return out, names[0] if names[0] == names[1] else f"{names[0]} encode, {names[1]} decode"


class _Variants:
    """Each VAE loaded once (fp32), and its dtype variants made once."""

    def __init__(self, vaes: dict[str, Vae]) -> None:
        self.base = vaes
        self.cache: dict[tuple[str, str], Vae] = {}

    def get(self, label: str, dtype: str) -> Vae:
        key = (label, dtype)
        if key not in self.cache:
            base = self.base[label]
            v = make_fp16_safe(base.clone()) if dtype == "fp16-fix" else base.clone()
            self.cache[key] = v.to(dtype=_TORCH_DTYPES[dtype]) if dtype != "fp32" else base
        return self.cache[key]


def _diffusers_roundtrip(vae: Vae, x: torch.Tensor, tile: int) -> torch.Tensor:
    from .bench import _diffusers_model
    from .model import AutoencoderKL

    cfg = vae.model.config
    if not isinstance(vae.model, AutoencoderKL) or cfg.latent_bn or cfg.decoder_ch is not None:
        raise VaeInputError(f"--mode diffusers with a {vae.info.family} VAE ({vae.info.path}): diffusers' tiling row "
                            "is for kl-f8 AutoencoderKL VAEs; expected an SD1/2, SDXL, SD3 or Flux.1 VAE")
    quiet = logging.getLogger("diffusers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its advice on casting with .to() is about from_pretrained, not this copy
    try:
        d = _diffusers_model(vae.model, vae.device, vae.dtype, tile)
    except ImportError as exc:
        raise VaeInputError(f"--mode diffusers: diffusers is not installed ({exc}); expected `pip install "
                            "diffusers` for the comparison row") from exc
    finally:
        quiet.setLevel(level)
    with torch.inference_mode():
        z = d.encode(x.to(vae.device, vae.dtype)).latent_dist.mean
        return d.decode(z).sample.float()


def _compare(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, int]:
    """PSNR of ``out`` against ``ref`` (both [0, 1]) and the largest difference after 8-bit rounding."""
    diff = int(((ref * 255).round() - (out * 255).round()).abs().max())
    return metrics.psnr(ref, out), diff


def run_lab(images: Sequence[Path], vaes: dict[str, Vae], dtypes: Sequence[str], tiles: Sequence[Optional[int]],
            modes: Sequence[str], size: Optional[int] = None, cache_bytes: Any = "auto",
            lpips: Optional[Callable[[torch.Tensor, torch.Tensor], float]] = None,
            progress: Optional[Callable[[int, int, str], None]] = None,
            panels: Optional[Callable[..., dict[str, Any]]] = None) -> LabResult:
    """Run every setting on every image (see the module docstring).

    Args:
        images: image files (:func:`find_images`); vaes: label → loaded fp32 :class:`Vae` (one device).
        dtypes, tiles, modes: what to combine (:data:`DTYPE_CHOICES`, None or px, :data:`MODE_CHOICES`).
        size: see :func:`prepare_image`. cache_bytes: exact tiling's cache budget.
        lpips: ``lpips(a, b)`` on ``[1, 3, H, W]`` in [-1, 1] → distance, or None.
        progress: ``progress(done, total, label)`` after each run. panels: ``panels(name, x01, outputs, refs)`` →
            the report's pictures for one image, called before its outputs are dropped.
    """
    from .images import load_image

    settings, requested, notes = make_settings(list(vaes), dtypes, tiles, modes)
    device = next(iter(vaes.values())).device
    multiple = max(v.model.config.downscale for v in vaes.values())
    variants = _Variants(vaes)
    result = LabResult(settings, requested, [], [], machine_info(device),
                       vaes={k: str(v.info.path) for k, v in vaes.items()}, notes=notes)
    total, done = len(images) * len(settings), 0
    for path in images:
        name = _unique(path.name, {im["name"] for im in result.images})
        x = prepare_image(load_image(path), size, multiple)
        x01 = metrics.to_unit(x)
        result.images.append({"name": name, "path": str(path), "width": x.shape[-1], "height": x.shape[-2]})
        outputs: dict[Setting, torch.Tensor] = {}
        for s in settings:
            vae = variants.get(s.vae, s.dtype)
            report = TileReport()
            if s.mode == "diffusers":
                y, seconds, peak = measured(lambda: _diffusers_roundtrip(vae, x, s.tile), vae.device)
                ran_as = s.dtype
            else:
                (y, ran_as), seconds, peak = measured(
                    lambda: roundtrip(vae, x, s.tile, "exact" if s.mode == "-" else s.mode, cache_bytes, report),
                    vae.device)
            y01 = metrics.to_unit(y.cpu())
            outputs[s] = y01
            values: dict[str, Optional[float]] = {
                "psnr": metrics.psnr(x01, y01), "ms_ssim": metrics.ms_ssim(x01, y01),
                "ssim": metrics.ssim(x01, y01) if min(x01.shape[-2:]) >= metrics.SSIM_MIN_SIDE else None,
                "lpips": lpips(x, y.cpu()) if lpips is not None else None, "seconds": seconds,
                "peak_bytes": float(peak) if peak is not None else None, "psnr_vs_untiled": None,
                "psnr_vs_fp32": None}
            run = Run(s, name, values, ran_as, report.tiles)
            for kind, ref in s.references().items():
                run.values[f"psnr_vs_{kind}"], run.max_diff_255[kind] = _compare(outputs[ref], y01)
            if not all(v is None or not math.isnan(v) for v in run.values.values()):
                log.warning("%s on %s: non-finite metrics (the output holds NaN/inf)", s.label, name)
            result.runs.append(run)
            done += 1
            if progress is not None:
                progress(done, total, f"{name}: {s.label}")
        if panels is not None:
            result.panels[name] = panels(name, x01[0], {s: o[0] for s, o in outputs.items()},
                                         {s: s.references() for s in settings if s in requested})
    return result


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name} ({i})", i + 1
    return out


def machine_info(device: torch.device) -> dict[str, str]:
    import platform

    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                what = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), what)
        except OSError:
            pass
        what = f"CPU {what}, {torch.get_num_threads()} threads"
    return {"device": what, "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


# -- aggregates ------------------------------------------------------------------------------------------------
def _mean_std(values: Iterable[Optional[float]]) -> Optional[tuple[float, float]]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    if any(math.isinf(v) for v in vals):  # identical outputs (PSNR = inf) in some image
        finite = [v for v in vals if not math.isinf(v)]
        return (math.inf, 0.0) if not finite or all(v == math.inf for v in vals) else (math.inf, math.nan)
    m = sum(vals) / len(vals)
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals))


def aggregate(result: LabResult) -> list[dict[str, Any]]:
    """Per requested setting (run order): ``setting``, ``images``, ``ran_as`` (distinct values) and, per metric,
    ``(mean, std)`` over the images (population std, as "mean ± std" in the model cards), or None."""
    rows = []
    for s in result.settings:
        if s not in result.requested:
            continue
        runs = [r for r in result.runs if r.setting == s]
        row: dict[str, Any] = {"setting": s, "images": len(runs),
                               "ran_as": sorted({r.ran_as for r in runs}),
                               "max_diff_255": {k: max(r.max_diff_255[k] for r in runs) for k in s.references()}}
        for key, *_ in METRICS:
            row[key] = _mean_std(r.values[key] for r in runs)
        rows.append(row)
    return rows


# -- the two-VAE comparison (ComfyUI's VAE Compare) --------------------------------------------------------------
def compare_pair(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, names: tuple[str, str],
                 seconds: tuple[float, float], gain: float = 4.0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Two round trips of one batch side by side.

    Args:
        x: originals ``[B, 3, H, W]`` in [-1, 1]; a, b: the two round trips (same shape, about [-1, 1]).
    Returns:
        ``(pair, heat, text)``: ``pair`` = ``[B, 3, H, 2W]`` in [0, 1], A left and B right; ``heat`` = the same
        layout of ``|A − original|`` and ``|B − original|`` heat maps (× ``gain``, :func:`metrics.heatmap`);
        ``text`` = per VAE PSNR/SSIM/MS-SSIM against the original (means over the batch) and time, and A vs B.
    """
    x01, a01, b01 = metrics.to_unit(x), metrics.to_unit(a), metrics.to_unit(b)
    pair = torch.cat([a01, b01], dim=-1).float()
    heat = torch.stack([torch.cat([metrics.heatmap(x01[i], a01[i], gain), metrics.heatmap(x01[i], b01[i], gain)],
                                  dim=-1) for i in range(x.shape[0])]).float()
    lines = []
    for label, name, y, t in (("A", names[0], a01, seconds[0]), ("B", names[1], b01, seconds[1])):
        ms = metrics.ms_ssim(x01, y)
        lines.append(f"{label} {name}: PSNR {metrics.psnr(x01, y):.2f} dB, SSIM {metrics.ssim(x01, y):.4f}, "
                     f"MS-SSIM {'-' if ms is None else f'{ms:.4f}'}, round trip {t:.2f} s")
    ab, diff = _compare(a01, b01)
    lines.append(f"A vs B: PSNR {ab:.2f} dB, largest difference {diff}/255 after 8-bit rounding")
    lines.append(f"heat map: |round trip − original| × {gain:g} (black = identical); {x.shape[-1]}x{x.shape[-2]} px, "
                 f"{x.shape[0]} image(s)")
    return pair, heat, "\n".join(lines)
