"""Which A1111-style host this is, read from what it exposes (never from folder or package names).

* **Forge main ("Forge2") and Forge Neo**: VAEs are chosen in the "VAE / Text Encoder" list that
  ``modules_forge.main_entry.refresh_models`` fills (``module_list``: name → path) and loaded with the whole model by
  ``backend.loader.forge_loader``; the model's VAE is a patcher object at ``sd_model.forge_objects.vae`` (its
  ``first_stage_model`` holds the weights; ``sd_model.first_stage_model`` is None in Forge main and the same module
  in Neo). :func:`forge_entry` finds the list, :func:`forge_vae` the VAE object.
* **A1111**: ``modules.sd_vae`` loads VAEs and ``sd_model.first_stage_model`` is the module that runs: the A1111
  hooks. **reForge, Forge Classic** (Forge1-based): A1111's ``sd_vae`` list is live, and their Forge-style VAE object
  decodes the same module ``first_stage_model`` names, so :func:`forge_vae` finds that object (a forward swap for
  tiling unless its ``decode`` looks up the patcher's wrappers; the guard's retry sets its ``vae_dtype``).
"""
from __future__ import annotations

import importlib
import inspect
from types import ModuleType
from typing import Any, Optional

from torch import nn

__all__ = ["forge_entry", "forge_vae", "looks_up_wrappers"]


def forge_entry() -> Optional[ModuleType]:
    """``modules_forge.main_entry`` when it keeps Forge2's module list (Forge main, Neo), else None."""
    try:
        entry = importlib.import_module("modules_forge.main_entry")
    except Exception:  # noqa: BLE001 - not Forge2 (A1111 has no modules_forge; reForge's has no main_entry list)
        return None
    ok = isinstance(getattr(entry, "module_list", None), dict) and callable(getattr(entry, "refresh_models", None))
    return entry if ok else None


def forge_vae(sd_model: Any) -> Any:
    """The Forge VAE object (``.first_stage_model``, ``.patcher``, ``.vae_dtype``) that decodes for ``sd_model``: its
    module is ``sd_model.first_stage_model`` or that is None. None where ``first_stage_model`` is another module or
    there is no such object (A1111)."""
    vae = getattr(getattr(sd_model, "forge_objects", None), "vae", None)
    fsm = getattr(vae, "first_stage_model", None)
    if not isinstance(fsm, nn.Module) or getattr(vae, "patcher", None) is None:
        return None
    own = getattr(sd_model, "first_stage_model", None)
    return vae if own is None or own is fsm else None


def looks_up_wrappers(vae: Any) -> bool:
    """Whether this VAE's ``decode``/``encode`` call the patcher's ``model_vae_decode_wrapper`` /
    ``model_vae_encode_wrapper`` (Forge main does; Neo's stored methods do not)."""
    try:
        source = inspect.getsource(type(vae).decode) + inspect.getsource(type(vae).encode)
    except (OSError, TypeError):
        return False
    return "model_vae_decode_wrapper" in source and "model_vae_encode_wrapper" in source
