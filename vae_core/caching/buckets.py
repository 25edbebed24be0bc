"""Aspect-ratio buckets, as LoRA trainers use them (kohya's scheme): resolutions of about a target area, sides from
``min_side`` to ``max_side`` in steps of ``step``; each image goes to the bucket whose aspect ratio differs least from
its own (kohya's choice, so an export's ``_WxH_`` is the bucket sd-scripts computes), is resized to cover it
(antialiased bicubic; sizes rounded as kohya rounds them) and cropped to it, centred or at a seeded random offset.

The crop is recorded as ``crop_box`` (left, top, right, bottom in the *resized* image) with the ``resized`` size;
the kohya exporter writes kohya's own ``crop_ltrb`` from the bucket and the original size. An image with a side
below the smallest bucket side is refused (not upscaled past what any bucket allows).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import VaeInputError

__all__ = ["BucketSpec", "buckets", "choose", "fit", "kohya_crop_ltrb"]


@dataclass(frozen=True)
class BucketSpec:
    """``resolution``: the target area is ``resolution²``; sides from ``min_side`` to ``max_side`` in ``step`` s
    (a multiple of the VAE's downscale); ``crop``: ``"center"`` or ``"random"`` (seeded per item by ``seed``)."""

    resolution: int = 1024
    min_side: int = 256
    max_side: int = 2048
    step: int = 64
    crop: str = "center"
    seed: int = 0

    def check(self, multiple: int) -> None:
        """Raise VaeInputError for settings that give no bucket or buckets the VAE cannot take."""
        if self.step <= 0 or self.step % multiple:
            raise VaeInputError(f"--bucket-step {self.step}; expected a positive multiple of {multiple} (the VAE's "
                                "downscale)")
        if not (0 < self.min_side <= self.resolution <= self.max_side):
            raise VaeInputError(f"buckets: min side {self.min_side}, resolution {self.resolution}, max side "
                                f"{self.max_side}; expected 0 < min ≤ resolution ≤ max")
        if self.min_side % self.step or self.max_side % self.step:
            raise VaeInputError(f"buckets: min/max side {self.min_side}/{self.max_side}; expected multiples of "
                                f"--bucket-step {self.step}")
        if self.crop not in ("center", "random"):
            raise VaeInputError(f"--crop {self.crop!r}; expected 'center' or 'random'")


def buckets(spec: BucketSpec) -> list[tuple[int, int]]:
    """Every bucket ``(width, height)``, sorted: the square nearest the target area, and for each width from
    ``min_side`` to ``max_side`` the largest height within the area (and its transpose)."""
    area, step = spec.resolution * spec.resolution, spec.step
    side = int(math.sqrt(area) // step) * step
    out = {(side, side)}
    for w in range(spec.min_side, spec.max_side + 1, step):
        h = min(spec.max_side, area // w // step * step)
        if h >= spec.min_side:
            out.add((w, h))
            out.add((h, w))
    return sorted(out)


def choose(spec: BucketSpec, width: int, height: int, name: str) -> tuple[int, int]:
    """The image's own size if it is a bucket, else the bucket whose aspect ratio differs least from
    ``width / height`` (the first such in sorted order), as kohya's bucket manager chooses.

    Raises:
        VaeInputError: a side below ``spec.min_side`` (naming the item and its size).
    """
    if width < spec.min_side or height < spec.min_side:
        raise VaeInputError(f"{name}: {width}x{height} px, below the smallest bucket side {spec.min_side}; expected "
                            "images at least that large (or a smaller --bucket-min-side)")
    table = buckets(spec)
    if (width, height) in table:
        return width, height
    ar = width / height
    return min(table, key=lambda b: abs(b[0] / b[1] - ar))


def kohya_crop_ltrb(bucket: tuple[int, int], original: tuple[int, int]) -> tuple[int, int, int, int]:
    """kohya's ``crop_ltrb`` for an image of ``original`` size in ``bucket``: the box the whole image would take,
    fitted inside the bucket and centred (what sd-scripts records with its latents)."""
    bw, bh = bucket
    ar = original[0] / original[1]
    rw, rh = (bh * ar, bh) if bw / bh > ar else (bw, bw / ar)
    left, top = (bw - rw) // 2, (bh - rh) // 2
    return int(left), int(top), int(left + rw), int(top + rh)


def _offset(spec: BucketSpec, key: str, span: int, axis: str) -> int:
    if span <= 0 or spec.crop == "center":
        return max(0, span) // 2
    digest = hashlib.sha256(f"{spec.seed}:{key}:{axis}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (span + 1)


def fit(x: torch.Tensor, bucket: tuple[int, int], spec: Optional[BucketSpec], key: str
        ) -> tuple[torch.Tensor, tuple[int, int, int, int], tuple[int, int]]:
    """Resize ``x`` (``[..., H, W]`` in [-1, 1], frames on the leading axes) to cover ``bucket`` and crop to it.

    Returns:
        ``(pixels [..., bucket_h, bucket_w], crop box (l, t, r, b) in the resized image, resized (w, h))``.
    """
    bw, bh = bucket
    h, w = x.shape[-2:]
    if spec is None:  # no buckets: crop to the bucket (the image floored to the VAE's multiple), no resize
        rw, rh, y = w, h, x
    else:
        scale = bh / h if w / h > bw / bh else bw / w  # cover the bucket, as kohya scales
        rw, rh = max(bw, int(w * scale + 0.5)), max(bh, int(h * scale + 0.5))
        lead = x.shape[:-3]
        flat = x.reshape(-1, *x.shape[-3:])
        y = F.interpolate(flat, size=(rh, rw), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
        y = y.reshape(*lead, *y.shape[-3:])
    left = _offset(spec or BucketSpec(), key, rw - bw, "x")
    top = _offset(spec or BucketSpec(), key, rh - bh, "y")
    return y[..., top:top + bh, left:left + bw].contiguous(), (left, top, left + bw, top + bh), (rw, rh)
