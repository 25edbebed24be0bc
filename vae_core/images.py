"""Image and latent file helpers for the CLI and the benchmark (PIL and safetensors; no host)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .errors import VaeInputError

__all__ = ["load_image", "save_image", "psnr", "snr", "save_latent", "load_latent", "bundled_fixture"]

PathLike = Union[str, os.PathLike]


def bundled_fixture(name: str = "mini-vae-ldm.safetensors") -> Path:
    """Path of a file in the repository's ``tests/fixtures`` (the small trained test VAE and the sample photo)."""
    return Path(__file__).resolve().parent.parent / "tests" / "fixtures" / name


def load_image(path: PathLike) -> torch.Tensor:
    """An image file → float32 ``[1, 3, H, W]`` in [-1, 1] (alpha dropped, greyscale expanded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    except (OSError, UnidentifiedImageError) as exc:
        raise VaeInputError(f"{path}: not a readable image ({exc}); expected a PNG/JPEG/WebP file") from exc
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None] / 127.5 - 1.0


def save_image(images: torch.Tensor, path: PathLike) -> Path:
    """Float ``[1, 3, H, W]`` (or ``[3, H, W]``) about [-1, 1] → 8-bit PNG (clamped, rounded)."""
    from PIL import Image

    t = images[0] if images.ndim == 4 else images
    arr = ((t.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(out)
    return out


def psnr(a: torch.Tensor, b: torch.Tensor, peak_to_peak: float = 2.0) -> float:
    """PSNR in dB of ``b`` against ``a`` for signals with the given peak-to-peak range (2 for [-1, 1])."""
    mse = float((a.double() - b.double()).square().mean())
    return math.inf if mse == 0 else 10 * math.log10(peak_to_peak ** 2 / mse)


def snr(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-noise ratio in dB of ``test`` against ``ref`` (signal power = mean square of ``ref``)."""
    err = float((ref.double() - test.double()).square().mean())
    return math.inf if err == 0 else 10 * math.log10(float(ref.double().square().mean()) / err)


def save_latent(z: torch.Tensor, path: PathLike, metadata: Optional[dict[str, str]] = None) -> Path:
    from safetensors.torch import save_file

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latent": z.detach().float().cpu().contiguous()}, str(out), metadata=metadata or {})
    return out


def load_latent(path: PathLike) -> torch.Tensor:
    """A ``.safetensors`` latent file (key ``latent``, or its only tensor) → float32 ``[B, C, h, w]``."""
    from .formats import read_weights

    raw = read_weights(path)
    sd = raw.state_dict
    t = sd.get("latent", next(iter(sd.values())) if len(sd) == 1 else None)
    if t is None:
        raise VaeInputError(f"{path}: {len(sd)} tensors {sorted(sd)[:4]}; expected one tensor named 'latent'")
    t = t.float()
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise VaeInputError(f"{path}: latent of shape {tuple(t.shape)}; expected [B, C, h, w] or [C, h, w]")
    return t
