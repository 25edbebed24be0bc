"""Videos on disk: folders of numbered image frames (no extra dependency) and video files through PyAV (the library
ComfyUI itself uses for video; an optional extra: ``pip install av``, or ``pip install .[video]``).

Tensors are ``[1, 3, F, H, W]`` float32 in [-1, 1]. Reading refuses, before any work and naming the path: a frame
folder with a gap in its numbering, mixed frame sizes or no frames; a video file that cannot be decoded, has no video
stream, or has a variable frame rate (frames would be silently re-timed). Writing is atomic: a frame folder is filled
under a hidden temporary name and renamed into place, a video file is written to a temporary file and renamed, so a
failed call leaves nothing behind.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
from fractions import Fraction
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..errors import VaeInputError
from .atomic import atomic_write
from .images import load_image, save_image

__all__ = ["VIDEO_SUFFIXES", "is_video_path", "load_video", "save_video", "need_pyav", "DEFAULT_FPS"]

PathLike = Union[str, os.PathLike]
#: video containers read and written through PyAV, and the codec each is written with
VIDEO_SUFFIXES = {".mp4": "libx264", ".mov": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9"}
#: the frame rate written when neither ``--fps`` nor the source says one (Wan's native 16 fps)
DEFAULT_FPS = 16.0
_FRAME_EXT = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}
_EXTRA = "reading and writing video files needs PyAV: pip install av (or pip install .[video] in the pack's folder)"


def is_video_path(path: PathLike, output: bool = False) -> bool:
    """Whether ``path`` names a video: a video file suffix, or a folder (an existing one when reading; for an
    output, a path without a suffix)."""
    p = Path(path)
    if p.suffix.lower() in VIDEO_SUFFIXES:
        return True
    return (p.is_dir() or (not p.exists() and p.suffix == "")) if output else p.is_dir()


def need_pyav(path: PathLike):
    """PyAV's module, or VaeInputError naming ``path`` and how to install it."""
    try:
        import av
    except ImportError as exc:
        raise VaeInputError(f"{path}: a video file, but {_EXTRA}; or use a folder of numbered PNG frames") from exc
    return av


def _frame_number(name: str) -> Optional[int]:
    found = re.findall(r"\d+", Path(name).stem)
    return int(found[-1]) if found else None


def _load_folder(folder: Path) -> torch.Tensor:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _FRAME_EXT and not p.name.startswith("."))
    if not files:
        raise VaeInputError(f"{folder}: a folder without image frames; expected numbered frames such as 00000.png")
    numbered = {}
    for f in files:
        n = _frame_number(f.name)
        if n is None:
            raise VaeInputError(f"{f}: a frame without a number in its name; expected numbered frames (00000.png...)")
        if n in numbered:
            raise VaeInputError(f"{f}: frame number {n} twice (also {numbered[n].name}); expected one file per frame")
        numbered[n] = f
    first, last = min(numbered), max(numbered)
    missing = [n for n in range(first, last + 1) if n not in numbered]
    if missing:
        raise VaeInputError(f"{folder}: frames {first}..{last} with {len(missing)} missing (first: {missing[0]}); "
                            "expected consecutive frame numbers")
    frames = []
    for n in range(first, last + 1):
        x = load_image(numbered[n])
        if frames and x.shape != frames[0].shape:
            raise VaeInputError(f"{numbered[n]}: frame of {x.shape[3]}x{x.shape[2]} px; expected "
                                f"{frames[0].shape[3]}x{frames[0].shape[2]} like {numbered[first].name}")
        frames.append(x)
    return torch.stack(frames, 2)


