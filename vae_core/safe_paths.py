"""Safe output paths for the CLI: atomic writes and "is this output one of my inputs?" checks.

``atomic_write`` and ``same_file`` have the same signatures as the loading engineer's ``vae_core/atomic.py``; when
both branches meet, one copy stays and this module re-exports it.
"""
from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Callable, Iterable, Union

from .errors import VaeInputError

__all__ = ["atomic_write", "same_file", "input_files", "check_not_input", "check_writable_target", "describe_oserror"]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file or folder (through symlinks and hardlinks too).

    Two existing paths are compared with :func:`os.path.samefile` (device and inode); otherwise their resolved,
    case-normalised absolute paths are compared (a path that does not exist yet is the same as another only if it
    resolves to the same place).
    """
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def _temp_name(path: Path) -> Path:
    # hidden, in the same folder (same filesystem, so os.replace is atomic), the real suffix kept for writers that
    # pick the format from the name
    return path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Write ``path`` all at once: ``write(tmp)`` fills a temp file in the same folder, which is fsynced and then
    moved over ``path`` with :func:`os.replace`.

    An existing ``path`` keeps its permission bits. When ``write`` (or the fsync/replace) raises, the temp file is
    removed and ``path`` is left as it was; the exception propagates unchanged.

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
        if mode is not None:
            os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        except OSError as exc:  # pragma: no cover - e.g. the folder vanished
            log.debug("could not remove temp file %s: %s", tmp, exc)
        raise
    try:  # make the rename itself durable (not possible on every platform)
        dfd = os.open(out.parent if str(out.parent) else ".", os.O_RDONLY)
    except OSError:
        return out
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
    return out


def input_files(path: PathLike, limit: int = 10_000) -> list[Path]:
    """``path`` itself plus, for a folder (e.g. a diffusers folder), every file and folder below it (not following
    links; at most ``limit`` entries): everything a command reads when given ``path``."""
    p = Path(path)
    out = [p]
    if p.is_dir():
        for root, dirs, files in os.walk(p):
            out += [Path(root) / d for d in dirs] + [Path(root) / f for f in files]
            if len(out) > limit:
                break
    return out


def check_not_input(output: PathLike, inputs: Iterable[PathLike], what: str = "output") -> None:
    """Raise :class:`VaeInputError` when ``output`` is (the same file or folder as) one of ``inputs``.

    Every element of ``inputs`` is expanded with :func:`input_files`, so an output that is the weights file inside
    an input diffusers folder is refused too.
    """
    for given in inputs:
        for inp in input_files(given):
            if same_file(output, inp):
                extra = "" if Path(inp) == Path(given) else f" (inside the input {given})"
                raise VaeInputError(f"{output}: the {what} is the input {inp}{extra}; expected an output path that "
                                    "is not one of the inputs (writing it would destroy the input)")


def check_writable_target(path: PathLike, folder_ok: bool = False) -> None:
    """Raise :class:`VaeInputError` when ``path`` cannot be created as a file (or as a folder when ``folder_ok``):
    it is an existing folder (for a file), an existing file (for a folder), or one of its parents is a file."""
    p = Path(path)
    if p.is_dir() and not folder_ok:
        raise VaeInputError(f"{p}: is a folder; expected a file path for the output")
    if folder_ok and p.exists() and not p.is_dir():
        raise VaeInputError(f"{p}: is an existing file; expected a folder (or a new path) for the output folder")
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise VaeInputError(f"{p}: its parent {parent} is a file; expected a folder to write the output in")
            break


def describe_oserror(path: PathLike, exc: OSError, expected: str = "a writable location with free space") -> str:
    """``"<path>: <what happened>; expected <...>"`` for an OSError raised while writing ``path``."""
    code = errno.errorcode.get(exc.errno or -1, "")
    found = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno == errno.ENOSPC:
        expected = "enough free disk space for the output"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        expected = "a folder you can write to"
    return f"{path}: {found}{f' ({code})' if code else ''}; expected {expected}"
