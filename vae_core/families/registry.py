"""The registry of VAE families: to add a family, write its folder (``model.py``, ``convert.py``, ``family.py``
implementing :class:`~vae_core.families.base.Family`) and add its instance to :data:`REGISTRY`.

Detection asks each family in order whether it recognises a state dict; the kl family comes last and, when no family
recognises the keys, names what it found (its converter's error lists the keys a VAE would have).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..errors import VaeInputError
from .base import Family
from .hv10.family import HV10
from .hv15.family import HV15
from .kl.family import KL
from .ltx.family import LTX
from .tiny.family import TINY
from .wan.family import WAN

__all__ = ["REGISTRY", "detect", "for_model", "for_config", "by_name"]

#: Every family, in detection order (the most specific key patterns first: HunyuanVideo 1.5's diffusers keys share
#: ``mid_block.resnets.0.norm1.gamma`` with Wan's, so hv15 asks first; LTX's norms have no weights at all; HunyuanVideo
#: 1.0 has the SD VAE's names with 5-D convs under ``.conv``, which kl's keys never have).
REGISTRY: tuple[Family, ...] = (TINY, HV15, LTX, HV10, WAN, KL)


def detect(sd: Mapping[str, torch.Tensor]) -> Family:
    """The family whose keys ``sd`` holds (any layout, maybe under a checkpoint prefix); the kl family when none
    does: its :meth:`~Family.canonical` then raises the descriptive error."""
    return next((f for f in REGISTRY if f.recognises(sd)), KL)


def _find(value: Any, attr: str, what: str) -> Family:
    for f in REGISTRY:
        if isinstance(value, getattr(f, attr)):
            return f
    raise VaeInputError(f"a {type(value).__name__}: no VAE family has this {what}; expected one of "
                        f"{[getattr(f, attr).__name__ for f in REGISTRY]}")


def for_model(model: nn.Module) -> Family:
    """The family of a built network, by its class (VaeInputError: no family builds it)."""
    return _find(model, "network", "network")


def for_config(config: Any) -> Family:
    """The family of a network config (``ModelConfig``, ``WanConfig``, ``HV15Config``, ``HV10Config``, ``LTXConfig``,
    ``TinyConfig``;
    VaeInputError: none)."""
    return _find(config, "config_type", "config")


def by_name(name: str) -> Family:
    """The family called ``name`` (``"kl"``, ``"wan"``, ``"hv15"``, ``"hv10"``, ``"ltx"``, ``"tiny"``)."""
    for f in REGISTRY:
        if f.name == name:
            return f
    raise VaeInputError(f"family {name!r}: unknown; expected one of {[f.name for f in REGISTRY]}")
