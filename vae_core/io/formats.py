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

from ..errors import VaeLoadError

__all__ = ["RawWeights", "read_weights", "read_json", "read_index", "find_diffusers_folder", "WEIGHT_SUFFIXES",
           "DIFFUSERS_NAMES", "is_weight_file", "check_tensor_kinds", "MAX_JSON_BYTES", "MAX_JSON_DEPTH"]

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
DIFFUSERS_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
_MAX_HEADER = 100 * 2**20
#: config.json and shard indexes larger than this are refused unread.
MAX_JSON_BYTES = 2**20
#: JSON nested deeper than this is refused (diffusers' files are 2-3 levels deep).
MAX_JSON_DEPTH = 32
#: at most this many shards in an index and members in a torch zip.
MAX_SHARDS = 256
MAX_ZIP_MEMBERS = 100_000
_VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


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


#: How a legacy (pre-zip) torch.save file starts when written with pickle protocol 0 or 1: its magic number as a
#: text LONG opcode. torch's weights-only unpickler implements protocol 2+ opcodes only.
TORCH_LEGACY_TEXT_MAGIC = b"L119547037146038801333356L"


def _sniff(path: Path) -> str:
    size = path.stat().st_size
    if size == 0:
        raise VaeLoadError(path, "the file is empty (0 bytes)", "a .safetensors, .ckpt, .pt, .pth or .bin VAE")
    with open(path, "rb") as fh:
        start = fh.read(len(TORCH_LEGACY_TEXT_MAGIC))
    if start == TORCH_LEGACY_TEXT_MAGIC:
        raise VaeLoadError(path, "a legacy torch checkpoint pickled with protocol 0 or 1 (torch.save before the zip "
                           "format, with pickle_protocol < 2), which weights-only loading cannot read (nothing in it "
                           "was run)", "a .safetensors file or a current torch checkpoint (re-save it once as "
                           ".safetensors, only if you trust where it came from: loading it unrestricted runs its "
                           "pickle)")
    head = start[:8]
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
    # safetensors first: a header length whose low byte is 0x80 (e.g. 10880 bytes) starts like a pickle
    if 2 <= n <= min(_MAX_HEADER, size - 8):
        with open(path, "rb") as fh:
            fh.seek(8)
            if fh.read(1) == b"{":
                return "safetensors"
    if head[:2] == b"PK":
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) == 8:
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


