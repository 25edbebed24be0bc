"""The VAE lab: round-trip your own images through VAEs, dtypes and tilers and measure what each one does.

:func:`run_lab` runs every combination of ``vaes × dtypes × tiles × modes`` over every image and returns a
:class:`LabResult`: per image and setting PSNR / SSIM / MS-SSIM against the original (:mod:`vae_core.metrics`,
float64 on [0, 1]), round-trip time and peak memory (:mod:`vae_core.lab.measure`); tiled runs also against their
own untiled output and half-precision runs against fp32 (those references are run even when not asked for, and are
not ``requested``). :func:`aggregate` gives mean ± std per setting, like the model cards' tables.
:func:`compare_pair` is the two-VAE comparison behind the ComfyUI node **VAE Compare**.

Settings:

* ``dtype``: ``fp32``, ``bf16``, ``fp16`` (as loaded, no fix), ``fp16-fix`` (fp16 after :func:`make_fp16_safe`).
  The NaN guard stays on; when it re-runs a call in a wider dtype the result says so (``ran_as``), so an fp16 row
  that is really fp32 is never passed off as fp16. An untiled call that ran out of memory and was retried tiled
  says so too.
* ``tile``: None (untiled) or image px; ``mode``: ``exact`` / ``fast`` (vae_core's engine) or ``diffusers``
  (diffusers' ``enable_tiling`` on the same weights, kl-f8 AutoencoderKL only, when diffusers is installed), a peer
  row labelled as such. Combinations a VAE cannot run (the fp16 fix of a tiny autoencoder, diffusers' tiling of a
  non-kl-f8 VAE or with the fp16 fix) are left out with a note, before any work.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from . import metrics
from .inputs import IMAGE_EXTENSIONS, find_images, frames_of, load_input, prepare_image, prepare_input
from ..errors import VaeError, VaeInputError
from .measure import measured, roundtrip
from ..tiling.memory import is_oom
from ..precision.dtypes import DTYPES, bf16_supported
from ..tiling.options import TileReport
from ..vae import Vae, make_fp16_safe

__all__ = ["Setting", "Run", "LabResult", "DTYPE_CHOICES", "MODE_CHOICES", "IMAGE_EXTENSIONS", "LPIPS_MIN_SIDE",
           "find_images", "prepare_image", "make_settings", "capabilities", "run_lab", "aggregate", "compare_pair",
           "METRICS"]  # find_images, prepare_image, IMAGE_EXTENSIONS: from vae_core.lab.inputs

log = logging.getLogger(__name__)

DTYPE_CHOICES = ("fp32", "bf16", "fp16", "fp16-fix")
MODE_CHOICES = ("exact", "fast", "diffusers")
#: LPIPS's AlexNet needs images of at least this side; smaller ones get no LPIPS value.
LPIPS_MIN_SIDE = 32
#: The numbers of a run, in table order: (key, label, unit, higher is better). On a clip, PSNR/SSIM/MS-SSIM/LPIPS
#: are means over its frames, ``psnr_min_frame`` its worst frame, the PSNRs against references the worst frame, and
#: ``seam_vs_untiled`` the temporal seam of a tiled run (:func:`vae_core.lab.metrics.temporal_seam`, 8-bit levels).
METRICS = (("psnr", "PSNR", "dB", True), ("psnr_min_frame", "PSNR worst frame", "dB", True),
           ("ssim", "SSIM", "", True), ("ms_ssim", "MS-SSIM", "", True),
           ("lpips", "LPIPS", "", False), ("seconds", "round trip", "s", False),
           ("peak_bytes", "peak memory", "MiB", False), ("psnr_vs_untiled", "PSNR vs untiled", "dB", True),
           ("psnr_vs_fp32", "PSNR vs fp32", "dB", True),
           ("seam_vs_untiled", "temporal seam vs untiled", "levels", False))


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

    def references(self) -> dict[str, "Setting"]:
        """What this run is also compared with: its untiled run (tiled settings), its fp32 run (other dtypes)."""
        refs = {}
        if self.tile is not None:
            refs["untiled"] = dataclasses.replace(self, tile=None, mode="-")
        if self.dtype != "fp32":
            refs["fp32"] = dataclasses.replace(self, dtype="fp32")
        return refs


@dataclass
class Run:
    """One setting on one image. ``values`` holds the :data:`METRICS` that apply (None where not: SSIM below 11 px,
    MS-SSIM below 161 px, LPIPS without weights or below 32 px, references for untiled/fp32 runs); ``ran_as`` what
    really ran (``"fp16"``, ``"fp16 encode, fp32 decode"``, ``"fp32, tiled after running out of memory"``);
    ``tiles`` the tiles the engine used (0 = untiled); ``max_diff_255`` per reference the largest pixel difference
    after 8-bit rounding (None when an output is not finite)."""

    setting: Setting
    image: str
    values: dict[str, Optional[float]]
    ran_as: str
    tiles: int
    max_diff_255: dict[str, Optional[int]] = field(default_factory=dict)


@dataclass
class LabResult:
    """Everything a report needs: ``settings`` in run order, the ``requested`` ones, ``images`` (name, path, size as
    run), ``runs``, ``machine``, ``panels[image]`` (the report's pictures, see :mod:`vae_core.lab.report`), ``vaes``
    (label → path) and ``notes`` (combinations left out)."""

    settings: list[Setting]
    requested: set[Setting]
    images: list[dict[str, Any]]
    runs: list[Run]
    machine: dict[str, str]
    panels: dict[str, dict[str, Any]] = field(default_factory=dict)
    vaes: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def capabilities(vae: Vae) -> set[str]:
    """What a loaded VAE can run besides the plain dtypes and vae_core's tiling: ``"fp16-fix"`` (GroupNorm- or RMS-
    norm-normalised stream) and ``"diffusers"`` (a network diffusers holds: a kl-f8 ``AutoencoderKL``, a Wan VAE as
    ``AutoencoderKLWan``, HunyuanVideo 1.5's as ``AutoencoderKLHunyuanVideo15``, LTX-Video's as
    ``AutoencoderKLLTXVideo`` where it pads with zeros)."""
    caps = set()
    if vae.family.fp16_fix is not None:
        caps.add("fp16-fix")
    if vae.family.diffusers_peer(vae.model):
        caps.add("diffusers")
    return caps


def make_settings(vaes: Sequence[str], dtypes: Sequence[str], tiles: Sequence[Optional[int]],
                  modes: Sequence[str], caps: Optional[dict[str, set[str]]] = None
                  ) -> tuple[list[Setting], set[Setting], list[str]]:
    """Every requested combination plus the references it needs, in run order (references first), the set of
    requested ones, and notes on combinations left out. Untiled settings ignore ``modes`` (one each); ``caps``
    (label → :func:`capabilities`) leaves out what a VAE cannot run; diffusers' tiling never runs with ``fp16-fix``
    (diffusers' network would not carry the fix's GroupNorm eps)."""
    for d in dtypes:
        if d not in DTYPE_CHOICES:
            raise VaeInputError(f"dtype {d!r}; expected one of {', '.join(DTYPE_CHOICES)}")
    for m in modes:
        if m not in MODE_CHOICES:
            raise VaeInputError(f"mode {m!r}; expected one of {', '.join(MODE_CHOICES)}")
    import importlib.util

    requested: list[Setting] = []
    notes: list[str] = []
    if "diffusers" in modes and any(t is not None for t in tiles) and importlib.util.find_spec("diffusers") is None:
        raise VaeInputError("--mode diffusers: diffusers is not installed; expected `pip install diffusers` for the "
                            "comparison row (or leave the mode out)")
    for v in vaes:
        can = caps.get(v, set(["fp16-fix", "diffusers"])) if caps is not None else {"fp16-fix", "diffusers"}
        for d in dtypes:
            if d == "fp16-fix" and "fp16-fix" not in can:
                notes.append(f"{v} · fp16-fix: not run (no GroupNorm/RMS-norm-normalised stream to rescale: a tiny "
                             "autoencoder runs fp16 as it is; compare fp16 instead)")
                continue
            for t in tiles:
                for m in (["-"] if t is None else modes):
                    s = Setting(v, d, t, m)
                    if m == "diffusers" and "diffusers" not in can:
                        if not any(n.startswith(f"{v} · diffusers") for n in notes):
                            notes.append(f"{v} · diffusers tiling: not run (diffusers' tiling row is for kl-f8 "
                                         "AutoencoderKL VAEs: SD1/2, SDXL, SD3, Flux.1; and the video VAEs)")
                    elif m == "diffusers" and d == "fp16-fix":
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
class _Variants:
    """Each VAE loaded once (fp32); its dtype variants and diffusers copies made once, outside the timed calls."""

    def __init__(self, vaes: dict[str, Vae]) -> None:
        self.base = vaes
        self.cache: dict[tuple[str, str], Vae] = {}
        self.peers: dict[tuple[str, str, int], Any] = {}

    def get(self, label: str, dtype: str) -> Vae:
        key = (label, dtype)
        if key not in self.cache:
            base = self.base[label]
            v = make_fp16_safe(base.clone()) if dtype == "fp16-fix" else base.clone()
            self.cache[key] = v.to(dtype=DTYPES[dtype.removesuffix("-fix")]) if dtype != "fp32" else base
            if self.cache[key].dtype == torch.float16 and bf16_supported(self.cache[key].device):
                self.cache[key].guard.keep_weights(self.cache[key].model)  # a bf16 retry would round: copy now,
                # outside the timed calls
        return self.cache[key]

    def diffusers(self, label: str, dtype: str, tile: int) -> Any:
        """diffusers' AutoencoderKL (its own class for a video VAE) on the same weights with ``enable_tiling`` at
        ``tile`` px."""
        key = (label, dtype, tile)
        if key not in self.peers:
            from .bench import _diffusers_model
            from .bench_video import diffusers_video

            vae = self.get(label, dtype)
            try:
                import diffusers  # noqa: F401 - its import sets its loggers' levels: quieten them after it
            except ImportError as exc:
                raise VaeInputError(f"--mode diffusers: diffusers is not installed ({exc}); expected `pip install "
                                    "diffusers` for the comparison row") from exc
            quiet = logging.getLogger("diffusers")
            level = quiet.level
            quiet.setLevel(logging.ERROR)  # its advice on casting with .to() is about from_pretrained, not this copy
            try:
                build = diffusers_video if vae.family.video else _diffusers_model
                self.peers[key] = build(vae.model, vae.device, vae.dtype, tile)
            except ImportError as exc:
                raise VaeInputError(f"--mode diffusers: diffusers is not installed ({exc}); expected `pip install "
                                    "diffusers` for the comparison row") from exc
            finally:
                quiet.setLevel(level)
        return self.peers[key]


def _diffusers_roundtrip(d: Any, x: torch.Tensor, device: torch.device, dtype: torch.dtype, video: bool
                         ) -> torch.Tensor:
    """diffusers' round trip of an image or clip: a video network takes 5-D (an image as one frame), an image
    network a clip frame by frame."""
    def one(t: torch.Tensor) -> torch.Tensor:
        from .bench_video import peer_decode_args

        z = d.encode(t.to(device, dtype)).latent_dist.mean
        return d.decode(z, **peer_decode_args(d, z)).sample.float()

    with torch.inference_mode():
        if video:
            return one(x) if x.dim() == 5 else one(x.unsqueeze(2)).squeeze(2)
        return torch.stack([one(f) for f in frames_of(x)], 2) if x.dim() == 5 else one(x)


def _compare(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, Optional[int]]:
    """PSNR of ``out`` against ``ref`` (both [0, 1]; NaN when either is not finite; the worst frame of a clip) and
    the largest difference after 8-bit rounding (None when not finite)."""
    diff = ((ref * 255).round() - (out * 255).round()).abs().max()
    psnr = _worst([metrics.psnr(a, b) for a, b in zip(frames_of(ref), frames_of(out))])
    return psnr, int(diff) if bool(torch.isfinite(diff)) else None


def _worst(values: list[float]) -> float:
    """The smallest value, NaN if any is (``min`` would depend on the order)."""
    return math.nan if any(math.isnan(v) for v in values) else min(values)


def _values(x: torch.Tensor, x01: torch.Tensor, y: torch.Tensor, y01: torch.Tensor,
            lpips: Optional[Callable[[torch.Tensor, torch.Tensor], float]]) -> dict[str, Optional[float]]:
    """The metrics against the original: an image's, or a clip's means over its frames and its worst frame."""
    if x.dim() == 5:
        per = [_values(*t, lpips) for t in zip(frames_of(x), frames_of(x01), frames_of(y), frames_of(y01))]
        out: dict[str, Optional[float]] = {}
        for k in per[0]:
            vals = [p[k] for p in per]
            out[k] = None if None in vals else sum(vals) / len(vals)  # type: ignore[arg-type]
        out["psnr_min_frame"] = _worst([p["psnr"] for p in per])  # type: ignore[misc]
        return out
    side = min(x01.shape[-2:])
    return {"psnr": metrics.psnr(x01, y01), "psnr_min_frame": None,
            "ssim": metrics.ssim(x01, y01) if side >= metrics.SSIM_MIN_SIDE else None,
            "ms_ssim": metrics.ms_ssim(x01, y01),
            "lpips": lpips(x, y) if lpips is not None and side >= LPIPS_MIN_SIDE else None}


def _run_one(s: Setting, variants: _Variants, x: torch.Tensor, cache_bytes: Any, report: TileReport
             ) -> tuple[torch.Tensor, str, float, Optional[int]]:
    vae = variants.get(s.vae, s.dtype)
    if s.mode == "diffusers":
        d = variants.diffusers(s.vae, s.dtype, s.tile or 0)
        y, seconds, peak = measured(lambda: _diffusers_roundtrip(d, x, vae.device, vae.dtype, vae.family.video),
                                    vae.device)
        return y, s.dtype, seconds, peak
    (y, ran_as), seconds, peak = measured(
        lambda: roundtrip(vae, x, s.tile, "exact" if s.mode == "-" else s.mode, cache_bytes, report), vae.device)
    if s.tile is None and report.tiles:  # the engine's out-of-memory fallback tiled an untiled call
        ran_as += ", tiled after running out of memory"
    return y, ran_as, seconds, peak


def run_lab(images: Sequence[Path], vaes: dict[str, Vae], dtypes: Sequence[str], tiles: Sequence[Optional[int]],
            modes: Sequence[str], size: Optional[int] = None, cache_bytes: Any = "auto",
            lpips: Optional[Callable[[torch.Tensor, torch.Tensor], float]] = None,
            progress: Optional[Callable[[int, int, str], None]] = None,
            panels: Optional[Callable[..., dict[str, Any]]] = None, clips: bool = False) -> LabResult:
    """Run every setting on every image or clip (see the module docstring). Every input is read once before any VAE
    runs, so a broken file (or a clip a video VAE cannot take) fails at once.

    Args:
        images: image files and clips (:func:`find_images`; ``clips``: folders are clips of numbered frames);
            vaes: label → loaded fp32 :class:`Vae` (one device).
        dtypes, tiles, modes: what to combine (:data:`DTYPE_CHOICES`, None or px, :data:`MODE_CHOICES`).
        size: see :func:`prepare_image`. cache_bytes: exact tiling's cache budget.
        lpips: ``lpips(a, b)`` on ``[1, 3, H, W]`` in [-1, 1] → distance, or None.
        progress: ``progress(done, total, label)`` after each run. panels: ``panels(name, x01, outputs, refs)`` →
            the report's pictures for one image, called before its outputs are dropped.
    Raises:
        VaeInputError: an unreadable image, or a run that ran out of memory (naming the image and setting).
    """
    caps = {label: capabilities(v) for label, v in vaes.items()}
    settings, requested, notes = make_settings(list(vaes), dtypes, tiles, modes, caps)
    if not requested:
        raise VaeInputError(f"nothing to run: every combination asked for was left out ({'; '.join(notes)}); "
                            "expected at least one setting these VAEs can run")
    device = next(iter(vaes.values())).device
    multiple = max(v.model.config.downscale for v in vaes.values())
    for path in images:  # fail on a broken or too small file, or a clip a video VAE cannot take, before any work
        x = prepare_input(load_input(path, clips), size, multiple)
        for label, v in vaes.items():
            if x.dim() == 5 and v.family.video:
                try:
                    v.family.check_video(v.model, x, "encode")
                except VaeInputError as exc:
                    raise VaeInputError(f"{path}: {label}: {exc}") from exc
    variants = _Variants(vaes)
    result = LabResult(settings, requested, [], [], machine_info(device),
                       vaes={k: str(v.info.path) for k, v in vaes.items()}, notes=notes)
    total, done = len(images) * len(settings), 0
    for path in images:
        name = _unique(path.name, {im["name"] for im in result.images})
        x = prepare_input(load_input(path, clips), size, multiple)
        x01 = metrics.to_unit(x)
        result.images.append({"name": name, "path": str(path), "width": x.shape[-1], "height": x.shape[-2],
                              **({"frames": x.shape[2]} if x.dim() == 5 else {})})
        outputs: dict[Setting, torch.Tensor] = {}
        for s in settings:
            report = TileReport()
            try:
                y, ran_as, seconds, peak = _run_one(s, variants, x, cache_bytes, report)
            except (RuntimeError, MemoryError) as exc:
                if not is_oom(exc) or isinstance(exc, VaeError):
                    raise
                raise VaeInputError(f"{path}: {s.label}: out of memory ({str(exc).splitlines()[0][:200]}); expected "
                                    "a smaller --size, a tile for this setting, or another device") from exc
            y = y.cpu()
            outputs[s] = y01 = metrics.to_unit(y)
            values = _values(x, x01, y, y01, lpips)
            values.update({"seconds": seconds, "peak_bytes": float(peak) if peak is not None else None,
                           "psnr_vs_untiled": None, "psnr_vs_fp32": None, "seam_vs_untiled": None})
            run = Run(s, name, values, ran_as, report.tiles)
            for kind, ref in s.references().items():
                run.values[f"psnr_vs_{kind}"], run.max_diff_255[kind] = _compare(outputs[ref], y01)
                if kind == "untiled" and y.dim() == 5:
                    run.values["seam_vs_untiled"] = metrics.temporal_seam(y01 * 2 - 1, outputs[ref] * 2 - 1)
            if any(v is not None and math.isnan(v) for v in run.values.values()):
                log.warning("%s on %s: NaN metrics (the output holds NaN/inf)", s.label, name)
            result.runs.append(run)
            done += 1
            if progress is not None:
                progress(done, total, f"{name}: {s.label}")
        if panels is not None:
            shown = _frame_shown(x01, outputs, requested)
            if shown is not None:
                result.images[-1]["frame_shown"] = shown
                x01, outputs = x01[:, :, shown], {s: o[:, :, shown] for s, o in outputs.items()}
            result.panels[name] = panels(name, x01[0], {s: o[0] for s, o in outputs.items()},
                                         {s: s.references() for s in settings if s in requested})
    return result


def _frame_shown(x01: torch.Tensor, outputs: dict[Setting, torch.Tensor], requested: set[Setting]) -> Optional[int]:
    """The frame of a clip the report pictures: where the requested round trips differ most from the original
    (None for an image)."""
    if x01.dim() != 5:
        return None
    err = sum(((o - x01).abs().nan_to_num(1.0).mean(dim=(0, 1, 3, 4)) for s, o in outputs.items() if s in requested),
              torch.zeros(x01.shape[2]))
    return int(err.argmax())


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name} ({i})", i + 1
    return out


def machine_info(device: torch.device) -> dict[str, str]:
    """Device (GPU name, or CPU model and threads), torch and Python versions, date."""
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
def _mean_std(values: Iterable[Optional[float]]) -> Optional[tuple[float, float, int, int]]:
    """``(mean, std, n, identical)`` over the values that exist: ``n`` of them, ``identical`` of which are ``inf``
    (a PSNR of identical images), left out of mean and std unless all are (then ``(inf, 0, n, n)``). NaN values
    make the mean NaN. None when no value exists."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    finite = [v for v in vals if not math.isinf(v)]
    identical = len(vals) - len(finite)
    if not finite:
        return math.inf, 0.0, len(vals), identical
    m = sum(finite) / len(finite)
    return m, math.sqrt(sum((v - m) ** 2 for v in finite) / len(finite)), len(vals), identical


