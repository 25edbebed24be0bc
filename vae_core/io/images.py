"""Image and latent file helpers for the CLI and the benchmark (PIL and safetensors; no host)."""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..errors import VaeInputError
from .atomic import atomic_write, save_safetensors

__all__ = ["load_image", "load_image_bytes", "save_image", "save_latent", "load_latent", "bundled_fixture",
           "image_format", "check_latent_output", "latent_metadata", "FLOAT_RANGE_TOLERANCE"]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: Float images (PIL mode ``F``) must hold values in [0, 1] up to this tolerance (then clamped); beyond it they are
#: refused, since they are not in a range this loader can map to [-1, 1] without guessing.
FLOAT_RANGE_TOLERANCE = 1e-3

#: PIL formats that register a saver which cannot write an RGB image here (stubs needing a plug-in, 1-bit only).
_NO_RGB_SAVE = {"BUFR", "GRIB", "HDF5", "WMF", "XBM", "MSP", "PALM"}


def bundled_fixture(name: str = "mini-vae-ldm.safetensors") -> Path:
    """Path of a file in the repository's ``tests/fixtures`` (the small trained test VAE and the sample photo).

    The file may be absent: ComfyUI registry installs leave ``tests/`` out (``.comfyignore``).
    """
    return Path(__file__).resolve().parents[2] / "tests" / "fixtures" / name


