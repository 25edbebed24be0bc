"""The :class:`Vae` object every host, the CLI and the benchmark use: validated encode/decode with tiling, the OOM
fallback, the NaN guard and precision handling around one family's network (``vae.family``: the
:class:`~vae_core.families.base.Family` that built it, asked for everything family-specific)."""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Union

import torch

from . import engine, tiling
from .devices import check_available
from .errors import VaeInputError
from .families.base import Family
from .families.registry import for_model
from .precision.dtypes import DTYPE_NAMES, resolve_dtype
from .precision.guard import GuardState, guarded

__all__ = ["Vae", "VaeInfo", "ENCODE_RANGE_LIMIT"]

log = logging.getLogger(__name__)

#: ``Vae.encode`` refuses images with any value above this or below its negative: pixels in [0, 255] (or 0..1
#: images shifted wrongly beyond it) are a caller bug that silently gives garbage latents. The margin beyond [-1, 1]
#: keeps legitimate slight overshoot (bicubic/Lanczos resampling, sharpening) working.
ENCODE_RANGE_LIMIT = 2.0


@dataclass
class VaeInfo:
    """What was loaded and where each fact came from.

    Attributes:
        path: the file or folder given; ``weights_file`` the file the tensors came from.
        container: ``safetensors`` | ``pickle`` | ``diffusers-folder`` | ``state dict``.
        layout: key layout found, ``ldm`` or ``diffusers``; ``prefix`` the stripped full-checkpoint prefix.
        family: the latent family: ``sd1`` | ``sdxl`` | ``sd3`` | ``flux`` | ``flux2`` | ``qwen-image`` | ``taesd`` |
            ... | ``custom`` (the network's family is ``Vae.family.name``: ``kl``, ``wan``, ``tiny``).
        latent_channels, scaling_factor, shift_factor: latent format (decode input = z / scale + shift).
        stored_dtype: dtype(s) of the tensors in the file; ``parameters``: parameter count.
        sources: where family/scaling/shift came from.
        fp16_fix: peaks before/after when :func:`make_fp16_safe` was applied, else None.
    """

    path: str
    container: str
    layout: str
    prefix: str
    family: str
    latent_channels: int
    scaling_factor: float
    shift_factor: Optional[float]
    stored_dtype: str
    parameters: int
    config: Any
    sources: dict[str, str] = field(default_factory=dict)
    weights_file: str = ""
    fp16_fix: Optional[dict[str, float]] = None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["config"] = asdict(self.config)
        return d


