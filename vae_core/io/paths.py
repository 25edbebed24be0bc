"""Safe output paths for the CLI: "is this output one of my inputs?" checks and readable write errors.

``atomic_write`` and ``same_file`` live in :mod:`vae_core.atomic` (re-exported here for the CLI).
"""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Iterable, Union

from .atomic import atomic_write, same_file
from ..errors import VaeInputError

__all__ = ["atomic_write", "same_file", "input_files", "check_not_input", "check_writable_target", "describe_oserror"]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


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