def _to_signed_rgb(im: "Image.Image", path: PathLike) -> np.ndarray:
    """A PIL image of any mode → float32 ``[H, W, 3]`` in [-1, 1] (see :func:`load_image` for the mapping)."""
    mode = im.mode
    if mode.startswith("I;16"):  # 16-bit greyscale, any byte order
        arr = np.asarray(im).astype(np.float32) / 32767.5 - 1.0
    elif mode == "I":  # 32-bit int: PIL's mode for some 16-bit greyscale files; read as 0..65535
        raw = np.asarray(im)
        lo, hi = int(raw.min()), int(raw.max())
        if lo < 0 or hi > 65535:
            raise VaeInputError(f"{path}: 32-bit integer image with values in [{lo}, {hi}]; expected 16-bit values "
                                "in [0, 65535]")
        arr = raw.astype(np.float32) / 32767.5 - 1.0
    elif mode == "F":  # 32-bit float: 0..1 is black..white
        arr = np.asarray(im).astype(np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -FLOAT_RANGE_TOLERANCE or hi > 1 + FLOAT_RANGE_TOLERANCE:
            raise VaeInputError(f"{path}: 32-bit float image with values in [{lo:.6g}, {hi:.6g}]; expected values in "
                                "[0, 1] (0 = black, 1 = white)")
        arr = np.clip(arr, 0.0, 1.0) * 2.0 - 1.0
    else:
        if mode not in ("RGB", "L"):
            # RGBA/LA/PA/P/1/CMYK/YCbCr/...: PIL's own conversion; alpha is dropped (not composited), so the colours
            # are the ones stored, like ComfyUI's Load Image, which splits alpha off as a mask.
            try:
                im = im.convert("RGB")
            except (ValueError, OSError) as exc:
                raise VaeInputError(f"{path}: image mode {mode!r} that PIL cannot convert to RGB ({exc}); expected an "
                                    "RGB, greyscale, palette, CMYK or 16-bit greyscale image") from exc
        # 8-bit: the same arithmetic as before (x / 127.5 - 1), so 8-bit results are bit-identical to earlier ones
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        if arr.ndim == 3:
            return arr
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return arr


def load_image(path: PathLike) -> torch.Tensor:
    """An image file → float32 ``[1, 3, H, W]`` in [-1, 1].

    * 8-bit modes (``RGB``, ``L``, ``P``, ``1``, ``CMYK``, ...): 0..255 → [-1, 1]; greyscale is repeated to 3
      channels; **alpha is dropped** (``RGBA``, ``LA``, ``PA``, transparent palettes), not composited.
    * 16-bit greyscale (``I;16``, ``I;16B``, and ``I`` as PIL reads some 16-bit files): 0..65535 → [-1, 1];
      ``I`` values outside [0, 65535] raise.
    * 32-bit float (``F``, e.g. float TIFF): 0..1 → [-1, 1]; values outside [0, 1] (± 1e-3) raise.
    * The EXIF orientation is applied (portraits come out upright); animated files give their first frame (a
      WARNING log line says so).

    Raises:
        VaeInputError: missing or unreadable file, unsupported mode or value range, or an image above PIL's
            decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, not raised here).
    """
    p = Path(path)
    if not p.exists():
        raise VaeInputError(f"{path}: no such file; expected an existing image file")
    if p.is_dir():
        raise VaeInputError(f"{path}: is a folder; expected an image file")
    return _decode(p, path)


def load_image_bytes(data: bytes, name: str) -> torch.Tensor:
    """:func:`load_image` of an image file's bytes (e.g. a member of a tar shard); ``name`` for messages."""
    import io

    return _decode(io.BytesIO(data), name)


def _decode(source: object, path: PathLike) -> torch.Tensor:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                frames = getattr(im, "n_frames", 1)
                if frames > 1:
                    im.seek(0)
                    log.warning("%s: animated image with %d frames; using the first frame only", path, frames)
                im.load()
                upright = ImageOps.exif_transpose(im)
                arr = _to_signed_rgb(upright, path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise VaeInputError(f"{path}: {exc}; expected an image within PIL's decompression-bomb limit of "
                            f"{Image.MAX_IMAGE_PIXELS} pixels") from exc
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        if isinstance(exc, VaeInputError):
            raise
        what = "no image format PIL identifies" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise VaeInputError(f"{path}: not a readable image ({what}); expected a PNG/JPEG/WebP/TIFF file") from exc
    if arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None]


def image_format(path: PathLike) -> str:
    """The PIL format that ``path``'s extension saves as (e.g. ``"PNG"``), checked before any work is done.

    Raises:
        VaeInputError: the extension is not one PIL can write an RGB image with.
    """
    from PIL import Image

    Image.init()
    ext = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE or fmt in _NO_RGB_SAVE:
        known = sorted(e for e, f in Image.registered_extensions().items() if f in Image.SAVE and f not in _NO_RGB_SAVE)
        raise VaeInputError(f"{path}: output extension {ext or '(none)'!r} is not an image format PIL can write; "
                            f"expected one of {', '.join(known[:12])}, ... (e.g. .png)")
    return fmt


def check_latent_output(path: PathLike) -> None:
    """Raise :class:`VaeInputError` unless ``path`` ends in ``.safetensors`` (the only latent format written)."""
    if Path(path).suffix.lower() != ".safetensors":
        raise VaeInputError(f"{path}: latent output extension {Path(path).suffix or '(none)'!r}; expected a "
                            "'.safetensors' file")


def save_image(images: torch.Tensor, path: PathLike) -> Path:
    """Float ``[1, 3, H, W]`` (or ``[3, H, W]``) about [-1, 1] → an 8-bit image file (clamped, rounded), in the
    format of ``path``'s extension, written atomically (temp file in the same folder, fsync, rename).

    Raises:
        VaeInputError: the extension is not a format PIL can write. OSError: the write failed (nothing is left).
    """
    from PIL import Image

    fmt = image_format(path)
    t = images[0] if images.ndim == 4 else images
    arr = ((t.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr)
    return atomic_write(out, lambda tmp: img.save(tmp, format=fmt))


def save_latent(z: torch.Tensor, path: PathLike, metadata: Optional[dict[str, str]] = None) -> Path:
    """Raw latents ``[B, C, h, w]`` → ``.safetensors`` (key ``latent``, float32, ``metadata`` as given), written
    atomically (temp file in the same folder, fsync, rename; nothing is left when it fails)."""
    check_latent_output(path)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_safetensors(out, {"latent": z.detach().float().cpu().contiguous()}, metadata or {})


def latent_metadata(path: PathLike) -> dict[str, str]:
    """The safetensors metadata of a latent file (``family``, ``scaling_factor``... as written by the CLI)."""
    from .formats import read_weights

    return dict(read_weights(path).metadata or {})


def latent_ndim(path: PathLike) -> Optional[int]:
    """The number of dimensions of a ``.safetensors`` latent file's tensor (``latent``, or its only one), read from
    the header alone; None when the file is not such a file (:func:`load_latent` then says what is wrong)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            key = "latent" if "latent" in keys else (keys[0] if len(keys) == 1 else None)
            return None if key is None else len(f.get_slice(key).get_shape())
    except Exception:  # noqa: BLE001 - anything unreadable is load_latent's to describe
        return None


def load_latent(path: PathLike) -> torch.Tensor:
    """A ``.safetensors`` latent file (key ``latent``, or its only tensor) → float32 ``[B, C, h, w]`` (a video's:
    ``[B, C, T, h, w]``)."""
    from .formats import read_weights

    raw = read_weights(path)
    sd = raw.state_dict
    t = sd.get("latent", next(iter(sd.values())) if len(sd) == 1 else None)
    if t is None:
        raise VaeInputError(f"{path}: {len(sd)} tensors {sorted(sd)[:4]}; expected one tensor named 'latent'")
    t = t.float()
    if t.ndim == 3:
        t = t[None]
    if t.ndim not in (4, 5):
        raise VaeInputError(f"{path}: latent of shape {tuple(t.shape)}; expected [B, C, h, w], [C, h, w] or a "
                            "video's [B, C, T, h, w]")
    return t
