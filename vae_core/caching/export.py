"""Exporters from a latent cache (:mod:`vae_core.caching.shards`) to the files trainers read today, with their
naming and keys (written from their documented formats; never by importing those projects):

* **kohya** (sd-scripts): one ``.npz`` per image, ``<stem>_<W:04d>x<H:04d>_<arch>.npz`` (W×H: the bucket), keys
  ``latents`` (float32 ``[C, h, w]``), ``original_size`` ``[W, H]``, ``crop_ltrb`` ``[l, t, r, b]`` and, with
  flips, ``latents_flipped``. ``arch`` ``sd`` (SD1/2), ``sdxl``, ``sd3``, ``flux``. sd-scripts feeds SD1/2/SDXL
  caches through the VAE's scaling factor at training time (raw latents in the file) and takes SD3/Flux latents as
  its VAE wrappers return them, already shifted and scaled: the exporter converts to that convention from the
  scaling the cache recorded.
* **musubi** (musubi-tuner): one ``.safetensors`` per item, ``<stem>_<W:04d>x<H:04d>_<arch>.safetensors`` (W×H:
  the original size), key ``latents_<F>x<h>x<w>_<dtype>`` holding ``[C, F, h, w]`` (images: F = 1), metadata
  ``architecture``, ``width``, ``height`` (original), ``format_version`` ``1.0.1`` and ``frame_count`` (videos).
  ``arch`` ``wan`` (Wan 2.1/2.2), ``qi`` (Qwen-Image), ``hv15`` (HunyuanVideo 1.5); latents in the diffusion
  model's space (scaled), as musubi's VAE wrappers return them.

Files are written atomically under ``out`` at the item's path relative to its DATA folder (``-o`` your image folder
puts them next to the images, where sd-scripts looks); an earlier export of the same name is replaced.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from ..errors import VaeInputError
from ..io.atomic import atomic_write
from .shards import read_index, read_manifest, read_members

__all__ = ["export_cache", "KOHYA_ARCH", "MUSUBI_ARCH"]

#: cache family → (kohya arch suffix, latents the trainer reads: "raw" or "scaled")
KOHYA_ARCH = {"sd1": ("sd", "raw"), "sd2": ("sd", "raw"), "sdxl": ("sdxl", "raw"), "sd3": ("sd3", "scaled"),
              "flux": ("flux", "scaled")}
#: cache family → (musubi short arch, full arch name)
MUSUBI_ARCH = {"wan2.1": ("wan", "wan"), "wan2.2": ("wan", "wan"), "qwen-image": ("qi", "qwen_image"),
               "hunyuanvideo1.5": ("hv15", "hunyuan_video_1_5")}


def _items(cache: Path) -> Iterator[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """Every ok item of the cache: (its record, its tensors)."""
    from safetensors.torch import load

    manifest = read_manifest(cache)
    for s in manifest["shards"]:
        index = int(s["tar"][6:12])
        members = read_members(cache, index)
        for e in read_index(cache, index) or []:
            if e["status"] == "ok":
                yield e, load(members[e["key"]][".safetensors"])


def _convert(z: torch.Tensor, have: str, want: str, settings: dict[str, Any]) -> torch.Tensor:
    """Raw ↔ scaled with the scalar scaling the cache recorded (kl families)."""
    if have == want:
        return z
    scale, shift = settings["vae"]["scaling_factor"], settings["vae"]["shift_factor"] or 0.0
    z = z.float()
    return (z - shift) * scale if want == "scaled" else z / scale + shift


def _target(out: Path, name: str, suffix: str) -> Path:
    rel = Path(name)
    rel = Path(*rel.parts[1:]) if len(rel.parts) > 1 else rel  # drop the DATA folder/shard name
    return out / rel.parent / f"{rel.stem}{suffix}"


def export_cache(cache: Path, out: Path, to: str, arch: Optional[str] = None) -> list[Path]:
    """Write the cache's items in trainer ``to``'s format (``"kohya"`` or ``"musubi"``) under ``out``; returns the
    files written.

    Raises:
        VaeInputError: an unknown target, a family the target has no architecture for (give ``arch``), or a
            cache whose latents cannot be converted (per-channel normalised latents to kohya's raw form).
    """
    manifest = read_manifest(cache)
    settings = manifest["settings"]
    family = settings["vae"]["family"]
    have = settings["latents"]
    written: list[Path] = []
    if to == "kohya":
        if arch is None and family not in KOHYA_ARCH:
            raise VaeInputError(f"--to kohya for a {family} cache; expected one of {sorted(KOHYA_ARCH)} or --arch NAME")
        suffix, want = KOHYA_ARCH.get(family, (arch, have))
        suffix = arch or suffix
        if have != want and settings["vae"]["network"] != "kl":
            raise VaeInputError(f"a {family} cache of {have} latents; kohya's {suffix} reads {want} latents: re-cache "
                                f"with --latents {want}")
        for e, t in _items(cache):
            if "frames" in e:
                raise VaeInputError(f"{e['name']}: a video item; kohya's .npz holds images")
            bw, bh = e["bucket"]
            path = _target(out, e["name"], f"_{bw:04d}x{bh:04d}_{suffix}.npz")
            arrays = {"latents": _convert(t["latents"], have, want, settings).float().numpy(),
                      "original_size": np.array(e["original_size"]), "crop_ltrb": np.array(e["crop_ltrb"])}
            if "latents_flipped" in t:
                arrays["latents_flipped"] = _convert(t["latents_flipped"], have, want, settings).float().numpy()
            written.append(_write(path, lambda p, a=arrays: _savez(p, a)))
        return written
    if to == "musubi":
        if arch is None and family not in MUSUBI_ARCH:
            raise VaeInputError(f"--to musubi for a {family} cache; expected one of {sorted(MUSUBI_ARCH)} or --arch NAME")
        short, full = MUSUBI_ARCH.get(family, (arch, arch))
        short = arch or short
        if have != "scaled":
            raise VaeInputError(f"a cache of {have} latents; musubi-tuner reads the diffusion model's (scaled) latents: "
                                "re-cache with --latents scaled")
        from safetensors.torch import save

        for e, t in _items(cache):
            z = t["latents"]
            z = z.unsqueeze(1) if z.dim() == 3 else z  # [C, F, h, w]
            c, f, h, w = z.shape
            ow, oh = e["original_size"]
            meta = {"architecture": full, "width": str(ow), "height": str(oh), "format_version": "1.0.1"}
            if "frames" in e:
                meta["frame_count"] = str(e["frames"])
            key = f"latents_{f}x{h}x{w}_{str(z.dtype).split('.')[-1]}"
            data = save({key: z.contiguous()}, metadata=meta)
            path = _target(out, e["name"], f"_{ow:04d}x{oh:04d}_{short}.safetensors")
            written.append(_write(path, lambda p, d=data: p.write_bytes(d)))
        return written
    raise VaeInputError(f"--to {to!r}; expected 'kohya' or 'musubi'")


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


def _write(path: Path, write) -> Path:  # type: ignore[no-untyped-def]
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, write)


def manifest_summary(cache: Path) -> str:
    """One line: items, ok, failed, shards (for the CLI)."""
    m = read_manifest(cache)
    return json.dumps({k: m[k] for k in ("items", "ok", "failed")} | {"shards": len(m["shards"])})
