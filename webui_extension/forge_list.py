"""Forge's "VAE / Text Encoder" list and loader for every VAE format (Forge main and Neo's shape).

Forge lists ``models/VAE``, ``models/text_encoder`` and ``--vae-dir``/``--text-encoder-dir`` in
``modules_forge.main_entry.module_list`` ({file name → path}; a later file of the same name replaces an earlier one,
and a diffusers folder shows as ``diffusion_pytorch_model.safetensors``), keeps the chosen paths in
``opts.forge_additional_modules`` (resolved by ``os.path.basename``) and reads each with
``backend.loader.load_torch_file`` inside ``split_state_dict`` (pickles unsafely, ``.sft`` not at all), hands it to
``replace_state_dict`` (a VAE only when ``decoder.conv_in.weight`` is a key) and builds the VAE from the model's
bundled config (a size mismatch surfaces as "Failed to recognize model type!", HTTP 500). The wrappers here:

* ``refresh_models``: the VAE folders re-listed — diffusers folders under their folder name (path: the folder),
  ``.sft``/``.pth`` added, files inside a diffusers folder dropped, every name unique ("name (2).safetensors": the
  listed path is then a virtual one whose base name is that name, since Forge shows and resolves selections by base
  name).
  Text-encoder entries stay as Forge listed them.
* ``modules_change``: a choice given as a full path maps to that path's own entry (Forge matches base names).
* ``load_torch_file``: for paths in the VAE folders, any VAE format through vae_core (keys detected, diffusers
  converted, checkpoint prefixes stripped, pickles with ``weights_only=True``) → an LDM-keyed state dict; a file there
  that holds no VAE (a text encoder: safetensors without VAE keys, GGUF) goes to Forge's reader, pickles with
  ``safe_load``; a saved virtual path is resolved after a re-listing.
* ``replace_state_dict``: a VAE whose widths differ from the VAE Forge builds for the model is refused by name.
* ``refresh_vae_list`` (``modules.sd_vae``, what ``/sdapi/v1/refresh-vae`` calls): Forge's list re-listed as well.
* ``forge_loader`` (as ``modules.sd_models`` calls it): our typed error instead of Forge's bare re-raise, with HTTP
  status 422 for the API.

Originals are kept on each module (``_vae_pack_originals``): installing twice never wraps twice; :func:`uninstall`.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

from vae_core.errors import VaeLoadError
from vae_core.io.formats import find_diffusers_folder
from vae_core.io.walk import walk_model_dirs
from vae_core.loading import kl_family_of, ldm_state_dict_from_file

log = logging.getLogger(__name__)

SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")
_virtual: dict[str, str] = {}  # listed path of a renamed duplicate -> the real file or folder
_origin: dict[int, str] = {}  # id of a state dict we returned -> the path it came from (for replace_state_dict)


def vae_dirs(models_path: str, vae_dir: Any) -> list[Path]:
    """``models/VAE`` and ``--vae-dir`` (absolute, existing folders)."""
    dirs = [Path(models_path) / "VAE"] + ([Path(vae_dir)] if isinstance(vae_dir, str) and vae_dir else [])
    return [d.absolute() for d in dirs if d.is_dir()]


def entries(dirs: list[Path]) -> list[tuple[str, str]]:
    """(name, path) of every VAE candidate in ``dirs``: diffusers folders (the folder) and weight files."""
    out: list[tuple[str, str]] = []
    for base in dirs:
        for here, sub, files in walk_model_dirs(base):  # links followed, loops and depth bounded
            if here != base and find_diffusers_folder(here) == here:
                out.append((here.name, str(here)))
                sub[:] = []
                continue
            out += [(f, str(here / f)) for f in files if f.lower().endswith(SUFFIXES)]
    return out


def _unique(name: str, path: str, taken: dict) -> str:
    """``name``, or "stem (2).ext" (Forge's infotext keeps the stem) when taken; never the name of a real file
    beside ``path``, so a virtual path is never a real one."""
    stem, ext = os.path.splitext(name) if os.path.isfile(path) else (name, "")
    unique, i = name, 2
    while unique in taken or (unique != name and os.path.exists(os.path.join(os.path.dirname(path), unique))):
        unique, i = f"{stem} ({i}){ext}", i + 1
    return unique


def _key(path: str) -> str:
    return os.path.normcase(os.path.abspath(path))


def _inside(path: str, dirs: list[Path]) -> bool:
    here = os.path.normcase(os.path.abspath(path))
    return any(here.startswith(os.path.normcase(str(d)) + os.sep) for d in dirs)


def relist(module_list: dict, dirs: list[Path]) -> None:
    """Rewrite ``module_list`` in place (other modules hold it): Forge's entries outside ``dirs``, then ours."""
    new = {name: path for name, path in module_list.items() if not _inside(path, dirs)}
    _virtual.clear()
    for name, path in sorted(entries(dirs), key=lambda e: (len(Path(e[1]).parts), e[1])):  # shallow ones first
        unique = _unique(name, path, new)
        listed = path if unique == name else os.path.join(os.path.dirname(path), unique)
        if listed != path:
            _virtual[listed] = path
        new[unique] = listed
    module_list.clear()
    module_list.update(new)


def may_hold_vae(path: str) -> bool:
    """Whether a file may hold a VAE, read from what is cheap: a safetensors header's keys (a VAE has
    ``decoder.conv_in.weight``, maybe under a checkpoint prefix); a GGUF file never (Forge's quantised text
    encoders); a pickle cannot be told without reading it, so yes (vae_core reads it with ``weights_only``)."""
    lower = path.lower()
    if lower.endswith(".gguf"):
        return False
    if lower.endswith((".safetensors", ".sft")):
        try:
            from safetensors import safe_open
            with safe_open(path, framework="pt") as f:
                return any(k.endswith("decoder.conv_in.weight") for k in f.keys())
        except Exception:  # noqa: BLE001 - unreadable: vae_core's reader says why, naming the file
            return True
    return True


def read_vae(path: str) -> dict:
    """An LDM-keyed VAE state dict from any format (VaeLoadError: no VAE there, naming the path)."""
    sd, raw, layout, prefix = ldm_state_dict_from_file(path)
    log.info("VAE pack: %s read as %s keys%s from %s", path, layout, f" under {prefix!r}" if prefix else "",
             raw.container)
    return sd


def check_fits(sd: dict, path: str, config_file: Path, repo: str) -> None:
    """Refuse a VAE whose shape differs from the one Forge builds from ``config_file`` (diffusers ``AutoencoderKL``).

    Raises:
        VaeLoadError: naming the file, its widths and latent channels, and the model's.
    """
    if not config_file.is_file():
        return  # a model whose VAE Forge does not build from a config: nothing to compare with
    want = json.loads(config_file.read_text())
    cfg, family = kl_family_of(sd, path)
    found = ([cfg.ch * m for m in cfg.ch_mult], cfg.latent_channels, cfg.num_res_blocks)
    expected = (list(want.get("block_out_channels", [])), want.get("latent_channels"), want.get("layers_per_block"))
    if found != expected:
        raise VaeLoadError(path, f"a {family} VAE with widths {found[0]}, {found[1]} latent channels and {found[2]} "
                           "res blocks per level",
                           f"the VAE shape of the loaded model ({repo}: widths {expected[0]}, {expected[1]} latent "
                           f"channels, {expected[2]} res blocks); choose a VAE made for this model")


def install(entry: ModuleType, loader: ModuleType, sd_models: ModuleType, sd_vae: ModuleType,
            models_path: Callable[[], str], vae_dir: Callable[[], Any]) -> None:
    """Wrap Forge's functions (idempotent: always wraps the stored originals).

    Args:
        entry: ``modules_forge.main_entry``; loader: ``backend.loader``; sd_models: ``modules.sd_models``;
            sd_vae: ``modules.sd_vae``, whose ``refresh_vae_list`` the API's ``/sdapi/v1/refresh-vae`` calls (it then
            re-lists the VAE folders in Forge's list too: files added after start-up, also without a UI).
        models_path, vae_dir: Forge's ``paths.models_path`` and ``cmd_opts.vae_dir``, read at each refresh.
    """
    orig: dict[str, Callable[..., Any]] = {}
    for module, names in ((entry, ("refresh_models", "modules_change")),
                          (loader, ("load_torch_file", "replace_state_dict")),
                          (sd_models, ("forge_loader",)), (sd_vae, ("refresh_vae_list",))):
        kept = module.__dict__.setdefault("_vae_pack_originals", {n: getattr(module, n) for n in names})
        orig.update(kept)

    def dirs() -> list[Path]:
        return vae_dirs(models_path(), vae_dir())

    def refresh_models(*args: Any, **kwargs: Any) -> Any:
        out = orig["refresh_models"](*args, **kwargs)
        relist(entry.module_list, dirs())
        return (out[0], entry.module_list.keys()) if isinstance(out, tuple) and len(out) == 2 else out

    def modules_change(module_values: Any, *args: Any, **kwargs: Any) -> Any:
        """Forge resolves each choice by base name; a full path (API callers, a saved config, Forge restoring a
        hires choice) is mapped to its own entry first, so a renamed duplicate's path never loads the other file."""
        by_path = {_key(path): name for name, path in entry.module_list.items()}
        by_path.update({_key(real): os.path.basename(listed) for listed, real in _virtual.items()})
        if isinstance(module_values, (list, tuple)):
            module_values = [by_path.get(_key(v), v) if isinstance(v, str) and os.path.isabs(v) else v
                             for v in module_values]
        return orig["modules_change"](module_values, *args, **kwargs)

    def refresh_vae_list(*args: Any, **kwargs: Any) -> Any:
        out = orig["refresh_vae_list"](*args, **kwargs)
        relist(entry.module_list, dirs())
        return out

    def resolve(path: str) -> str:
        """The real file or folder of a listed path (a saved virtual path is resolved after a re-listing, e.g.
        with ``--nowebui``, where Forge never lists)."""
        if path not in _virtual and not os.path.exists(path) and _inside(path, dirs()):
            relist(entry.module_list, dirs())
        return _virtual.get(path, path)

    def load_torch_file(ckpt: Any, safe_load: bool = False, device: Any = None) -> Any:
        if not isinstance(ckpt, (str, os.PathLike)):
            return orig["load_torch_file"](ckpt, safe_load=safe_load, device=device)
        real = resolve(str(ckpt))
        if not (_inside(real, dirs()) or real in _virtual.values()):
            return orig["load_torch_file"](ckpt, safe_load=safe_load, device=device)  # checkpoint, text encoders
        sd = None
        if os.path.isdir(real) or may_hold_vae(real):  # not: e.g. a text encoder kept beside the VAEs
            try:
                sd = read_vae(real)
            except VaeLoadError as err:
                if os.path.isdir(real) or "no VAE" not in err.found:
                    raise
        if sd is None:  # outside the handler: a failure of Forge's reader is reported as itself
            log.info("VAE pack: %s holds no VAE; read by Forge (pickles with weights_only)", real)
            return read_other(real, device)
        if device is not None and str(device) != "cpu":
            sd = {k: v.to(device) for k, v in sd.items()}
        _origin[id(sd)] = real
        return sd

    def read_other(path: str, device: Any) -> Any:
        if path.lower().endswith(".sft"):  # Forge reads .sft as a pickle
            from safetensors.torch import load_file
            return load_file(path, device=str(device or "cpu"))
        return orig["load_torch_file"](path, safe_load=True, device=device)

    def replace_state_dict(sd: dict, asd: dict, guess: Any) -> Any:
        path = _origin.pop(id(asd), None)
        if path is not None and "decoder.conv_in.weight" in asd:
            repo = str(getattr(guess, "huggingface_repo", ""))
            config = Path(loader.__file__).parent / "huggingface" / repo / "vae" / "config.json"
            check_fits(asd, path, config, repo)
        return orig["replace_state_dict"](sd, asd, guess)

    def forge_loader(*args: Any, **kwargs: Any) -> Any:
        _origin.clear()
        try:
            return orig["forge_loader"](*args, **kwargs)
        except ValueError as exc:  # Forge re-raises any failure as "Failed to recognize model type!"
            ours = _ours(exc)
            if ours is None:
                raise
            ours.status_code = 422  # Forge's API answers with an exception's status_code
            raise ours from None
        finally:
            _origin.clear()

    for module, fns in ((entry, (refresh_models, modules_change)), (loader, (load_torch_file, replace_state_dict)),
                        (sd_models, (forge_loader,)), (sd_vae, (refresh_vae_list,))):
        for fn in fns:
            fn._vae_pack = True  # type: ignore[attr-defined]
            setattr(module, fn.__name__, fn)
    if entry.module_list:  # a fork that listed at import, before extensions load (an empty list is filled when
        relist(entry.module_list, dirs())  # the UI is built, by the wrapped refresh_models)


def _ours(exc: BaseException) -> Optional[VaeLoadError]:
    """Our error behind Forge's bare ``except: raise ValueError(...)``: the exception it was handling."""
    for seen in (exc, exc.__context__):
        if isinstance(seen, VaeLoadError):
            return seen
    return None


def uninstall(*modules: ModuleType) -> None:
    """Restore the original functions on each module."""
    for module in modules:
        for name, fn in (module.__dict__.pop("_vae_pack_originals", None) or {}).items():
            setattr(module, name, fn)
