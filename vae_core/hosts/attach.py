"""Run the vae_core engine on a host's own VAE module, without a second copy of its weights.

A host (ComfyUI, A1111, a diffusers pipeline) already holds the VAE as an ``nn.Module`` whose parameters are named in
the LDM layout (ComfyUI, A1111's ``first_stage_model``) or the diffusers layout (``diffusers.AutoencoderKL``), bare
or under a prefix; or a TAESD-design autoencoder (ComfyUI's ``taesd_encoder``/``taesd_decoder`` with
``vae_scale``/``vae_shift``, diffusers' ``AutoencoderTiny``); or a Wan 2.1-design VAE (Qwen-Image; ComfyUI's Wan VAE,
diffusers' ``AutoencoderKLQwenImage``). :class:`HostEngine` builds the matching vae_core network as a *skeleton* on the
meta device once, and for each call points its parameters at the host's current tensors (aliases: same storage;
diffusers' Linear attention weights ``[C, C]`` are viewed as ``[C, C, 1, 1]``), copying the GroupNorm eps too (an
fp16 fix changes them). After the call the skeleton is emptied again, so it never keeps a host tensor alive (the host
may move or free its weights between calls) and never costs memory of its own::

    engine = HostEngine(host_vae_module, name="ComfyUI VAE")
    with engine.attached() as vae:          # a vae_core.Vae on the host's device and dtype
        images = vae.decode(z, tile=512)

The engine never changes the host's tensors itself: a dtype fallback of the NaN guard casts the skeleton's aliases
(a temporary copy for that call), not the host module. Writing into ``vae.model``'s parameters in place (as the
A1111 fp16 fix does with ``copy_``) does write into the host's storage.
"""
from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..errors import VaeLoadError
from ..families.base import LoadRequest, check_keys, check_tensors, count_parameters, expected_tensors
from ..families.registry import detect
from ..vae import Vae, VaeInfo

__all__ = ["HostEngine"]

log = logging.getLogger(__name__)


