"""The "SD VAE" dropdown for every format: wrappers over ``modules.sd_vae`` (A1111 v1.10.1 has no provider API).

* ``refresh_vae_list``: the original, then diffusers folders (one entry named after the folder, pointing at its
  weights file, since A1111 asserts ``isfile`` and hashes it), ``.bin``/``.pth``/``.sft`` files, in ``models/VAE``
  and ``--vae-dir``; native entries that point inside a diffusers folder are dropped. Names are unique.
* ``load_vae_dict``: any format through vae_core (keys detected, diffusers converted, checkpoint prefix stripped,
  pickles read with ``weights_only=True``) → an LDM-keyed state dict.
* ``get_filename`` / ``get_loaded_vae_name``: the entry name for a diffusers weights file (A1111 would re-add or
  report "diffusion_pytorch_model.safetensors").

The originals are kept on the module (``_vae_pack_originals``), so installing twice never wraps twice, and
:func:`uninstall` restores them.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from vae_core.errors import VaeLoadError
from vae_core.io.formats import DIFFUSERS_NAMES, find_diffusers_folder
from vae_core.loading import kl_family_of, ldm_state_dict_from_file
from vae_core.io.walk import walk_model_dirs

log = logging.getLogger(__name__)

EXTRA_SUFFIXES = (".bin", ".pth", ".sft")
_WRAPPED = ("refresh_vae_list", "load_vae_dict", "get_filename", "get_loaded_vae_name")
_names: dict[str, str] = {}  # weights file of a diffusers folder -> dropdown name


def _folder_of(path: str) -> Path | None:
    parent = Path(path).parent
    return parent if find_diffusers_folder(parent) == parent else None


def _vae_dirs(sd_vae: ModuleType) -> list[Path]:
    dirs = [Path(sd_vae.vae_path)]
    vae_dir = getattr(sd_vae.shared.cmd_opts, "vae_dir", None)
    if vae_dir and os.path.isdir(vae_dir):
        dirs.append(Path(vae_dir))
    return [d for d in dirs if d.is_dir()]


def _weights_file(folder: Path) -> Path:
    """The file A1111 will hash for a diffusers folder: the same preference order vae_core reads in."""
    for name in DIFFUSERS_NAMES:
        if (folder / name).is_file():
            return folder / name
    return sorted(folder.glob("diffusion_pytorch_model*.safetensors"))[0]  # first shard


def extra_entries(sd_vae: ModuleType) -> list[tuple[str, str]]:
    """(name, path) of what A1111 does not list itself: diffusers folders and other weight suffixes."""
    out: list[tuple[str, str]] = []
    for base in _vae_dirs(sd_vae):
        for here, dirs, files in walk_model_dirs(base):  # links followed, loops and depth bounded
            if find_diffusers_folder(here) == here and here != base:
                out.append((here.name, str(_weights_file(here))))
                dirs[:] = []
                continue
            out += [(f, str(here / f)) for f in files if f.lower().endswith(EXTRA_SUFFIXES)]
    return out


def _unique(name: str, taken: dict) -> str:
    if name not in taken:
        return name
    i = 2
    while f"{name} ({i})" in taken:
        i += 1
    return f"{name} ({i})"


def check_sd_family(sd: dict, filename: str) -> None:
    """Refuse VAEs of families A1111's "SD VAE" setting cannot use (its first stages are SD's kl-f8 with 4 or 16
    latent channels and equal encoder/decoder widths), with a message that says what the file is.

    Raises:
        VaeLoadError: e.g. a Flux.2 VAE (32 latent channels, latent BatchNorm statistics).
    """
    cfg, family = kl_family_of(sd, filename)  # the core's one family detector
    if family == "flux2" or cfg.latent_bn:
        raise VaeLoadError(filename, "a Flux.2 VAE (32 latent channels, latent BatchNorm statistics)",
                           "an SD-family VAE (SD1/2, SDXL: 4 latent channels) for A1111's SD VAE setting; use Flux.2 "
                           "VAEs with ComfyUI or `python -m vae_core`")
    if cfg.latent_channels not in (4, 16):
        raise VaeLoadError(filename, f"a VAE with {cfg.latent_channels} latent channels",
                           "4 (SD1/2, SDXL) or 16 (SD3) latent channels for A1111's SD VAE setting")


def install(sd_vae: ModuleType) -> None:
    """Wrap ``sd_vae``'s functions (idempotent: always wraps the stored originals)."""
    orig: dict[str, Callable[..., Any]] = sd_vae.__dict__.setdefault(
        "_vae_pack_originals", {name: getattr(sd_vae, name) for name in _WRAPPED})

    def refresh_vae_list() -> None:
        orig["refresh_vae_list"]()
        vae_dict = sd_vae.vae_dict
        for name, path in list(vae_dict.items()):
            if _folder_of(path) is not None:
                del vae_dict[name]  # a diffusers folder's inner file: replaced by the folder's own entry
        known = {os.path.normcase(os.path.abspath(p)) for p in vae_dict.values()}
        _names.clear()
        for name, path in extra_entries(sd_vae):
            if os.path.normcase(os.path.abspath(path)) in known:
                continue
            name = _unique(name, vae_dict)
            vae_dict[name] = path  # in place: other modules hold this dict
            if _folder_of(path) is not None:
                _names[os.path.abspath(path)] = name

    def load_vae_dict(filename: str, map_location: Any) -> dict:
        folder = _folder_of(filename)
        sd, raw, layout, prefix = ldm_state_dict_from_file(folder if folder is not None else filename)
        check_sd_family(sd, filename)
        log.info("VAE pack: %s read as %s keys%s from %s", filename, layout, f" under {prefix!r}" if prefix else "",
                 raw.container)
        return {k: v.to(map_location) if map_location else v for k, v in sd.items()}

    def get_filename(filepath: str) -> str:
        return _names.get(os.path.abspath(filepath)) or orig["get_filename"](filepath)

    def get_loaded_vae_name() -> Any:
        loaded = sd_vae.loaded_vae_file
        return _names.get(os.path.abspath(loaded)) if loaded and os.path.abspath(loaded) in _names else \
            orig["get_loaded_vae_name"]()

    for fn in (refresh_vae_list, load_vae_dict, get_filename, get_loaded_vae_name):
        fn._vae_pack = True  # type: ignore[attr-defined]
        setattr(sd_vae, fn.__name__, fn)


def uninstall(sd_vae: ModuleType) -> None:
    """Restore the original functions."""
    orig = sd_vae.__dict__.pop("_vae_pack_originals", None)
    if orig:
        for name, fn in orig.items():
            setattr(sd_vae, name, fn)
