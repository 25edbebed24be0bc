"""What a latent cache is made from: the items of a dataset, found deterministically, read as bytes, decoded.

``DATA`` arguments are folders (walked, links to folders not followed), file lists (``.txt``: one path a line,
relative to the list's folder; blank lines and ``#`` comments skipped), webdataset tar shards (``.tar``: every
member with an image suffix is an item) or single image / video files. Every item gets a *name* that is stable
across runs and machines (folder: ``<folder name>/<relative path>``; list: the path as listed; tar:
``<tar name>/<member>``; file: its name), and items are ordered by name, so every process of a distributed run
sees the same list.

Tensors: images ``[1, 3, H, W]``, videos ``[1, 3, F, H, W]``, float32 in [-1, 1].
"""
from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import VaeInputError
from ..io.images import load_image_bytes
from ..io.video import VIDEO_SUFFIXES, load_video

__all__ = ["Item", "IMAGE_SUFFIXES", "find_items", "read_bytes", "decode", "image_size"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
#: more items than this in one run is refused before any work (a file list pointing at the wrong tree)
MAX_ITEMS = 50_000_000


@dataclass(frozen=True)
class Item:
    """One dataset item: ``name`` (stable, unique), the ``path`` it is read from and, for a tar shard, the
    ``member``; ``video`` for video files; ``rel`` its path inside its source (folder-relative path, the list's
    entry, the tar member), where exporters put its files."""

    name: str
    path: Path
    member: Optional[str] = None
    video: bool = False
    rel: str = ""


def _kind(name: str) -> Optional[str]:
    suffix = os.path.splitext(name)[1].lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    return None


def _from_folder(folder: Path) -> list[Item]:
    def unreadable(exc: OSError) -> None:
        raise VaeInputError(f"{exc.filename}: a folder that cannot be read ({exc.strerror}); expected every folder "
                            f"of {folder} readable")

    out = []
    for root, dirs, files in os.walk(folder, onerror=unreadable):
        dirs.sort()
        for f in sorted(files):
            kind = _kind(f)
            if kind is not None and not f.startswith("."):
                rel = (Path(root) / f).relative_to(folder).as_posix()
                out.append(Item(f"{folder.resolve().name}/{rel}", Path(root) / f, video=kind == "video", rel=rel))
    return out


def _from_list(listing: Path) -> list[Item]:
    out = []
    try:
        text = listing.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise VaeInputError(f"{listing}: not UTF-8 text ({exc.reason} at byte {exc.start}); expected a file list, "
                            "one path per line, in UTF-8") from None
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        p = Path(entry) if Path(entry).is_absolute() else listing.parent / entry
        kind = _kind(entry)
        if kind is None:
            raise VaeInputError(f"{listing}:{number}: {entry!r}; expected an image ({', '.join(IMAGE_SUFFIXES)}) or "
                                f"video ({', '.join(sorted(VIDEO_SUFFIXES))}) path")
        out.append(Item(Path(entry).as_posix(), p, video=kind == "video", rel=Path(entry).as_posix()))
    return out


def _from_tar(shard: Path) -> list[Item]:
    try:
        with tarfile.open(shard) as tar:
            members = [m.name for m in tar.getmembers() if m.isfile()]
    except (tarfile.TarError, OSError) as exc:
        raise VaeInputError(f"{shard}: not a readable tar shard ({exc}); expected a webdataset-style .tar") from exc
    return [Item(f"{shard.name}/{m}", shard, member=m, rel=m) for m in sorted(members) if _kind(m) == "image"]


def find_items(data: Sequence[os.PathLike | str]) -> list[Item]:
    """Every item of ``data`` (see the module docstring), ordered by name.

    Raises:
        VaeInputError: a path that does not exist, an unreadable list or shard, nothing found, or two items with
            the same name (naming both).
    """
    if not data:
        raise VaeInputError("no DATA given; expected image/video folders, file lists (.txt) or tar shards")
    items: list[Item] = []
    seen: set[Path] = set()
    for given in data:
        p = Path(given)
        if p.resolve() in seen:  # the same DATA given twice: once
            continue
        seen.add(p.resolve())
        if p.is_dir():
            items += _from_folder(p)
        elif p.suffix.lower() == ".txt" and p.is_file():
            items += _from_list(p)
        elif p.suffix.lower() == ".tar" and p.is_file():
            items += _from_tar(p)
        elif p.is_file() and _kind(p.name) is not None:
            items.append(Item(p.name, p, video=_kind(p.name) == "video", rel=p.name))
        elif p.exists():
            raise VaeInputError(f"{p}: not a folder, file list (.txt), tar shard (.tar), image or video file")
        else:
            raise VaeInputError(f"{p}: no such file or folder; expected a dataset folder, list or shard")
        if len(items) > MAX_ITEMS:
            raise VaeInputError(f"{p}: more than {MAX_ITEMS} items; expected a smaller dataset per run")
    if not items:
        raise VaeInputError(f"no images or videos found in {', '.join(map(str, data))}")
    items.sort(key=lambda i: i.name)
    for a, b in zip(items, items[1:]):
        if a.name == b.name:
            raise VaeInputError(f"two items named {a.name!r} ({a.path} and {b.path}); expected unique names (give "
                                "folders of different names, or one list)")
    return items


class _TarCache:
    """The last tar shard opened by this process (items come sorted by name, so a shard's items come together)."""

    path: Optional[Path] = None
    tar: Optional[tarfile.TarFile] = None

    @classmethod
    def member(cls, path: Path, member: str) -> bytes:
        if cls.path != path:
            if cls.tar is not None:
                cls.tar.close()
            cls.tar, cls.path = tarfile.open(path), path
        assert cls.tar is not None
        f = cls.tar.extractfile(member)
        if f is None:
            raise VaeInputError(f"{path}: member {member!r} is not a file")
        return f.read()


def read_bytes(item: Item) -> bytes:
    """The item's bytes (a file's, or a tar member's).

    Raises:
        VaeInputError: unreadable, naming the item.
    """
    try:
        if item.member is not None:
            return _TarCache.member(item.path, item.member)
        return item.path.read_bytes()
    except (OSError, tarfile.TarError, KeyError) as exc:
        raise VaeInputError(f"{item.name}: not readable ({exc})") from exc


def decode(item: Item, data: bytes) -> torch.Tensor:
    """The item's pixels: ``[1, 3, H, W]`` (images) or ``[1, 3, F, H, W]`` (videos), in [-1, 1].

    Raises:
        VaeInputError: undecodable, truncated, a decompression bomb (PIL's limit), naming the item.
    """
    if item.video:
        return load_video(item.path)[0]
    return load_image_bytes(data, item.name)


def exif_turned(item: Item, data: bytes) -> bool:
    """Whether an image's EXIF orientation turns it by 90° (5-8): its pixels are cached upright, so its stored
    width and height are swapped against the upright size (False for videos and unreadable headers)."""
    if item.video:
        return False
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 - image_size/decode report unreadable files
        return False


def image_size(item: Item, data: bytes) -> tuple[int, int]:
    """``(width, height)`` of an image item from its header (no full decode); videos are decoded.

    Raises:
        VaeInputError: as :func:`decode`.
    """
    if item.video:
        x = decode(item, data)
        return x.shape[-1], x.shape[-2]
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                return (h, w) if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)  # EXIF: turned 90°
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise VaeInputError(f"{item.name}: {exc}; expected an image within PIL's decompression-bomb limit of "
                            f"{Image.MAX_IMAGE_PIXELS} pixels") from exc
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        what = "no image format PIL identifies" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise VaeInputError(f"{item.name}: not a readable image ({what})") from exc
