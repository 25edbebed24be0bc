"""The on-disk form of a latent cache: webdataset-style tar shards, an index per shard, one manifest.

* ``shard-NNNNNN.tar``: per item, ``<member>.safetensors`` (``latents`` and, with flips, ``latents_flipped``; the
  record of what shaped them, without the item's name, in the ``vae_pack.item`` metadata field) and
  ``<member>.json`` (the item's whole record, name included), grouped by ``<member>`` (a hash of the item's name
  and key: unique per item) as webdataset readers expect. Members are written with fixed ownership, mode and time,
  so the same items give the same bytes on any machine and rank.
* ``shard-NNNNNN.jsonl``: one line per item of the shard, in order: name, key, member, ``ok`` or ``failed`` (with
  the reason) and the record. It is written (atomically, by rename) after its tar, so an index marks a complete
  shard.
* ``manifest.json``: the run's settings, every shard with its counts and sha256, totals and every failure.

Writes are atomic (a temporary name beside the target, renamed when complete): a killed process leaves at most
temporary files, which the next run removes before redoing that shard.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any, Iterable, Optional

from ..errors import VaeInputError
from ..io.atomic import atomic_write

__all__ = ["shard_name", "index_name", "write_shard", "read_index", "read_members", "write_manifest",
           "read_manifest", "verify", "remove_temporaries", "remove_leftovers", "listed_files", "shard_number",
           "member_stem", "file_sha256", "MANIFEST"]

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


def member_stem(name: str, key: str) -> str:
    """The tar member stem of an item: unique per (name, content key)."""
    return hashlib.sha256(f"{name}\0{key}".encode()).hexdigest()[:32]


def write_shard(out: Path, index: int, entries: list[dict[str, Any]], members: dict[str, dict[str, bytes]]) -> None:
    """Write shard ``index``: ``entries`` (one per item, in order: ``name``, ``key``, ``member``, ``status``...) and,
    for the ``ok`` ones, ``members[member]`` (``{".safetensors": bytes, ".json": bytes}``), tar first, then the
    index."""
    def tar_to(path: Path) -> None:
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for e in entries:
                if e["status"] == "ok":
                    for suffix in (".safetensors", ".json"):
                        _add(tar, e["member"] + suffix, members[e["member"]][suffix])

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
    """The members of shard ``index`` by stem (``{stem: {".safetensors": ..., ".json": ...}}``); empty if none."""
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


_SHARD_FILE = re.compile(r"^shard-(\d{6,})\.(tar|jsonl)$")


def shard_number(name: str) -> Optional[int]:
    """The shard number of a file named ``shard-NNNNNN.tar``/``.jsonl``, else None."""
    m = _SHARD_FILE.match(name)
    return int(m.group(1)) if m else None


def remove_temporaries(out: Path, indices: Iterable[int]) -> int:
    """Remove temporary files a killed run left for these shards (only theirs: other ranks may be writing)."""
    stems = {f"shard-{i:06d}" for i in indices}
    n = 0
    for p in out.glob(".shard-*.tmp*"):
        if any(p.name.startswith(f".{s}.") for s in stems):
            p.unlink(missing_ok=True)
            n += 1
    return n


def shard_files(out: Path) -> list[str]:
    """The shard files (``shard-NNNNNN.tar``/``.jsonl``) in the cache folder ``out``, by name."""
    return sorted(p.name for p in out.glob("shard-*") if shard_number(p.name) is not None)


def remove_leftovers(out: Path, listed: Iterable[str], shards: int) -> None:
    """After a run (rank 0, every rank done): remove what earlier runs left that this cache no longer holds — shard
    files beyond this run's ``shards`` (those the previous manifest listed, and those of a run killed after it had
    removed the manifest: files named as this tool names shards, in the cache folder it writes), and the
    temporary and progress files of any run."""
    for name in {*listed, *shard_files(out)}:
        number = shard_number(name)
        if number is not None and number >= shards:
            (out / name).unlink(missing_ok=True)
    for p in [*out.glob(".shard-*.tmp*"), *out.glob(".progress-rank*"), *out.glob(f".{MANIFEST[:-5]}.*.tmp*")]:
        p.unlink(missing_ok=True)


def listed_files(out: Path) -> list[str]:
    """The shard files the manifest in ``out`` lists (none without a readable manifest)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        return [name for s in manifest.get("shards", []) for name in (s["tar"], s["index"])]
    except (OSError, ValueError, KeyError, TypeError):
        return []


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
        failures += [{"name": e["name"], "reason": e["reason"], "tar": shard_name(i)} for e in index
                     if e["status"] != "ok"]
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
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        found = manifest if not isinstance(manifest, dict) else manifest.get("format"), \
            None if not isinstance(manifest, dict) else manifest.get("version")
        raise VaeInputError(f"{path}: format {found[0]!r} version {found[1]!r}; expected {FORMAT!r} version "
                            f"{VERSION} (the output folder of `python -m vae_core cache`)")
    _check_fields(manifest, path)
    return manifest


