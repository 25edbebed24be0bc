"""Exporters from a latent cache (:mod:`vae_core.caching.shards`) to the files trainers read today, with their
naming and keys (written from their documented formats; never by importing those projects):

* **kohya** (sd-scripts): one ``.npz`` per image, ``<stem>_<W:04d>x<H:04d>_<arch>.npz`` (W×H: the image's
  original size, which sd-scripts names its cache files by and reads back from the name), keys ``latents`` (float32
  ``[C, h, w]``, h×w: the bucket's latent size), ``original_size`` ``[W, H]``, ``crop_ltrb`` ``[l, t, r, b]``
  (kohya's convention: where the whole image would sit fitted inside the bucket) and, with flips,
  ``latents_flipped``; for ``sd3`` and ``flux``, whose caches hold several resolutions, every key ends in
  ``_<h>x<w>`` (e.g. ``latents_128x96``), as sd-scripts' multi-resolution strategies read them.
  ``arch`` ``sd`` (SD1/2), ``sdxl``, ``sd3``, ``flux``. sd-scripts feeds SD1/2/SDXL/SD3 caches through the VAE's
  scaling (and shift) at training time, so those files hold raw latents; its Flux path takes latents already
  shifted and scaled. The exporter converts to that convention from the scaling the cache recorded.
* **musubi** (musubi-tuner): one ``.safetensors`` per item in one flat folder (its cache directory), images
  ``<stem>_<W:04d>x<H:04d>_<arch>.safetensors`` (W×H: the original size), videos
  ``<stem>_00000-<F:03d>_<W:04d>x<H:04d>_<arch>.safetensors`` (start frame, frame count); key
  ``latents_<F>x<h>x<w>_<dtype>`` holding ``[C, F, h, w]`` (images: F = 1), metadata ``architecture``, ``width``,
  ``height`` (original), ``format_version`` ``1.0.1`` and ``frame_count`` (videos). ``arch`` ``wan`` (Wan 2.1/2.2),
  ``qi`` (Qwen-Image), ``hv15`` (HunyuanVideo 1.5); latents in the diffusion model's space (scaled), as musubi's
  VAE wrappers return them.

kohya files go under ``out`` at the item's path inside its source (``-o`` your image folder puts them next to the
images, where sd-scripts looks). Every shard is checked against the manifest's sha256 first, two items that would
land on one file are refused before anything is written, and each file is written atomically (an earlier export
of the same name is replaced; nothing else is touched).
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..errors import VaeInputError
from ..io.atomic import atomic_write
from .buckets import kohya_crop_ltrb
from .shards import file_sha256, read_index, read_manifest, read_members, shard_number

__all__ = ["export_cache", "ExportResult", "KOHYA_ARCH", "KOHYA_MULTI_RESOLUTION", "MUSUBI_ARCH"]

#: cache family → (kohya arch suffix, latents the trainer reads: "raw" or "scaled")
KOHYA_ARCH = {"sd1": ("sd", "raw"), "sd2": ("sd", "raw"), "sdxl": ("sdxl", "raw"), "sd3": ("sd3", "raw"),
              "flux": ("flux", "scaled")}
#: cache family → (musubi short arch, full arch name)
MUSUBI_ARCH = {"wan2.1": ("wan", "wan"), "wan2.2": ("wan", "wan"), "qwen-image": ("qi", "qwen_image"),
               "hunyuanvideo1.5": ("hv15", "hunyuan_video_1_5"), "hunyuanvideo": ("hv", "hunyuan_video")}


class ExportResult(list):
    """The files written (a list of paths), with ``skipped``: the cache's failed items, by name and reason."""

    def __init__(self, written: list[Path], skipped: list[dict[str, str]]) -> None:
        super().__init__(written)
        self.skipped = skipped


def _entries(cache: Path, manifest: dict[str, Any]) -> list[tuple[Path, dict[str, Any]]]:
    """Every entry of every shard (checked against the manifest first), with the shard it is in."""
    out = []
    for s in manifest["shards"]:
        tar = cache / s["tar"]
        number = shard_number(s["tar"])
        if number is None or not tar.is_file():
            raise VaeInputError(f"{tar}: missing; expected the shard {cache / 'manifest.json'} lists")
        if file_sha256(tar) != s["sha256"]:
            raise VaeInputError(f"{tar}: sha256 differs from the manifest's; expected the shard as cached (re-run "
                                "the cache, or --verify it)")
        index = read_index(cache, number)
        if index is None or len(index) != s["items"]:
            raise VaeInputError(f"{cache / s['index']}: {None if index is None else len(index)} entries; expected "
                                f"{s['items']} (re-run the cache)")
        out += [(tar, e) for e in index]
    return out