def aggregate(result: LabResult) -> list[dict[str, Any]]:
    """Per requested setting (run order): ``setting``, ``images``, ``ran_as`` (distinct values),
    ``max_diff_255`` per reference (None if an output was not finite) and, per metric, ``(mean, std, n,
    identical)`` over the images (population std, as "mean ± std" in the model cards), or None."""
    rows = []
    for s in result.settings:
        if s not in result.requested:
            continue
        runs = [r for r in result.runs if r.setting == s]
        diffs = {k: [r.max_diff_255[k] for r in runs] for k in s.references()}
        row: dict[str, Any] = {"setting": s, "images": len(runs), "ran_as": sorted({r.ran_as for r in runs}),
                               "max_diff_255": {k: None if None in v else max(v) for k, v in diffs.items()}}
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
        layout of ``|A − original|`` and ``|B − original|`` heat maps (× ``gain``, :func:`metrics.heatmap`; NaN
        shows as the brightest colour); ``text`` = per VAE PSNR/SSIM/MS-SSIM against the original (means over the
        batch; "-" where the image is too small) and time, and A vs B.
    """
    x01, a01, b01 = metrics.to_unit(x), metrics.to_unit(a), metrics.to_unit(b)
    pair = torch.cat([a01, b01], dim=-1).float().nan_to_num(nan=1.0)
    heat = torch.stack([torch.cat([metrics.heatmap(x01[i], a01[i], gain), metrics.heatmap(x01[i], b01[i], gain)],
                                  dim=-1) for i in range(x.shape[0])]).float()

    def fmt(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.4f}"

    lines = []
    for label, name, y01, t in (("A", names[0], a01, seconds[0]), ("B", names[1], b01, seconds[1])):
        per = [_values(x[i:i + 1], x01[i:i + 1], y01[i:i + 1], y01[i:i + 1], None) for i in range(x.shape[0])]
        v = {k: (_mean_std(p[k] for p in per) or (None,))[0] for k in ("psnr", "ssim", "ms_ssim")}
        lines.append(f"{label} {name}: PSNR {v['psnr']:.2f} dB, SSIM {fmt(v['ssim'])}, MS-SSIM {fmt(v['ms_ssim'])}, "
                     f"round trip {t:.2f} s")
    ab, diff = _compare(a01, b01)
    lines.append(f"A vs B: PSNR {ab:.2f} dB, largest difference "
                 f"{'(not finite)' if diff is None else f'{diff}/255'} after 8-bit rounding")
    if not (bool(torch.isfinite(a01).all()) and bool(torch.isfinite(b01).all())):
        lines.append("warning: a round trip holds NaN/inf (shown as white in round_trips, bright in heat_map)")
    lines.append(f"heat map: |round trip − original| × {gain:g} (black = identical); {x.shape[-1]}x{x.shape[-2]} px, "
                 f"{x.shape[0]} image(s)")
    return pair, heat, "\n".join(lines)
