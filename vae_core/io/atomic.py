"""Atomic file writes and "is this the same file?" checks, for everything vae_core writes.

Stable API (the CLI imports both):

* ``atomic_write(path: str | PathLike, write: Callable[[Path], None]) -> Path``
* ``same_file(a: str | PathLike, b: str | PathLike) -> bool``
* ``save_safetensors(path, tensors, metadata=None) -> Path``: atomic, and safetensors' own I/O errors (a full disk
  during serialisation) raised as the ``OSError`` they are, with their errno.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

__all__ = ["atomic_write", "same_file", "save_safetensors"]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file or folder, through symlinks and hardlinks too.

    Two existing paths are compared with :func:`os.path.samefile` (device and inode, so hardlinks match); otherwise
    their resolved (symlinks followed), case-normalised absolute paths are compared.
    """
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def _temp_name(path: Path) -> Path:
    # hidden, in the same folder (same filesystem: os.replace is atomic); the real suffix is kept for writers that
    # choose the format from the name (save_vae does)
    return path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")


def _fsync_path(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:  # not every platform can open a folder
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Write ``path`` all at once, or not at all.

    ``write(tmp)`` must create and fill the file ``tmp`` (a hidden name in ``path``'s folder with ``path``'s
    suffix). It is then fsynced, given the permission bits of the file it replaces (a new file keeps the mode its
    writer created it with, i.e. the umask default — never a mkstemp-style 0600), moved over ``path`` with
    :func:`os.replace`, and the folder is fsynced. When anything raises, the temp file is removed, ``path`` is
    left exactly as it was, and the exception propagates unchanged.

    Args:
        path: the file to create or replace (its folder must exist).
        write: callable that writes the complete content to the path it is given.
    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    out = Path(path)
    tmp = _temp_name(out)
    try:
        mode = stat.S_IMODE(os.stat(out).st_mode)
    except FileNotFoundError:
        mode = None
    try:
        write(tmp)
        if not tmp.is_file():
            raise FileNotFoundError(f"{tmp}: the writer created no file; expected it to write the content there")
        if mode is not None:
            os.chmod(tmp, mode)
        _fsync_path(tmp)
        os.replace(tmp, out)
    except BaseException:
        try:
            if tmp.is_dir() and not tmp.is_symlink():
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:  # pragma: no cover - e.g. the folder vanished
            log.debug("could not remove temp file %s: %s", tmp, exc)
        raise
    _fsync_path(out.parent if str(out.parent) else Path("."), directory=True)
    return out


def save_safetensors(path: PathLike, tensors: Mapping[str, object], metadata: Optional[dict[str, str]] = None) -> Path:
    """Write ``tensors`` (name → CPU tensor) as a safetensors file at ``path``, atomically (:func:`atomic_write`).

    safetensors reports I/O failures as its own ``SafetensorError`` ("... No space left on device (os error 28)");
    they are raised as ``OSError`` with that errno, so callers treat a full disk during serialisation like any other
    failed write.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        try:
            save_file(dict(tensors), str(tmp), metadata=metadata)
        except SafetensorError as exc:
            text = str(exc)
            code = re.search(r"os error (\d+)", text)
            number = int(code.group(1)) if code else errno.EIO
            raise OSError(number, os.strerror(number) if code else text, str(path)) from exc

    return atomic_write(path, write)