class Vae:
    """A loaded VAE: ``model`` (a family's network), ``info`` (what was loaded, :class:`VaeInfo`), ``family`` (the
    :class:`~vae_core.families.base.Family` of ``model``) and ``guard`` (the NaN guard's memory).

    ``encode``: images ``[B, 3, H, W]`` in [-1, 1] → raw (unscaled) posterior means ``[B, C, H//8, W//8]``.
    ``decode``: raw latents ``[B, C, h, w]`` → images ``[B, 3, 8h, 8w]``, about [-1, 1], not clamped.
    Both return float32 on the model's device, check every output element for NaN/inf and retry in a wider dtype
    (bf16 where supported, then fp32) remembering what worked, and take ``tile=`` (None, ``"auto"`` or image px),
    ``mode=`` (``"exact"`` or ``"fast"``), ``cache_bytes=`` (``"auto"`` or an int: the tiled engine's checkpoint
    budget, see :mod:`vae_core.tiling.cache`) and ``report=`` (a :class:`~vae_core.tiling.TileReport` to fill in).
    """

    def __init__(self, model: torch.nn.Module, info: VaeInfo) -> None:
        self.model = model
        self.info = info
        self.guard = GuardState()

    @property
    def family(self) -> Family:
        """The family of :attr:`model` (``kl``, ``wan``, ``tiny``): its latent format, fp16 fix and tiling plan."""
        return for_model(self.model)

    # -- placement -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, *args: Union[str, torch.device, torch.dtype, int, torch.Tensor],
           device: Union[str, torch.device, int, None] = None,
           dtype: Union[str, torch.dtype, None] = None) -> "Vae":
        """Move/cast in place and return self; accepts what ``nn.Module.to`` accepts plus the pack's dtype strings.

        ``vae.to("cuda")``, ``vae.to(torch.float16)``, ``vae.to("cuda", torch.float16)``, ``vae.to("fp16")``,
        ``vae.to(torch.device("cpu"))``, ``vae.to(tensor)`` (its device and dtype), ``vae.to(device=..., dtype=...)``.
        A string is a dtype when it is one of :data:`~vae_core.precision.dtypes.DTYPE_NAMES` (``"fp16"``, ``"bf16"``,
        ``"fp32"``, ``"float16"``, ..., ``"auto"``: bf16 where supported, fp16 with the fp16 fix on CUDA without
        bf16, fp32 on CPU) and a device otherwise (``"cpu"``, ``"cuda:0"``).

        The NaN guard's memory (the dtype that worked after a fallback) survives device moves; it is reset only when
        a dtype different from the current one is asked for.

        Raises:
            VaeInputError (a ValueError): an argument that is neither a device nor a dtype, or two of one kind.
        """
        for arg in args:
            is_dtype = isinstance(arg, torch.dtype) or (isinstance(arg, str) and arg.strip().lower().removeprefix(
                "torch.") in DTYPE_NAMES)
            if isinstance(arg, torch.Tensor):
                if device is not None or dtype is not None:
                    raise VaeInputError(f"Vae.to{args}: a tensor together with a device/dtype; expected one of them")
                device, dtype = arg.device, (arg.dtype if arg.is_floating_point() else None)
            elif is_dtype:
                if dtype is not None:
                    raise VaeInputError(f"Vae.to{args}: two dtypes ({dtype!r}, {arg!r}); expected at most one")
                dtype = arg  # type: ignore[assignment]
            elif isinstance(arg, (str, torch.device, int)) and not isinstance(arg, bool):
                if device is not None:
                    raise VaeInputError(f"Vae.to{args}: two devices ({device!r}, {arg!r}); expected at most one")
                device = arg
            else:
                raise VaeInputError(f"Vae.to: argument {arg!r} ({type(arg).__name__}); expected a device ('cpu', "
                                    f"'cuda:0', torch.device) or a dtype ({', '.join(DTYPE_NAMES)}, torch.dtype)")
        if device is not None:
            try:
                dev = torch.device(device)
            except (RuntimeError, TypeError, ValueError) as exc:
                raise VaeInputError(f"Vae.to: device {device!r} is not a device ({exc}); expected e.g. 'cpu', "
                                    f"'cuda:0', a torch.device, or a dtype among {', '.join(DTYPE_NAMES)}") from exc
            check_available(dev, "Vae.to: device")
            self.model.to(device=dev)
        if dtype is not None:
            target, needs_fix = resolve_dtype(dtype, self.device)
            if needs_fix and self.info.fp16_fix is None and self.family.fp16_fix is not None:
                self._apply_fix(None)
            if target != self.dtype:
                self.guard.working_dtype = None  # the user asked for another precision: forget the fallback
                self.guard.cast(self.model, target, keep=False)  # from the loaded weights if a retry rounded them
        return self

    def _apply_fix(self, sample: Optional[torch.Tensor]) -> None:
        fix = self.family.fp16_fix
        if fix is None:
            raise VaeInputError(f"fp16 fix for a {type(self.model).__name__} ({self.info.family}): the fix rescales "
                                "a GroupNorm- or RMS-norm-normalised residual stream; expected an AutoencoderKL or "
                                f"Qwen-Image's VAE ({self.family.no_fp16_fix})")
        dtype = self.dtype
        source = self.model
        if self.guard.pristine is not None:  # fix the weights as loaded, not a NaN guard retry's rounded copy
            source = copy.deepcopy(self.model)
            GuardState(pristine=self.guard.pristine).cast(source, torch.float32)
        fixed, before, after = fix(source, sample)
        self.model = fixed.to(dtype=dtype)
        self.guard.pristine = None  # the fixed weights are this VAE's weights now
        self.info.fp16_fix = {"peak_before": before, "peak_after": after}
        log.info("fp16 fix: largest activation %.4g -> %.4g", before, after)

    def clone(self) -> "Vae":
        """An independent copy (weights, info); the NaN guard starts afresh but keeps the loaded weights it holds."""
        new = Vae(copy.deepcopy(self.model), copy.deepcopy(self.info))
        new.guard.pristine = self.guard.pristine  # never written in place: shared safely
        return new

    # -- latent scaling --------------------------------------------------------------------------------------
    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents → diffusion-model space: ``(z - shift) * scale``; for Flux.2 (``config.latent_bn``) the
        latents patchified 2×2 and standardised by the VAE's BatchNorm statistics: ``[B, C, h, w]`` →
        ``[B, 4C, h/2, w/2]``; for Qwen-Image per-channel ``(z - latents_mean) / latents_std``."""
        return self.family.scale_latents(self.model, self.info, z)

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion-model space → raw latents: ``z / scale + shift``; for Flux.2 the inverse of the BatchNorm
        standardisation and patchify (``[B, 4C, h, w]`` → ``[B, C, 2h, 2w]``)."""
        return self.family.unscale_latents(self.model, self.info, z)

    # -- encode / decode -------------------------------------------------------------------------------------
    def _check(self, t: object, name: str, channels: int, min_side: int) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise VaeInputError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        video = self.family.video
        if t.ndim not in ((4, 5) if video else (4,)) or t.shape[1] != channels:
            raise VaeInputError(f"{name}: shape {tuple(t.shape)}; expected [B, {channels}, H, W]"
                                + (f" (an image) or [B, {channels}, T, H, W] (a video)" if video else ""))
        if not t.is_floating_point():
            raise VaeInputError(f"{name}: dtype {t.dtype}; expected a floating-point tensor")
        if t.shape[0] == 0 or t.shape[-2] < min_side or t.shape[-1] < min_side or (t.ndim == 5 and t.shape[2] == 0):
            raise VaeInputError(f"{name}: shape {tuple(t.shape)}; expected a non-empty batch and sides ≥ {min_side}"
                                + (" and at least one frame" if t.ndim == 5 else ""))
        kind = "encode" if name.startswith("encode") else "decode"
        self.family.check_sides(self.model, t, kind)
        if t.ndim == 5:
            self.family.check_video(self.model, t, kind)
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise VaeInputError(f"{name}: {bad} of {t.numel()} values are NaN/inf; expected finite values (the "
                                "input is broken before the VAE, e.g. NaN latents from the sampler)")
        return t

    @staticmethod
    def _check_range(x: torch.Tensor) -> None:
        lo, hi = float(x.min()), float(x.max())
        if hi > ENCODE_RANGE_LIMIT or lo < -ENCODE_RANGE_LIMIT:
            raise VaeInputError(f"encode input: values in [{lo:.4g}, {hi:.4g}]; expected images in [-1, 1] (values "
                                f"beyond ±{ENCODE_RANGE_LIMIT:g} are refused: 0..255 pixels must be divided by 127.5 "
                                "and shifted by -1 first)")

    def _call(self, what: str, t: torch.Tensor, fn: Callable[[torch.nn.Module, torch.Tensor, tiling.TileOptions],
              torch.Tensor], opts: tiling.TileOptions) -> torch.Tensor:
        base = self.guard.working_dtype or self.dtype

        def run(dtype: torch.dtype) -> torch.Tensor:
            if self.dtype != dtype:
                self.guard.cast(self.model, dtype)
            with torch.inference_mode():
                return fn(self.model, t.to(self.device, dtype), opts)

        def describe() -> str:
            return f"{what} input range [{float(t.min()):.4g}, {float(t.max()):.4g}], shape {tuple(t.shape)}"

        out, used = guarded(run, base, self.device, self.guard, f"VAE {what}", describe)
        if used != base:
            self.guard.working_dtype = used
        return out.float()

    def encode(self, x: torch.Tensor, tile: tiling.TileArg = None, mode: str = "exact",
               progress: Optional[tiling.Progress] = None, cancel: Optional[Callable[[], object]] = None,
               cache_bytes: tiling.CacheArg = "auto", report: Optional[tiling.TileReport] = None,
               schedule: str = "auto") -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [-1, 1] (H, W ≥ 8; not multiples of 8 are floored like the reference) →
        raw posterior means ``[B, C, H//8, W//8]`` float32. Video families (Wan) also take videos
        ``[B, 3, 1 + 4k, H, W]`` → ``[B, C, 1 + k, H/f, W/f]``; ``tile`` is then the spatial tile (exact in space and
        time, see :mod:`vae_core.tiling.stream`) and ``schedule`` (videos only) ``"level"`` (least compute),
        ``"tile"`` (least memory) or ``"auto"`` (level-major where it fits).

        Raises:
            VaeInputError: wrong shape/dtype, NaN/inf, or values beyond ±:data:`ENCODE_RANGE_LIMIT` (e.g. 0..255
                pixels; slight overshoot past [-1, 1] from resampling is accepted as is).
        """
        x = self._check(x, "encode input", self.model.config.in_channels, self.model.config.downscale)
        self._check_range(x)
        opts = tiling.TileOptions(tile=tile, mode=mode, progress=progress, cancel=cancel, cache_bytes=cache_bytes,
                                  report=report, schedule=schedule)
        return self._call("encode", x, engine.encode, opts)

    def posterior(self, x: torch.Tensor, tile: tiling.TileArg = None, mode: str = "exact",
                  progress: Optional[tiling.Progress] = None, cancel: Optional[Callable[[], object]] = None,
                  cache_bytes: tiling.CacheArg = "auto", report: Optional[tiling.TileReport] = None,
                  schedule: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode`, returning the posterior's raw mean and log-variance (float32, each ``[B, C, ...]``), e.g.
        to draw a sample ``mean + exp(logvar / 2) · ε`` (diffusers clamps the log-variance to [-30, 20] first).

        Raises:
            VaeInputError: as :meth:`encode`, or a deterministic encoder (the tiny autoencoders).
        """
        if self.family.deterministic:
            raise VaeInputError(f"the posterior of {self.family.label}: it encodes deterministically (no log-variance "
                                "to sample from); expected the mean (encode)")
        x = self._check(x, "encode input", self.model.config.in_channels, self.model.config.downscale)
        self._check_range(x)
        opts = tiling.TileOptions(tile=tile, mode=mode, progress=progress, cancel=cancel, cache_bytes=cache_bytes,
                                  report=report, schedule=schedule, moments=True)
        moments = self._call("encode", x, engine.encode, opts)
        c = moments.shape[1] // 2
        return moments[:, :c], moments[:, c:]

    def decode(self, z: torch.Tensor, tile: tiling.TileArg = None, mode: str = "exact",
               progress: Optional[tiling.Progress] = None, cancel: Optional[Callable[[], object]] = None,
               cache_bytes: tiling.CacheArg = "auto", report: Optional[tiling.TileReport] = None,
               schedule: str = "auto") -> torch.Tensor:
        """Raw latents ``[B, C, h, w]`` → images ``[B, 3, 8h, 8w]`` float32, about [-1, 1] (not clamped). Video
        families: ``[B, C, T, h, w]`` → ``[B, 3, 1 + ft·(T − 1), f·h, f·w]`` (``ft`` 4, LTX 8; Wan clamps to
        [-1, 1], as its reference does; LTX's timestep-conditioned decoders mix in noise drawn from seed 0);
        ``schedule`` as in :meth:`encode`."""
        z = self._check(z, "decode input", self.info.latent_channels, 1)
        opts = tiling.TileOptions(tile=tile, mode=mode, progress=progress, cancel=cancel, cache_bytes=cache_bytes,
                                  report=report, schedule=schedule)
        return self._call("decode", z, engine.decode, opts)

    def __repr__(self) -> str:
        i = self.info
        return (f"Vae({i.family}, {i.latent_channels}ch, {i.layout}/{i.container}, {str(self.dtype)[6:]} on "
                f"{self.device}, path={i.path!r})")


def make_fp16_safe(vae: Vae, sample: Optional[torch.Tensor] = None) -> Vae:
    """A new :class:`Vae` whose residual stream is rescaled so fp16 does not overflow; outputs unchanged.

    Args:
        vae: any loaded VAE (left untouched).
        sample: calibration images ``[B, 3, H, W]`` in [-1, 1]; a built-in high-contrast synthetic image if None.
    Returns:
        a Vae in ``vae``'s dtype and device; ``info.fp16_fix`` holds the largest activation before and after.
    """
    if sample is not None:
        cfg = vae.model.config
        sample = vae._check(sample, "make_fp16_safe sample", cfg.in_channels, cfg.downscale)
        lo, hi = float(sample.min()), float(sample.max())
        if hi > ENCODE_RANGE_LIMIT or lo < -ENCODE_RANGE_LIMIT:
            raise VaeInputError(f"make_fp16_safe sample: values in [{lo:.4g}, {hi:.4g}]; expected calibration images "
                                "in [-1, 1]")
    new = Vae(vae.model, copy.deepcopy(vae.info))
    new.guard.pristine = vae.guard.pristine  # the weights as loaded, if a NaN guard retry rounded vae's
    new._apply_fix(sample)
    return new
