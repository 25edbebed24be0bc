"""The lab's inputs: images and clips found on disk, read, and cropped the same way for every VAE.

An *image* is ``[1, 3, H, W]`` in [-1, 1]; a *clip* is ``[1, 3, F, H, W]`` (a video file, ``.mp4``/``.webm``/
``.mov``/``.mkv`` through PyAV, or, with ``clips=True``, a folder of numbered frames; :mod:`vae_core.io.video`).
Clips go through video VAEs whole (their causal schedule) and through image VAEs frame by frame.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import VaeInputError
from ..io.video import VIDEO_SUFFIXES

__all__ = ["IMAGE_EXTENSIONS", "find_images", "is_clip", "load_input", "prepare_image", "prepare_input",
           "frames_of"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")


def find_images(paths: Sequence[os.PathLike | str], limit: int = 100_000, clips: bool = False) -> list[Path]:
    """Inputs among ``paths``: files as given (images, or video files), folders walked (links to folders not
    followed; links to files are read like files; sorted) for files with an :data:`IMAGE_EXTENSIONS` suffix, or,
    with ``clips``, each folder as one clip of numbered frames.

    Raises:
        VaeInputError: a path that does not exist, a folder with no images, or no paths.
    """
    out: list[Path] = []
    for given in paths:
        p = Path(given)
        if p.is_file():
            out.append(p)
        elif p.is_dir() and clips:
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
                                    f"{', '.join(IMAGE_EXTENSIONS)} (or --clips for a folder of numbered frames)")
            out += found
        else:
            raise VaeInputError(f"{p}: no such file or folder; expected an image or video file, or a folder")
    if not out:
        raise VaeInputError("no images given; expected one or more image files or folders")
    return out


def is_clip(path: Path, clips: bool = False) -> bool:
    """Whether ``path`` is read as a clip: a video file, or (``clips``) a folder."""
    return path.suffix.lower() in VIDEO_SUFFIXES or (clips and path.is_dir())


def load_input(path: Path, clips: bool = False) -> torch.Tensor:
    """``path`` → an image ``[1, 3, H, W]`` or a clip ``[1, 3, F, H, W]``, in [-1, 1].

    Raises:
        VaeInputError: an unreadable image or video, naming the path.
    """
    from ..io.images import load_image
    from ..io.video import load_video

    if is_clip(path, clips):
        return load_video(path)[0]
    return load_image(path)


def prepare_image(x: torch.Tensor, size: Optional[int], multiple: int) -> torch.Tensor:
    """``[N, 3, H, W]`` in [-1, 1] → the lab's input: with ``size``, the centre square of side ``min(H, W)`` resized
    to ``size × size`` (bicubic, antialiased; the model cards' protocol, e.g. COCO at 256²); then centre-cropped to
    multiples of ``multiple`` (the largest downscale factor of the VAEs compared).

    Raises:
        VaeInputError: ``size`` below ``multiple``, or an image smaller than ``multiple`` px.
    """
    if size is not None:
        if size < multiple:
            raise VaeInputError(f"--size {size}: expected at least {multiple} px (the VAEs' downscale factor)")
        h, w = x.shape[-2:]
        side = min(h, w)
        x = x[..., (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
        if side != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
    h, w = x.shape[-2] // multiple * multiple, x.shape[-1] // multiple * multiple
    if h == 0 or w == 0:
        raise VaeInputError(f"image of {x.shape[-1]}x{x.shape[-2]} px; expected sides of at least {multiple} px")
    y0, x0 = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., y0:y0 + h, x0:x0 + w].contiguous()


def prepare_input(x: torch.Tensor, size: Optional[int], multiple: int) -> torch.Tensor:
    """:func:`prepare_image` for an image, or for every frame of a clip ``[1, 3, F, H, W]`` alike."""
    if x.dim() == 4:
        return prepare_image(x, size, multiple)
    return prepare_image(x[0].transpose(0, 1), size, multiple).transpose(0, 1)[None].contiguous()


def frames_of(t: torch.Tensor) -> list[torch.Tensor]:
    """A clip ``[B, C, F, H, W]`` as its frames ``[B, C, H, W]``; an image as itself."""
    return [t[:, :, i] for i in range(t.shape[2])] if t.dim() == 5 else [t]
