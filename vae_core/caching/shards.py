"""The on-disk form of a latent cache: webdataset-style tar shards, an index per shard, one manifest.

* ``shard-NNNNNN.tar``: per item, ``<key>.safetensors`` (``latents`` and, with flips, ``latents_flipped``; the
  item's record in the ``vae_pack.item`` metadata field) and ``<key>.json`` (the same record), grouped by key as
  webdataset readers expect. Members are written with fixed ownership, mode and time, so the same items give the
  same bytes on any machine and rank.
* ``shard-NNNNNN.jsonl``: one line per item of the shard, in order: name, key, ``ok`` or ``failed`` (with the
  reason) and the record. It is written (atomically, by rename) after its tar, so an index marks a complete shard.
* ``manifest.json``: the run's settings, every shard with its counts and sha256, totals and every failure.

Writes are atomic (a temporary name beside the target, renamed when complete): a killed process leaves at most
temporary files, which the next run removes before redoing that shard.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any, Iterable, Optional

from ..errors import VaeInputError
from ..io.atomic import atomic_write

__all__ = ["shard_name", "index_name", "write_shard", "read_index", "read_members", "write_manifest",
           "read_manifest", "verify", "remove_temporaries", "file_sha256", "MANIFEST"]

MANIFEST = "manifest.json"
FORMAT = "vae-pack latent cache"
VERSION = 1


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def index_name(index: int) -> str:
    return f"shard-{index:06d}.jsonl"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(out: Path, index: int, entries: list[dict[str, Any]], members: dict[str, dict[str, bytes]]) -> None:
    """Write shard ``index``: ``entries`` (one per item, in order: ``name``, ``key``, ``status``...) and, for the
    ``ok`` ones, ``members[key]`` (``{".safetensors": bytes, ".json": bytes}``), tar first, then the index."""
    def tar_to(path: Path) -> None:
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for e in entries:
                if e["status"] == "ok":
                    for suffix in (".safetensors", ".json"):
                        _add(tar, e["key"] + suffix, members[e["key"]][suffix])

    atomic_write(out / shard_name(index), tar_to)
    text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries)
    atomic_write(out / index_name(index), lambda p: p.write_text(text, encoding="utf-8"))


def read_index(out: Path, index: int) -> Optional[list[dict[str, Any]]]:
    """Shard ``index``'s entries, or None when it has no complete index (never written, or killed before)."""
    path = out / index_name(index)
    if not path.is_file() or not (out / shard_name(index)).is_file():
        return None
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        return None


def read_members(out: Path, index: int) -> dict[str, dict[str, bytes]]:
    """The members of shard ``index`` by key (``{key: {".safetensors": ..., ".json": ...}}``); empty if none."""
    path = out / shard_name(index)
    found: dict[str, dict[str, bytes]] = {}
    if not path.is_file():
        return found
    try:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                f = tar.extractfile(m)
                if f is None:
                    continue
                key, dot, suffix = m.name.partition(".")
                found.setdefault(key, {})[dot + suffix] = f.read()
    except (tarfile.TarError, OSError):
        return {}
    return found


def remove_temporaries(out: Path, indices: Iterable[int]) -> int:
    """Remove temporary files a killed run left for these shards (only theirs: other ranks may be writing)."""
    stems = {f"shard-{i:06d}" for i in indices}
    n = 0
    for p in out.glob(".shard-*.tmp*"):
        if any(p.name.startswith(f".{s}.") for s in stems):
            p.unlink(missing_ok=True)
            n += 1
    return n


def write_manifest(out: Path, settings: dict[str, Any], shards: int) -> dict[str, Any]:
    """Assemble ``manifest.json`` from every shard's index (rank 0, after all ranks finished)."""
    entries, failures = [], []
    total = ok = 0
    for i in range(shards):
        index = read_index(out, i)
        if index is None:
            raise VaeInputError(f"{out / index_name(i)}: missing after every rank finished; expected all {shards} "
                                "shards complete (re-run to finish them)")
        n_ok = sum(e["status"] == "ok" for e in index)
        entries.append({"tar": shard_name(i), "index": index_name(i), "items": len(index), "ok": n_ok,
                        "failed": len(index) - n_ok, "sha256": file_sha256(out / shard_name(i))})
        failures += [{"name": e["name"], "reason": e["reason"]} for e in index if e["status"] != "ok"]
        total, ok = total + len(index), ok + n_ok
    manifest = {"format": FORMAT, "version": VERSION, "settings": settings, "items": total, "ok": ok,
                "failed": total - ok, "shards": entries, "failures": failures}
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    atomic_write(out / MANIFEST, lambda p: p.write_text(text, encoding="utf-8"))
    return manifest


def read_manifest(out: Path) -> dict[str, Any]:
    path = out / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise VaeInputError(f"{path}: not a readable manifest ({exc}); expected the output folder of "
                            "`python -m vae_core cache`") from exc
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise VaeInputError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; "
                            f"expected {FORMAT!r} version {VERSION}")
    return manifest


def verify(out: Path) -> list[str]:
    """Every problem found checking the cache in ``out`` against its manifest: shard checksums, the index against
    the tar's members, and each latent file read back (safetensors, finite values, the shape its record says).
    Empty when the cache is sound."""
    import torch
    from safetensors.torch import load

    manifest = read_manifest(out)
    problems: list[str] = []
    for s in manifest["shards"]:
        tar = out / s["tar"]
        if not tar.is_file():
            problems.append(f"{tar}: missing")
            continue
        if file_sha256(tar) != s["sha256"]:
            problems.append(f"{tar}: sha256 differs from the manifest's (changed or corrupt)")
            continue
        index = read_index(out, int(s["tar"][6:12]))
        members = read_members(out, int(s["tar"][6:12]))
        for e in index or []:
            if e["status"] != "ok":
                continue
            m = members.get(e["key"], {})
            if set(m) != {".safetensors", ".json"}:
                problems.append(f"{tar}: {e['name']} ({e['key']}): members {sorted(m)}; expected .safetensors and .json")
                continue
            try:
                tensors = load(m[".safetensors"])
            except Exception as exc:  # noqa: BLE001 - any unreadable member is the same problem
                problems.append(f"{tar}: {e['name']}: unreadable latents ({exc})")
                continue
            z = tensors.get("latents")
            if z is None or list(z.shape) != e["latent_shape"] or not bool(torch.isfinite(z.float()).all()):
                problems.append(f"{tar}: {e['name']}: latents {None if z is None else list(z.shape)}; expected "
                                f"finite values of shape {e['latent_shape']}")
        if index is None or len(index) != s["items"]:
            problems.append(f"{out / s['index']}: {None if index is None else len(index)} entries; expected "
                            f"{s['items']}")
    return problems
