"""Reading weight files and folders into flat state dicts, safely.

The container is recognised from the file's first bytes, not its name: safetensors (an 8-byte header length and a
JSON header), a torch zip archive (``PK``) or a legacy pickle (protocol byte ``0x80``). Pickles are read only with
``torch.load(weights_only=True)``, which refuses any global that is not a tensor/storage/plain container, so a
pickle that wants to run code raises :class:`VaeLoadError` before anything runs.

Folders: a diffusers VAE folder (``config.json`` + ``diffusion_pytorch_model[.fp16].safetensors|.bin``, optionally
sharded with an ``.index.json``) or a pipeline folder that holds one in ``vae/``.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .errors import VaeLoadError

__all__ = ["RawWeights", "read_weights", "find_diffusers_folder", "WEIGHT_SUFFIXES", "DIFFUSERS_NAMES", "is_weight_file"]

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
DIFFUSERS_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
_MAX_HEADER = 100 * 2**20


@dataclass
class RawWeights:
    """What a file or folder held, before any key conversion.

    Attributes:
        state_dict: name → tensor (non-tensor entries dropped, a ``state_dict`` wrapper unwrapped).
        container: ``"safetensors"``, ``"pickle"`` or ``"diffusers-folder"``.
        path: the file or folder read.
        weights_file: the file the tensors came from (for a folder, its weights file or first shard).
        metadata: safetensors header metadata (``__metadata__``), else empty.
        config: a diffusers ``config.json`` dict when read from a folder, else None.
    """

    state_dict: dict[str, torch.Tensor]
    container: str
    path: Path
    weights_file: Path
    metadata: dict[str, str] = field(default_factory=dict)
    config: Optional[dict] = None


def is_weight_file(path: os.PathLike | str) -> bool:
    return Path(path).suffix.lower() in WEIGHT_SUFFIXES


def _sniff(path: Path) -> str:
    size = path.stat().st_size
    if size == 0:
        raise VaeLoadError(path, "the file is empty (0 bytes)", "a .safetensors, .ckpt, .pt, .pth or .bin VAE")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:2] == b"PK":
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) == 8:
        (n,) = struct.unpack("<Q", head)
        if 2 <= n <= min(_MAX_HEADER, size - 8):
            with open(path, "rb") as fh:
                fh.seek(8)
                if fh.read(1) == b"{":
                    return "safetensors"
        if path.suffix.lower() in (".safetensors", ".sft"):
            raise VaeLoadError(path, f"a safetensors header of {n} bytes in a file of {size} bytes (truncated or "
                               "not safetensors)", "a complete safetensors file")
    raise VaeLoadError(path, f"unrecognised leading bytes {head!r}", "a safetensors file, a torch zip archive or a "
                       "pickle")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = dict(fh.metadata() or {})
            return {k: fh.get_tensor(k) for k in fh.keys()}, meta
    except VaeLoadError:
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError and OSError subclasses
        raise VaeLoadError(path, f"an unreadable safetensors file ({type(exc).__name__}: {exc})",
                           "a complete safetensors file") from exc


def _read_pickle(path: Path, kind: str) -> dict:
    if kind == "zip":
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
        except zipfile.BadZipFile as exc:
            raise VaeLoadError(path, f"a damaged zip archive ({exc})", "a complete torch checkpoint") from exc
        if bad is not None:
            raise VaeLoadError(path, f"a damaged zip member {bad!r}", "a complete torch checkpoint")
    try:
        # torch.serialization.load, not torch.load: A1111 replaces torch.load with a wrapper that returns None on
        # files its own unpickler rejects; weights_only=True is at least as strict.
        obj = torch.serialization.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise VaeLoadError(path, f"a pickle that asks to run code or load non-tensor objects, refused unrun "
                           f"({_offending_global(exc)})", "a pickle of tensors only (read with weights_only=True; "
                           "convert trusted files to .safetensors)") from exc
    except (EOFError, RuntimeError, ValueError, OSError, struct.error) as exc:
        raise VaeLoadError(path, f"an unreadable pickle ({type(exc).__name__}: {exc})",
                           "a complete torch checkpoint") from exc
    if not isinstance(obj, dict):
        raise VaeLoadError(path, f"a pickle holding {type(obj).__name__}", "a dict of tensors (a state dict)")
    return obj


def _offending_global(exc: BaseException) -> str:
    """The 'Unsupported global ...' part of torch's weights_only error, without its advice to disable the check."""
    for line in str(exc).splitlines():
        line = line.strip()
        if "global" in line.lower() and ("unsupported" in line.lower() or "not an allowed" in line.lower()):
            return line.split(" was not an allowed global")[0].replace("WeightsUnpickler error: ", "")
    return type(exc).__name__