def _host_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (Flux.2's latent BatchNorm statistics are buffers), detached aliases."""
    out = {k: p.detach() for k, p in module.named_parameters()}
    out.update({k: b.detach() for k, b in module.named_buffers() if not k.endswith("num_batches_tracked")})
    return out


class HostEngine:
    """A vae_core :class:`Vae` that runs on ``module``'s own parameters.

    Args:
        module: the host's VAE module (LDM or diffusers parameter names, bare or under ``first_stage_model.``/
            ``vae.``; other parameters, e.g. a loss network, are ignored).
        name: how errors and ``info.path`` name it (e.g. ``"ComfyUI VAE"``).
    Raises:
        VaeLoadError: the module holds no network of a known family (:mod:`vae_core.families.registry`), naming
            what it found.
    """

    def __init__(self, module: nn.Module, name: str = "host VAE") -> None:
        self.name = name
        self._module = weakref.ref(module)
        self._build(module)

    def _build(self, module: nn.Module) -> None:
        tensors = _host_tensors(module)
        # Trace each canonical key back to its host key: convert meta stand-ins and follow views to their base.
        stand_ins = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()}
        owner = {id(t): k for k, t in stand_ins.items()}
        family = detect(stand_ins)
        request = LoadRequest(path=self.name, host=True, config=family.host_settings(module))
        canon = family.canonical(stand_ins, self.name, request)
        self._sources: dict[str, tuple[str, torch.Size]] = {}
        for key, t in canon.state_dict.items():
            src = owner.get(id(t if t._base is None else t._base))
            if src is None:  # cannot happen with the converters' renames and views; refuse rather than guess
                raise RuntimeError(f"{self.name}: {key!r} is not a view of a host parameter")
            self._sources[key] = (src, t.shape)
        real = {k: tensors[src].reshape(shape) for k, (src, shape) in self._sources.items()}
        check_tensors(real, self.name)
        canon.state_dict = real
        cfg = family.config(canon, self.name, request)
        fmt = family.latent_format(cfg, canon, request)
        # what the network holds that the host lacks (TAESD's latent scaling, Qwen-Image's statistics): constants
        self._constants = {k: v for k, v in fmt.tensors.items() if k not in real}
        with torch.device("meta"):
            model = family.build(cfg).eval().requires_grad_(False)
        expected = expected_tensors(model)
        got = {k: shape for k, (_, shape) in self._sources.items()} | {k: v.shape for k, v in self._constants.items()}
        check_keys(family, cfg, got, expected, self.name)
        info = VaeInfo(path=self.name, container="host module", layout=canon.layout, prefix=canon.prefix,
                       family=fmt.family, latent_channels=cfg.latent_channels, scaling_factor=fmt.scaling_factor,
                       shift_factor=fmt.shift_factor,
                       stored_dtype=str(next(iter(tensors.values())).dtype).replace("torch.", ""),
                       parameters=count_parameters(model), config=cfg, sources=fmt.sources)
        self.vae = Vae(model, info)
        self._slots = {k: (model.get_submodule(k.rpartition(".")[0]), k.rpartition(".")[2]) for k in expected}
        self._empty = dict(model.named_parameters()) | dict(model.named_buffers())
        self._buffers = {k for k, _ in model.named_buffers()}
        self._signature = {k: v.shape for k, v in tensors.items()}
        # GroupNorm eps: host module name -> skeleton module name (module of a mapped weight)
        self._norms = {src.rpartition(".")[0]: key.rpartition(".")[0] for key, (src, _) in self._sources.items()
                       if isinstance(model.get_submodule(key.rpartition(".")[0]), nn.GroupNorm)}

    @contextmanager
    def attached(self) -> Iterator[Vae]:
        """Yield :attr:`vae` with its parameters pointing at the host module's current tensors (re-read if the host
        changed their names or shapes since), emptied again on exit."""
        module = self._module()
        if module is None:
            raise VaeLoadError(self.name, "a host module that was freed", "the module this engine was built on")
        tensors = _host_tensors(module)
        if {k: v.shape for k, v in tensors.items()} != self._signature:
            log.info("%s: the host replaced its VAE parameters; re-reading their layout", self.name)
            guard = self.vae.guard
            self._build(module)
            self.vae.guard = guard
        for key, (src, shape) in self._sources.items():
            owner, leaf = self._slots[key]
            if key in self._buffers:
                owner._buffers[leaf] = tensors[src].reshape(shape)
            else:
                owner._parameters[leaf] = nn.Parameter(tensors[src].reshape(shape), requires_grad=False)
        host_modules = dict(module.named_modules())
        for host_name, mine in self._norms.items():
            if hasattr(host_modules.get(host_name), "eps"):
                self.vae.model.get_submodule(mine).eps = host_modules[host_name].eps
        like = next(iter(tensors.values()))
        for key, value in self._constants.items():
            owner, leaf = self._slots[key]
            if key in self._buffers:
                owner._buffers[leaf] = value.to(like.device)
            else:
                owner._parameters[leaf] = nn.Parameter(value.to(like.device, like.dtype), requires_grad=False)
        self.vae.guard.forget_weights()  # the host's tensors are the weights as loaded, for every call
        try:
            yield self.vae
        finally:
            self.vae.guard.forget_weights()  # no copy of the host's weights outlives the call
            for key, p in self._empty.items():
                owner, leaf = self._slots[key]
                (owner._buffers if key in self._buffers else owner._parameters)[leaf] = p

    def set_host_eps(self, model: nn.Module) -> None:
        """Give the host module's GroupNorms the eps of ``model``'s (a vae_core model of the same config, e.g. after
        an fp16 fix, which changes eps with the weights), matching them by the host's own names."""
        module = self._module()
        if module is None:
            raise VaeLoadError(self.name, "a host module that was freed", "the module this engine was built on")
        host_modules = dict(module.named_modules())
        for host_name, mine in self._norms.items():
            if host_name in host_modules:
                host_modules[host_name].eps = model.get_submodule(mine).eps