def _load(cache: Path, tar: Path, e: dict[str, Any], held: dict[Path, dict[str, dict[str, bytes]]]
          ) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    if tar not in held:
        held.clear()  # one shard's members at a time
        held[tar] = read_members(cache, shard_number(tar.name) or 0)
    data = held[tar].get(e.get("member", ""), {}).get(".safetensors")
    if data is None:
        raise VaeInputError(f"{tar}: no latents for {e['name']} (member {e.get('member')!r}); expected every ok item "
                            "of its index (re-run the cache)")
    return load(data)


def _convert(z: torch.Tensor, have: str, want: str, settings: dict[str, Any]) -> torch.Tensor:
    """Raw ↔ scaled with the scalar scaling the cache recorded (kl families)."""
    if have == want:
        return z
    scale, shift = settings["vae"].get("scaling_factor"), settings["vae"].get("shift_factor") or 0.0
    if not isinstance(scale, (int, float)) or not scale or not isinstance(shift, (int, float)):
        raise VaeInputError(f"the manifest's settings.vae scaling_factor {scale!r} / shift_factor {shift!r}; expected "
                            f"numbers (a nonzero scale) to turn {have} latents into {want} ones")
    z = z.float()
    return (z - shift) * scale if want == "scaled" else z / scale + shift


def _rel(e: dict[str, Any]) -> PurePosixPath:
    """The item's path inside its source, never leaving ``out`` (absolute or ``..`` paths keep their file name)."""
    rel = PurePosixPath(e.get("rel") or PurePosixPath(e["name"]).name)
    if rel.is_absolute() or ".." in rel.parts:
        rel = PurePosixPath(rel.name)
    return rel


#: kohya architectures whose caches key each resolution (``latents_<h>x<w>``, sd-scripts' multi_resolution)
KOHYA_MULTI_RESOLUTION = ("sd3", "flux")


def _plan_kohya(e: dict[str, Any], out: Path, suffix: str) -> Path:
    if "frames" in e:
        raise VaeInputError(f"{e['name']}: a video item; kohya's .npz holds images (export it --to musubi)")
    rel = _rel(e)
    ow, oh = e["original_size"]
    return out / rel.parent / f"{rel.stem}_{ow:04d}x{oh:04d}_{suffix}.npz"


def _plan_musubi(e: dict[str, Any], out: Path, short: str) -> Path:
    stem = _rel(e).stem
    ow, oh = e["original_size"]
    frames = f"_00000-{e['frames']:03d}" if "frames" in e else ""
    return out / f"{stem}{frames}_{ow:04d}x{oh:04d}_{short}.safetensors"