def _flatten(obj: dict, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap ``{"state_dict": {...}}`` and keep tensor entries only."""
    for wrapper in ("state_dict", "model", "module"):
        inner = obj.get(wrapper)
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not sd:
        raise VaeLoadError(path, f"no tensors (top-level keys: {sorted(map(str, obj))[:8]})", "a state dict of "
                           "VAE weights")
    return sd


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    kind = _sniff(path)
    if kind == "safetensors":
        sd, meta = _read_safetensors(path)
        return sd, meta, "safetensors"
    return _flatten(_read_pickle(path, kind), path), {}, "pickle"


def find_diffusers_folder(path: Path) -> Optional[Path]:
    """Return the folder holding a diffusers VAE ``config.json`` (``path`` itself or ``path/vae``), or None."""
    for cand in (path, path / "vae"):
        if (cand / "config.json").is_file() and any((cand / n).is_file() for n in DIFFUSERS_NAMES + tuple(
                n + ".index.json" for n in DIFFUSERS_NAMES[:2])):
            return cand
        if (cand / "config.json").is_file() and list(cand.glob("diffusion_pytorch_model*.safetensors")):
            return cand
    return None


def _read_folder(path: Path) -> RawWeights:
    folder = find_diffusers_folder(path)
    if folder is None:
        present = sorted(p.name for p in path.iterdir())[:10]
        raise VaeLoadError(path, f"a folder without diffusers VAE weights (contains {present})",
                           "config.json with diffusion_pytorch_model[.fp16].safetensors|.bin, or a vae/ subfolder "
                           "holding them")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise VaeLoadError(folder / "config.json", f"invalid JSON ({exc})", "a diffusers config.json") from exc
    if not isinstance(config, dict):
        raise VaeLoadError(folder / "config.json", f"a JSON {type(config).__name__}", "a JSON object")
    for name in DIFFUSERS_NAMES:
        index = folder / (name + ".index.json")
        if index.is_file():
            return _read_shards(path, folder, index, config)
        if (folder / name).is_file():
            sd, meta, _ = _read_file(folder / name)
            return RawWeights(sd, "diffusers-folder", path, folder / name, meta, config)
    raise VaeLoadError(folder, "config.json but no weights file", f"one of {list(DIFFUSERS_NAMES)}")


def _read_shards(path: Path, folder: Path, index: Path, config: dict) -> RawWeights:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise VaeLoadError(index, f"an unreadable shard index ({exc})", "a JSON object with 'weight_map'") from exc
    sd: dict[str, torch.Tensor] = {}
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if not (folder / shard).is_file():
            raise VaeLoadError(folder / shard, "a missing shard named in the index", "every shard the index names")
        sd.update(_read_file(folder / shard)[0])
    return RawWeights(sd, "diffusers-folder", path, folder / shards[0], {}, config)


def read_weights(path: os.PathLike | str) -> RawWeights:
    """Read a VAE file or folder without executing anything from it.

    Args:
        path: a weights file (any supported container) or a diffusers (pipeline) folder.
    Returns:
        :class:`RawWeights` with the tensors as stored (dtype unchanged, on CPU).
    Raises:
        VaeLoadError: missing path, empty/truncated file, refused pickle, folder without weights.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise VaeLoadError(p, "no such file or folder", "an existing VAE file or diffusers folder")
    if p.is_dir():
        return _read_folder(p)
    sd, meta, container = _read_file(p)
    log.debug("read %d tensors from %s (%s)", len(sd), p, container)
    return RawWeights(sd, container, p, p, meta, None)