def _check_zip(path: Path) -> None:
    """Refuse a zip that torch never writes before anything is inflated: compressed members, too many members,
    or members whose stated sizes add up to more than the archive (a stored member's size is its size on disk)."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_ZIP_MEMBERS:
                raise VaeLoadError(path, f"a zip archive with {len(infos)} members", f"a torch checkpoint (at most "
                                   f"{MAX_ZIP_MEMBERS} members)")
            packed = [i for i in infos if i.compress_type != zipfile.ZIP_STORED]
            if packed:
                i = packed[0]
                raise VaeLoadError(path, f"{len(packed)} compressed zip member(s), e.g. {i.filename!r} (method "
                                   f"{i.compress_type}, {i.compress_size} bytes inflating to {i.file_size}); refused "
                                   "uninflated", "a torch checkpoint (torch.save stores members uncompressed)")
            total = sum(i.file_size for i in infos)
            if total > size:
                raise VaeLoadError(path, f"zip members stating {total} bytes in an archive of {size} bytes",
                                   "stored (uncompressed) members no larger than the archive")
            bad = zf.testzip()
    except zipfile.BadZipFile as exc:
        raise VaeLoadError(path, f"a damaged zip archive ({exc})", "a complete torch checkpoint") from exc
    except (OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as exc:
        if isinstance(exc, VaeLoadError):
            raise
        raise VaeLoadError(path, f"an unreadable zip archive ({type(exc).__name__}: {exc})",
                           "a complete torch checkpoint") from exc
    if bad is not None:
        raise VaeLoadError(path, f"a damaged zip member {bad!r}", "a complete torch checkpoint")


def _read_pickle(path: Path, kind: str) -> dict:
    if kind == "zip":
        _check_zip(path)
    try:
        # torch.serialization.load, not torch.load: A1111 replaces torch.load with a wrapper that returns None on
        # files its own unpickler rejects; weights_only=True is at least as strict.
        # an open file, not a name: recent torch hands names ending in .safetensors to safetensors itself
        with open(path, "rb") as fh:
            obj = torch.serialization.load(fh, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise VaeLoadError(path, f"a pickle that asks to run code or load non-tensor objects, refused unrun "
                           f"({_offending_global(exc)})", "a pickle of tensors only (read with weights_only=True; "
                           "convert trusted files to .safetensors)") from exc
    except Exception as exc:  # noqa: BLE001 - torch raises many types here (RuntimeError, EOFError, KeyError, ...)
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
    sd: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if isinstance(k, str) and isinstance(v, torch.Tensor):
            sd[k] = v
        elif isinstance(k, str) and _is_vae_key(k):
            raise VaeLoadError(path, f"a {type(v).__name__} under the weight key {k!r}", "a tensor for every VAE key")
    check_tensor_kinds(sd, path)
    if not sd:
        raise VaeLoadError(path, f"no tensors (top-level keys: {sorted(map(str, obj))[:8]})", "a state dict of "
                           "VAE weights")
    return sd


#: Largest tensor accepted (elements): SD's biggest VAE weight has 2.4 M; 2**31 leaves room for anything real.
MAX_TENSOR_ELEMENTS = 2**31


def check_tensor_kinds(sd: dict[str, torch.Tensor], path: object) -> None:
    """Refuse tensors no VAE file holds, before any conversion touches them: meta, sparse, nested or quantized
    tensors, more than :data:`MAX_TENSOR_ELEMENTS` elements, or views whose storage is smaller than their elements
    (stride-0 "expanded" tensors that would inflate on the first copy).

    Raises:
        VaeLoadError: naming up to three offending keys and their kind.
    """
    odd = []
    for k, v in sd.items():
        if v.is_meta or v.layout != torch.strided or v.is_nested or v.is_quantized:
            kind = ("meta" if v.is_meta else "nested" if v.is_nested else str(v.layout) if v.layout != torch.strided
                    else "quantized")
            odd.append(f"{k} ({kind})")
        elif v.numel() > MAX_TENSOR_ELEMENTS:
            odd.append(f"{k} ({v.numel()} elements)")
        elif v.numel() and v.untyped_storage().nbytes() < v.numel() * v.element_size():
            odd.append(f"{k} (overlapping elements: {v.numel()} elements in a storage of "
                       f"{v.untyped_storage().nbytes()} bytes)")
        if len(odd) >= 3:
            break
    if odd:
        raise VaeLoadError(path, f"unsupported tensors {odd}", "dense (strided) tensors with real storage, each "
                           "element stored once")


def _is_vae_key(key: str) -> bool:
    for prefix in ("", "first_stage_model.", "vae."):
        if key.startswith(prefix) and key[len(prefix):].startswith(_VAE_ROOTS):
            return True
    return False


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    kind = _sniff(path)
    if kind == "safetensors":
        sd, meta = _read_safetensors(path)
        return sd, meta, "safetensors"
    if path.suffix.lower() in (".safetensors", ".sft"):
        log.warning("%s: named %s but holds a %s, read as a weights-only pickle", path, path.suffix, kind)
        try:
            return _flatten(_read_pickle(path, kind), path), {}, "pickle"
        except VaeLoadError as exc:
            raise VaeLoadError(path, f"a {'zip archive' if kind == 'zip' else 'pickle'} named {path.suffix}, not a "
                               f"safetensors file ({exc.found})", "a safetensors file") from exc
    return _flatten(_read_pickle(path, kind), path), {}, "pickle"


def _depth(obj: object) -> int:
    """Nesting depth of decoded JSON, iteratively (no recursion of our own)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, d)
            if d > MAX_JSON_DEPTH:
                return d
            stack.extend((v, d + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def read_json(path: Path, what: str) -> dict:
    """Read a small JSON object (``config.json``, a shard index) with bounded size and nesting.

    Raises:
        VaeLoadError: larger than :data:`MAX_JSON_BYTES`, unreadable, invalid, nested deeper than
            :data:`MAX_JSON_DEPTH`, or not a JSON object.
    """
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise VaeLoadError(path, f"a {what} of {size} bytes, refused unread", f"at most {MAX_JSON_BYTES} bytes")
        with open(path, "rb") as fh:
            data = fh.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:
            raise VaeLoadError(path, f"a {what} longer than {MAX_JSON_BYTES} bytes", f"at most {MAX_JSON_BYTES} bytes")
        obj = json.loads(data.decode("utf-8"))
    except VaeLoadError:
        raise
    except RecursionError as exc:
        raise VaeLoadError(path, f"a {what} nested too deeply to parse", f"JSON nested at most {MAX_JSON_DEPTH} "
                           "levels") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise VaeLoadError(path, f"invalid JSON in a {what} ({exc})", f"a diffusers {what}") from exc
    depth = _depth(obj)
    if depth > MAX_JSON_DEPTH:
        raise VaeLoadError(path, f"a {what} nested {depth}+ levels deep", f"JSON nested at most {MAX_JSON_DEPTH} levels")
    if not isinstance(obj, dict):
        raise VaeLoadError(path, f"a JSON {type(obj).__name__}", f"a JSON object ({what})")
    return obj


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
    config = read_json(folder / "config.json", "config.json")
    for name in DIFFUSERS_NAMES:
        index = folder / (name + ".index.json")
        if index.is_file():
            return _read_shards(path, folder, index, config)
        if (folder / name).is_file():
            sd, meta, _ = _read_file(folder / name)
            return RawWeights(sd, "diffusers-folder", path, folder / name, meta, config)
    raise VaeLoadError(folder, "config.json but no weights file", f"one of {list(DIFFUSERS_NAMES)}")


def _plain_name(name: object) -> bool:
    return (isinstance(name, str) and 0 < len(name) <= 255 and name not in (".", "..") and "/" not in name
            and "\\" not in name and "\0" not in name and ":" not in name and not os.path.isabs(name))


def read_index(index: Path) -> dict[str, str]:
    """The validated ``weight_map`` of a shard index: tensor name → plain shard file name inside its folder.

    Raises:
        VaeLoadError: unreadable/oversized JSON, no ``weight_map`` object, non-string names, a shard name with a
            path separator, ``..`` or an absolute path, or more than :data:`MAX_SHARDS` shards.
    """
    doc = read_json(index, "shard index")
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise VaeLoadError(index, f"'weight_map' is {type(weight_map).__name__ if weight_map is not None else 'missing'}"
                           f"{' (empty)' if weight_map == {} else ''}", "a non-empty JSON object tensor name -> shard "
                           "file name")
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise VaeLoadError(index, f"weight_map[{key!r}] is a {type(shard).__name__}", "a shard file name (string)")
        if not _plain_name(shard):
            raise VaeLoadError(index, f"weight_map[{key!r}] names the shard {shard!r}", "a plain file name inside the "
                               "index's folder (no path separators, '..' or absolute paths)")
    n = len(set(weight_map.values()))
    if n > MAX_SHARDS:
        raise VaeLoadError(index, f"{n} shards", f"at most {MAX_SHARDS}")
    return weight_map


def _read_shards(path: Path, folder: Path, index: Path, config: dict) -> RawWeights:
    weight_map = read_index(index)
    sd: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if not (folder / shard).is_file():
            raise VaeLoadError(folder / shard, f"a missing shard named in the index {index.name}", "every shard the "
                               "index names")
        part = _read_file(folder / shard)[0]
        for key in part:
            if key in where:
                raise VaeLoadError(folder / shard, f"tensor {key!r}, also in shard {where[key]!r}", "each tensor in "
                                   "exactly one shard")
            named = weight_map.get(key)
            if named != shard:
                raise VaeLoadError(folder / shard, f"tensor {key!r}, which the index {index.name} "
                                   + (f"places in {named!r}" if named else "does not name"),
                                   "shards holding exactly the tensors the index names for them")
            where[key] = shard
        sd.update(part)
    absent = sorted(set(weight_map) - set(sd))
    if absent:
        raise VaeLoadError(index, f"{len(absent)} tensors named in the index but absent from their shards, e.g. "
                           f"{absent[0]!r} in {weight_map[absent[0]]!r}", "every tensor the index names in its shard")
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