def _check_fields(manifest: dict[str, Any], path: Path) -> None:
    """The fields readers use, with their types (a hand-edited manifest gets a typed error naming the field)."""
    def bad(field: str, value: Any, expected: str) -> VaeInputError:
        return VaeInputError(f"{path}: {field} is {value!r}; expected {expected}")

    shards, settings = manifest.get("shards"), manifest.get("settings")
    if not isinstance(shards, list):
        raise bad("shards", shards, "a list of shard records")
    for i, s in enumerate(shards):
        if not isinstance(s, dict) or not all(isinstance(s.get(k), str) for k in ("tar", "index", "sha256")) \
                or not isinstance(s.get("items"), int):
            raise bad(f"shards[{i}]", s, "{tar, index, sha256: strings, items: an integer}")
    if not isinstance(settings, dict) or not isinstance(settings.get("vae"), dict):
        raise bad("settings", settings, "the run's settings with its vae")
    if settings.get("latents") not in ("raw", "scaled"):
        raise bad("settings.latents", settings.get("latents"), "'raw' or 'scaled'")
    for k in ("family", "network"):
        if not isinstance(settings["vae"].get(k), str):
            raise bad(f"settings.vae.{k}", settings["vae"].get(k), "a string")


def verify(out: Path) -> list[str]:
    """Every problem found checking the cache in ``out`` against its manifest: shard checksums, the index against
    the tar's members, and each latent file read back (safetensors, finite values, the shape its record says).
    Empty when the cache is sound."""
    import torch
    from safetensors.torch import load

    manifest = read_manifest(out)
    problems: list[str] = []
    listed = {name for s in manifest["shards"] for name in (s["tar"], s["index"])}
    problems += [f"{out / name}: not in the manifest (left by an interrupted run: a re-run of the cache removes it)"
                 for name in shard_files(out) if name not in listed]
    for s in manifest["shards"]:
        tar = out / s["tar"]
        if not tar.is_file():
            problems.append(f"{tar}: missing")
            continue
        if file_sha256(tar) != s["sha256"]:
            problems.append(f"{tar}: sha256 differs from the manifest's (changed or corrupt)")
            continue
        number = shard_number(s["tar"])
        index = read_index(out, number) if number is not None else None
        members = read_members(out, number) if number is not None else {}
        with tarfile.open(tar) as t:
            names = [m.name for m in t.getmembers()]
        wanted = [e.get("member", "") + suffix for e in index or [] if e.get("status") == "ok"
                  for suffix in (".safetensors", ".json")]
        if sorted(names) != sorted(wanted):
            problems.append(f"{tar}: members {len(names)} ({len(set(names))} distinct); expected the {len(wanted)} "
                            "its index lists")
        for e in index or []:
            if e.get("status") != "ok":
                continue
            m = members.get(e.get("member", ""), {})
            if set(m) != {".safetensors", ".json"}:
                problems.append(f"{tar}: {e.get('name')}: members {sorted(m)}; expected .safetensors and .json")
                continue
            try:
                tensors = load(m[".safetensors"])
            except Exception as exc:  # noqa: BLE001 - any unreadable member is the same problem
                problems.append(f"{tar}: {e.get('name')}: unreadable latents ({exc})")
                continue
            for name in ("latents", "latents_flipped") if e.get("flipped") else ("latents",):
                z = tensors.get(name)
                if z is None or list(z.shape) != e.get("latent_shape") or not bool(torch.isfinite(z.float()).all()):
                    problems.append(f"{tar}: {e.get('name')}: {name} {None if z is None else list(z.shape)}; "
                                    f"expected finite values of shape {e.get('latent_shape')}")
        if index is None or len(index) != s["items"]:
            problems.append(f"{out / s['index']}: {None if index is None else len(index)} entries; expected "
                            f"{s['items']}")
    return problems
