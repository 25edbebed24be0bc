"""A bounded, loop-safe walk over model folders, shared by the ComfyUI and A1111 listings.

``os.walk(followlinks=True)`` never notices a symlink loop (``a -> ..``, ``b/c -> b``): it descends until the OS
refuses the path, which with two loops is exponential and hangs the host's UI. :func:`walk_model_dirs` follows
links (users do link model folders in) but visits each real folder once, by ``(st_dev, st_ino)``, and stops at a
depth and an entry budget.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator, Union

__all__ = ["walk_model_dirs", "MAX_DEPTH", "MAX_ENTRIES"]

log = logging.getLogger(__name__)

#: Default folder depth below ``base`` that is still listed (``base`` itself is depth 0).
MAX_DEPTH = 16
#: Default bound on directory entries (files + folders) read in one walk.
MAX_ENTRIES = 100_000


def walk_model_dirs(base: Union[str, os.PathLike], max_depth: int = MAX_DEPTH, max_entries: int = MAX_ENTRIES
                    ) -> Iterator[tuple[Path, list[str], list[str]]]:
    """Walk ``base`` top-down like ``os.walk(base, followlinks=True)``, without looping.

    Yields ``(folder, dirs, files)`` with ``folder`` as reached from ``base`` (links not resolved, so names stay
    what the user sees) and sorted ``dirs``/``files`` names. As with ``os.walk``, the caller may prune ``dirs`` in
    place to skip folders. Each real folder (same device and inode) is visited once, whichever link reaches it
    first; folders deeper than ``max_depth`` are not entered; after ``max_entries`` entries the walk stops (logged
    at WARNING). Unreadable folders and broken links are skipped with a DEBUG log.
    """
    root = Path(base)
    seen: set[tuple[int, int]] = set()
    budget = max_entries
    stack: list[tuple[Path, int]] = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            st = os.stat(folder)
        except OSError as exc:
            log.debug("skipping %s: %s", folder, exc)
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            log.debug("skipping %s: already listed through another path (symlink loop or duplicate link)", folder)
            continue
        seen.add(key)
        dirs: list[str] = []
        files: list[str] = []
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    budget -= 1
                    if budget < 0:
                        break
                    try:
                        is_dir = entry.is_dir()  # follows links
                    except OSError:
                        is_dir = False
                    if is_dir:
                        dirs.append(entry.name)
                    else:
                        try:
                            if entry.is_file():
                                files.append(entry.name)
                        except OSError as exc:  # pragma: no cover - races
                            log.debug("skipping %s: %s", entry.path, exc)
        except OSError as exc:
            log.debug("skipping unreadable folder %s: %s", folder, exc)
            continue
        dirs.sort()
        files.sort()
        yield folder, dirs, files
        if budget < 0:
            log.warning("stopped listing %s after %d entries; expected fewer files in the model folder (the rest is "
                        "not listed)", root, max_entries)
            return
        if depth < max_depth:
            stack.extend((folder / d, depth + 1) for d in reversed(dirs))
        elif dirs:
            log.debug("not entering the %d folders below %s: deeper than %d levels", len(dirs), folder, max_depth)