def export_cache(cache: Path, out: Path, to: str, arch: Optional[str] = None) -> ExportResult:
    """Write the cache's ok items in trainer ``to``'s format (``"kohya"`` or ``"musubi"``) under ``out``.

    Returns:
        The files written, with ``.skipped`` (the cache's failed items: ``name``, ``reason``).

    Raises:
        VaeInputError: an unknown target; a family the target has no architecture for (give ``arch``); latents
            that cannot be converted; a shard that differs from the manifest or lacks an item's latents; two
            items that would be written to one file (naming both) — all before anything is written.
    """
    cache, out = Path(cache), Path(out)
    manifest = read_manifest(cache)
    settings = manifest["settings"]
    family, have = settings["vae"]["family"], settings["latents"]
    if to == "kohya":
        if arch is None and family not in KOHYA_ARCH:
            raise VaeInputError(f"--to kohya for a {family} cache; expected one of {sorted(KOHYA_ARCH)} or --arch NAME")
        suffix, want = KOHYA_ARCH.get(family, (arch, have))
        suffix = arch or suffix
        if have != want and settings["vae"]["network"] != "kl":
            raise VaeInputError(f"a {family} cache of {have} latents; kohya's {suffix} reads {want} latents: re-cache "
                                f"with --latents {want}")
        plan: Callable[[dict[str, Any]], Path] = lambda e: _plan_kohya(e, out, suffix)  # noqa: E731
        keyed = suffix in KOHYA_MULTI_RESOLUTION
        write = lambda e, t, p: _write_kohya(e, t, p, have, want, settings, keyed)  # noqa: E731
    elif to == "musubi":
        if arch is None and family not in MUSUBI_ARCH:
            raise VaeInputError(f"--to musubi for a {family} cache; expected one of {sorted(MUSUBI_ARCH)} or --arch NAME")
        short, full = MUSUBI_ARCH.get(family, (arch, arch))
        short = arch or short
        if have != "scaled":
            raise VaeInputError(f"a cache of {have} latents; musubi-tuner reads the diffusion model's (scaled) latents: "
                                "re-cache with --latents scaled")
        plan = lambda e: _plan_musubi(e, out, short)  # noqa: E731
        write = lambda e, t, p: _write_musubi(e, t, p, full)  # noqa: E731
    else:
        raise VaeInputError(f"--to {to!r}; expected 'kohya' or 'musubi'")

    entries = _entries(cache, manifest)
    skipped = [{"name": e["name"], "reason": e.get("reason", "")} for _, e in entries if e["status"] != "ok"]
    ok = [(tar, e) for tar, e in entries if e["status"] == "ok"]
    if to == "kohya":  # sd-scripts reads images without their EXIF rotation: its size and bucket would not match
        skipped += [{"name": e["name"], "reason": "an EXIF-rotated photo, cached upright; sd-scripts reads it "
                     "unrotated (its file name, size and bucket differ): rotate the file itself to export it"}
                    for _, e in ok if e.get("exif_turned")]
        ok = [(tar, e) for tar, e in ok if not e.get("exif_turned")]
    targets: dict[Path, str] = {}
    for _, e in ok:
        path = plan(e)
        if path in targets:
            raise VaeInputError(f"{path}: both {targets[path]!r} and {e['name']!r} would be exported to it; expected "
                                "one item per file (rename one, or export their sources separately)")
        targets[path] = e["name"]
    members: dict[Path, set[str]] = {}
    for tar, e in ok:  # every item's latents are there before anything is written
        if tar not in members:
            with tarfile.open(tar) as t:
                members[tar] = set(t.getnames())
        if e.get("member", "") + ".safetensors" not in members[tar]:
            raise VaeInputError(f"{tar}: no latents for {e['name']!r} (member {e.get('member')!r}); expected every ok "
                                "item of its index (re-run the cache)")
    held: dict[Path, dict[str, dict[str, bytes]]] = {}
    written = [write(e, _load(cache, tar, e, held), plan(e)) for tar, e in ok]
    return ExportResult(written, skipped)


def _write_kohya(e: dict[str, Any], t: dict[str, torch.Tensor], path: Path, have: str, want: str,
                 settings: dict[str, Any], keyed: bool) -> Path:
    bucket, original = tuple(e["bucket"]), tuple(e["original_size"])
    arrays = {"latents": _convert(t["latents"], have, want, settings).float().numpy(),
              "original_size": np.array(original), "crop_ltrb": np.array(kohya_crop_ltrb(bucket, original))}
    if "latents_flipped" in t:
        arrays["latents_flipped"] = _convert(t["latents_flipped"], have, want, settings).float().numpy()
    if keyed:
        h, w = arrays["latents"].shape[-2:]
        arrays = {f"{k}_{h}x{w}": v for k, v in arrays.items()}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return _write(path, buf.getvalue())


def _write_musubi(e: dict[str, Any], t: dict[str, torch.Tensor], path: Path, full: str) -> Path:
    from safetensors.torch import save

    z = t["latents"]
    z = z.unsqueeze(1) if z.dim() == 3 else z  # [C, F, h, w]
    _, f, h, w = z.shape
    ow, oh = e["original_size"]
    meta = {"architecture": full, "width": str(ow), "height": str(oh), "format_version": "1.0.1"}
    if "frames" in e:
        meta["frame_count"] = str(e["frames"])
    key = f"latents_{f}x{h}x{w}_{str(z.dtype).split('.')[-1]}"
    return _write(path, save({key: z.contiguous()}, metadata=meta))


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda p: p.write_bytes(data))


def manifest_summary(cache: Path) -> str:
    """One line: items, ok, failed, shards (for the CLI)."""
    m = read_manifest(cache)
    return json.dumps({k: m[k] for k in ("items", "ok", "failed")} | {"shards": len(m["shards"])})