def _load_file(path: Path) -> tuple[torch.Tensor, float]:
    av = need_pyav(path)
    if not path.is_file():
        raise VaeInputError(f"{path}: no such file; expected an existing video file")
    try:
        with av.open(str(path)) as box:
            if not box.streams.video:
                raise VaeInputError(f"{path}: no video stream; expected a video file")
            stream = box.streams.video[0]
            frames, stamps = [], []
            for frame in box.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                stamps.append(frame.pts)
            rate = stream.average_rate
    except VaeInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - PyAV raises its own error types for broken files
        raise VaeInputError(f"{path}: not a readable video ({type(exc).__name__}: {exc}); expected an "
                            "mp4/webm/mov/mkv file") from exc
    if not frames:
        raise VaeInputError(f"{path}: no decodable frames; expected a video with frames")
    steps = {b - a for a, b in zip(stamps, stamps[1:]) if a is not None and b is not None}
    if len(steps) > 1:
        raise VaeInputError(f"{path}: variable frame rate (frame intervals {sorted(steps)[:4]} in stream ticks); "
                            "expected a constant frame rate (re-encode it, e.g. ffmpeg -vsync cfr, or export frames)")
    arr = np.stack(frames).astype(np.float32) / 127.5 - 1.0  # [F, H, W, 3]
    return torch.from_numpy(arr).permute(3, 0, 1, 2)[None].contiguous(), float(rate or DEFAULT_FPS)


def load_video(path: PathLike) -> tuple[torch.Tensor, Optional[float]]:
    """A frame folder or video file → ``([1, 3, F, H, W]`` in [-1, 1], frames per second or None for a folder).

    Raises:
        VaeInputError: as the module docstring lists, naming the path.
    """
    p = Path(path)
    if p.is_dir():
        return _load_folder(p), None
    if p.suffix.lower() in VIDEO_SUFFIXES:
        return _load_file(p)
    raise VaeInputError(f"{path}: not a video; expected a folder of numbered frames or one of "
                        f"{sorted(VIDEO_SUFFIXES)}")


def _save_folder(video: torch.Tensor, folder: Path) -> Path:
    if folder.exists() and any(folder.iterdir()):
        raise VaeInputError(f"{folder}: an existing folder with files in it; expected a new or empty folder for "
                            "the frames")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{secrets.token_hex(4)}.tmp")
    tmp.mkdir()
    try:
        digits = max(5, len(str(video.shape[2] - 1)))
        for i in range(video.shape[2]):
            save_image(video[:, :, i], tmp / f"{i:0{digits}d}.png")
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _save_file(video: torch.Tensor, path: Path, fps: float) -> Path:
    av = need_pyav(path)
    frames = ((video[0].detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    frames = frames.permute(1, 2, 3, 0).numpy()  # [F, H, W, 3]
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
        raise VaeInputError(f"{path}: frames of {w}x{h} px; expected even sides for yuv420p video (or write a frame "
                            "folder)")
    codec = VIDEO_SUFFIXES[path.suffix.lower()]
    container = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm"}[path.suffix.lower()]

    def write(tmp: Path) -> None:
        with av.open(str(tmp), "w", format=container) as box:
            stream = box.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": "12"}
            for arr in frames:
                box.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")))
            box.mux(stream.encode(None))

    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, write)


def save_video(video: torch.Tensor, path: PathLike, fps: Optional[float] = None) -> Path:
    """``[1, 3, F, H, W]`` about [-1, 1] → a frame folder (numbered PNGs) or a video file (by suffix), atomically.

    Raises:
        VaeInputError: an unknown suffix, an existing non-empty folder, odd sides for a video file, no PyAV.
        OSError: the write failed (nothing is left).
    """
    p = Path(path)
    if video.ndim != 5 or video.shape[0] != 1:
        raise VaeInputError(f"{path}: a video of shape {tuple(video.shape)}; expected [1, 3, F, H, W]")
    if p.suffix.lower() in VIDEO_SUFFIXES:
        return _save_file(video, p, fps or DEFAULT_FPS)
    if p.suffix:
        raise VaeInputError(f"{path}: a video output with suffix {p.suffix!r}; expected a folder (no suffix) or one "
                            f"of {sorted(VIDEO_SUFFIXES)}")
    return _save_folder(video, p)
