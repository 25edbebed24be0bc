"""What a VAE family is: the protocol every family folder implements, and the steps all of them share.

A *family* is one network design (``kl``: the AutoencoderKL of SD1/2, SDXL, SD3, Flux.1, Flux.2; ``wan``: the Wan 2.1
design of Qwen-Image's VAE; ``tiny``: TAESD and its kin). It says, in one place (its ``family.py``):

* how it is recognised from a state dict's keys (:meth:`Family.recognises`) and renamed to its canonical keys
  (:meth:`Family.canonical`, naming near misses in the error);
* its config, read from shapes (:meth:`Family.config`), and how its network is built (:meth:`Family.build`);
* its latent format: family name, scaling/shift or per-channel statistics (:meth:`Family.latent_format`,
  :meth:`Family.scale_latents`);
* its precision story (:attr:`Family.fp16_fix`, or :attr:`Family.no_fp16_fix` saying why not);
* its tiling plan (:meth:`Family.tiled`: GroupNorm sweeps or halos; :meth:`Family.cache_needed`);
* how it is saved (:meth:`Family.file_state_dict`, :meth:`Family.diffusers_config`).

Loading, :class:`~vae_core.vae.Vae`, the host engine, the CLI, the benchmark and the lab ask the family
(:mod:`vae_core.families.registry`) and never branch on a network's type themselves.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import nn

from ..errors import VaeInputError, VaeLoadError
from ..io.formats import check_tensor_kinds
from ..tiling.halo import halo_tiled

__all__ = ["Canonical", "LoadRequest", "LatentFormat", "Family", "HaloFamily", "build_exact", "check_tensors",
           "weights_note",
           "FLOAT8", "count_parameters", "MAX_WIDTH", "MAX_IMAGE_CHANNELS",
           "MAX_LATENT_CHANNELS"]

#: Bounds on shapes every family checks before building, far beyond any real VAE (widths ≤ 1024, 3 image channels,
#: ≤ 128 latent channels): anything larger is a broken or crafted file, refused naming the value.
MAX_WIDTH = 8192
MAX_IMAGE_CHANNELS = 16
MAX_LATENT_CHANNELS = 1024

#: float8 dtypes (weights stored in fp8 to halve files); torch has no isfinite for them, so they are checked (and run)
#: upcast: every float8 value is exact in float16 and float32.
FLOAT8 = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
               if hasattr(torch, name))


@dataclass
class Canonical:
    """A state dict renamed to a family's canonical keys: ``layout`` the key layout found (e.g. ``ldm``,
    ``diffusers``, ``original-decoder``), ``prefix`` the full-checkpoint prefix stripped, ``sources`` notes for
    ``VaeInfo.sources`` (e.g. the twin file a TAESD half was merged with)."""

    state_dict: dict[str, torch.Tensor]
    layout: str
    prefix: str = ""
    sources: dict[str, str] = field(default_factory=dict)


@dataclass
class LoadRequest:
    """What the loader knows besides the weights: the user's overrides and where else facts may come from.

    Attributes:
        family, scaling_factor, shift_factor: the user's overrides (None: decide from the file).
        path: what the user gave (file name hints); ``weights_file``: the file the tensors came from.
        config, config_path: a diffusers ``config.json`` and its path; ``metadata``: safetensors metadata.
        all_keys: every key of a full checkpoint (its other parts hint at the family).
        settings: settings shapes cannot give (``norm_groups``, ``bn_eps``; HunyuanVideo 1.0's ``chunked`` and
            ``causal_attention``), from the caller (:attr:`Family.user_settings`).
        read_sibling: reads a file beside ``weights_file`` (a TAESD half's twin); None where there is no file.
        host: the weights are a host's live module (no files, no name hints).
    """

    family: Optional[str] = None
    scaling_factor: Optional[float] = None
    shift_factor: Optional[float] = None
    path: Optional[Path] = None
    weights_file: Optional[Path] = None
    config: Optional[Mapping[str, Any]] = None
    config_path: Optional[Path] = None
    metadata: Optional[Mapping[str, str]] = None
    all_keys: Iterable[str] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    read_sibling: Optional[Callable[[Path], Mapping[str, torch.Tensor]]] = None
    host: bool = False


@dataclass
class LatentFormat:
    """A loaded VAE's latent format: ``family`` (``sd1``, ``sdxl``, ``flux``, ``taesd``, ``qwen-image``, ...), the
    scalar ``scaling_factor``/``shift_factor`` (diffusion latents = (raw - shift) · scale), ``sources`` saying where
    each came from, and ``tensors``: values the network holds for it that the file may lack (TAESD's
    ``vae_scale``/``vae_shift``, Qwen-Image's per-channel ``latents_mean``/``latents_std``)."""

    family: str
    scaling_factor: float
    shift_factor: Optional[float]
    sources: dict[str, str]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


#: ``fix(model, sample) -> (fixed fp32 copy, peak_before, peak_after)``: a family's training-free fp16 fix.
Fix = Callable[[nn.Module, Optional[torch.Tensor]], tuple[nn.Module, float, float]]


class Family:
    """The protocol a family implements (a subclass per family folder; one instance in the registry).

    Attributes:
        name: the family's id (``"kl"``, ``"wan"``, ``"tiny"``); ``label``: a phrase for messages.
        network, config_type: its ``nn.Module`` class and config dataclass.
        fp16_fix: ``fix(model, sample) -> (fixed_fp32_copy, peak_before, peak_after)``, or None; then
            ``no_fp16_fix`` says why (shown to the user).
        found: what an error says was found when a file of this family is given where another is expected.
    """

    def __init__(self, name: str, label: str, network: type, config_type: type,
                 fp16_fix: Optional[Fix] = None,
                 no_fp16_fix: str = "", found: str = "") -> None:
        self.name, self.label, self.network, self.config_type = name, label, network, config_type
        self.fp16_fix, self.no_fp16_fix = fp16_fix, no_fp16_fix
        self.found = found or f"a {label}"  # what an error says was found where another family was expected

    def __repr__(self) -> str:
        return f"<VAE family {self.name}: {self.label}>"

    # -- recognising and reading ----------------------------------------------------------------------------
    def recognises(self, sd: Mapping[str, torch.Tensor]) -> bool:
        """Whether ``sd`` (a file's or host module's tensors, any layout, maybe prefixed) holds this family."""
        raise NotImplementedError

    def canonical(self, sd: Mapping[str, torch.Tensor], where: object, request: LoadRequest) -> Canonical:
        """``sd`` renamed to canonical keys (tensors unchanged: renames and views only, so a host's tensors can be
        traced back). Raises VaeLoadError naming what was found, for near misses too."""
        raise NotImplementedError

    def config(self, canon: Canonical, where: object, request: LoadRequest) -> Any:
        """The network config, from the canonical tensors' shapes (bounded: no huge allocation from a bad file)."""
        raise NotImplementedError

    def build(self, config: Any) -> nn.Module:
        """The network for ``config`` on the current default device (the loader builds it on ``meta``)."""
        return self.network(config)

    def describe(self, config: Any) -> str:
        """``"an AutoencoderKL with ..."``: the network a config stands for, for key/shape errors."""
        return f"a {self.label}"

    def latent_format(self, config: Any, canon: Canonical, request: LoadRequest) -> LatentFormat:
        """Family name, scaling/shift (or per-channel statistics) and where each came from."""
        raise NotImplementedError

    # -- running --------------------------------------------------------------------------------------------
    def scale_latents(self, model: nn.Module, fmt: LatentFormat, z: torch.Tensor) -> torch.Tensor:
        """Raw latents → diffusion-model space (default: ``(z - shift) · scale``)."""
        return (z - (fmt.shift_factor or 0.0)) * fmt.scaling_factor

    def unscale_latents(self, model: nn.Module, fmt: LatentFormat, z: torch.Tensor) -> torch.Tensor:
        """Diffusion-model space → raw latents (default: ``z / scale + shift``)."""
        return z / fmt.scaling_factor + (fmt.shift_factor or 0.0)

    def tiled(self, kind: str) -> Callable[[nn.Module, torch.Tensor, int, Any], torch.Tensor]:
        """``tiled(model, t, tile_px, opts)`` for ``kind`` ``"encode"``/``"decode"``: the family's tiling plan."""
        raise NotImplementedError

    def cache_needed(self, model: nn.Module, op: str, height: int, width: int, tile: int,
                     dtype: torch.dtype = torch.float32) -> int:
        """Cache bytes for full-speed exact tiling (0: the plan needs none, e.g. halos)."""
        return 0

    #: the settings a user may give at load time (``load_vae(settings=...)``), what the weights cannot say
    user_settings: tuple[str, ...] = ()

    #: whether the family's networks take videos ``[B, C, T, H, W]`` as well as images
    video: bool = False
    #: whether the encoder is deterministic (no posterior log-variance: nothing to sample)
    deterministic: bool = False
    #: whether hosts hand this family's VAE normalised latents (``scale_latents`` form) rather than raw ones (LTX-Video:
    #: its VAE normalises with its own per-channel statistics in ComfyUI and diffusers alike)
    host_normalised: bool = False

    def check_sides(self, model: nn.Module, t: torch.Tensor, kind: str) -> None:
        """Refuse an image or video ``t`` whose sides ``kind`` cannot run, naming them (default: any side; most
        networks floor sides that are not multiples of their downscale, as their references do)."""

    def check_video(self, model: nn.Module, t: torch.Tensor, kind: str) -> None:
        """Refuse a video ``t`` that ``kind`` cannot run (frame count, sides), naming the value, before any work."""
        raise VaeInputError(f"{kind} input of shape {tuple(t.shape)}: a video, but {self.label} takes images only")

    def video_working_set(self, model: nn.Module, kind: str, frames: int, height: int, width: int,
                          tile: Optional[int], dtype: torch.dtype = torch.float32,
                          schedule: str = "tile") -> dict[str, int]:
        """Estimated peak bytes of a video call (``total``, and its parts) in ``schedule`` (``"tile"``: tile-major,
        ``"level"``: level-major), for the video families."""
        raise VaeInputError(f"a video working set for {self.label}, which takes images only")

    def patched_latents(self, model: nn.Module) -> bool:
        """Whether the diffusion model's latents are the 2×2-patchified, normalised form (Flux.2) rather than raw."""
        return False

    def diffusers_peer(self, model: nn.Module) -> bool:
        """Whether diffusers has this network (``AutoencoderKL`` for kl-f8, ``AutoencoderKLWan`` for Wan): a
        side-by-side peer row in the bench and the lab."""
        return False

    def summary(self, model: nn.Module, fmt: LatentFormat) -> list[tuple[str, str]]:
        """Lines for ``python -m vae_core info``: ``(label, text)`` pairs the CLI prints."""
        return []

    # -- saving ---------------------------------------------------------------------------------------------
    def check_save(self, model: nn.Module, layout: str, what: str) -> None:
        """Refuse a save the target layout cannot hold (VaeInputError naming ``what``)."""

    def file_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
        """The canonical ``sd`` renamed for a file of ``layout`` (``"ldm"``: the original names, ``"diffusers"``)."""
        raise NotImplementedError

    def diffusers_config(self, model: nn.Module, fmt: LatentFormat) -> dict[str, Any]:
        """A diffusers ``config.json`` for a saved folder."""
        raise NotImplementedError

    def host_settings(self, module: nn.Module) -> Optional[dict[str, Any]]:
        """What a host's live VAE module says beyond its tensors (its config, in ``LoadRequest.config`` terms; default
        none): e.g. how the host built LTX's padding."""
        return None

    def file_metadata(self, model: nn.Module, layout: str) -> dict[str, str]:
        """Safetensors metadata a saved file needs beyond the weights (default: none)."""
        return {}


class HaloFamily(Family):
    """A family whose network is local at high resolution (no GroupNorm there): tiled exactly by halos
    (:mod:`vae_core.tiling.halo`) over the stages its network lists (``encode_stages()``/``decode_stages()``)."""

    def tiled(self, kind: str) -> Callable[[nn.Module, torch.Tensor, int, Any], torch.Tensor]:
        if kind == "decode":
            return lambda model, z, tile, opts: halo_tiled(model.decode_stages(), z, tile, model.config.downscale,
                                                           opts)
        def encode(model: nn.Module, x: torch.Tensor, tile: int, opts: Any) -> torch.Tensor:
            if opts.moments:
                raise VaeInputError(f"the posterior of {self.label}: it encodes deterministically; expected the mean")
            return halo_tiled(model.encode_stages(), x, tile, 1, opts)
        return encode


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements."""
    return sum(p.numel() for p in model.parameters())


def weights_note(sd: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``info.sources`` entries about how stored tensors are run: float8 weights are upcast (exactly) on load."""
    f8 = sorted({str(v.dtype).replace("torch.", "") for v in sd.values() if v.dtype in FLOAT8})
    return {"dtype": f"{'/'.join(f8)} tensors upcast to float32 on load (every float8 value is exact there); "
                     "run in the precision asked for"} if f8 else {}


def check_tensors(sd: Mapping[str, torch.Tensor], path: object) -> None:
    """Refuse weights that would load wrong or blow up later, naming the tensors (first few).

    Checks, cheapest first: tensor kinds (:func:`~vae_core.io.formats.check_tensor_kinds`: no meta, sparse, nested,
    quantized or overlapping tensors), no zero-sized tensors, floating-point dtypes, and finite values
    (``torch.isfinite(t).all()`` per tensor).

    Raises:
        VaeLoadError: naming up to three offending tensors and what was wrong with them.
    """
    def fail(found: str, keys: list[str], expected: str) -> None:
        raise VaeLoadError(path, f"{found} in {len(keys)} tensor(s): {keys[:3]}", expected)

    check_tensor_kinds(sd, path)
    empty = [f"{k} {tuple(v.shape)}" for k, v in sd.items() if v.numel() == 0]
    if empty:
        fail("zero-sized tensors", empty, "non-empty weights")
    non_float = [f"{k} ({v.dtype})" for k, v in sd.items() if not v.is_floating_point()]
    if non_float:
        fail("non-float tensors", non_float, "floating-point weights")
    bad = [k for k, v in sd.items() if not bool(torch.isfinite(v.half() if v.dtype in FLOAT8 else v).all())]
    if bad:
        fail("NaN/inf values", bad, "finite weights (the file is corrupt or was saved from a diverged model)")


def expected_tensors(model: nn.Module) -> dict[str, torch.Size]:
    """Every parameter and buffer of ``model`` (non-persistent buffers too) with its shape."""
    return {k: t.shape for k, t in list(model.named_parameters()) + list(model.named_buffers())
            if not k.endswith("num_batches_tracked")}


def check_keys(family: Family, config: Any, got: Mapping[str, torch.Size], expected: Mapping[str, torch.Size],
               where: object) -> None:
    """Refuse unless ``got`` has exactly the ``expected`` keys and shapes, naming the first differences."""
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise VaeLoadError(where, f"{len(missing)} missing keys {missing[:4]} and {len(extra)} unexpected keys "
                           f"{extra[:4]} for {family.describe(config)}", "exactly the keys of that network")
    bad = [f"{k}: {tuple(got[k])} vs {tuple(v)}" for k, v in expected.items() if tuple(got[k]) != tuple(v)]
    if bad:
        raise VaeLoadError(where, f"{len(bad)} shape mismatches ({'; '.join(bad[:3])})",
                           f"the shapes of {family.describe(config)}")


def build_exact(family: Family, config: Any, sd: Mapping[str, torch.Tensor], fmt: LatentFormat,
                where: object) -> nn.Module:
    """Build ``family``'s network for ``config`` on ``meta`` (no random init: it would cost time and consume the
    caller's RNG) and give it exactly ``sd`` plus the format's tensors the file lacks, as float32.

    Raises:
        VaeLoadError: missing or unexpected keys, or shapes that differ, naming the first few.
    """
    with torch.device("meta"):
        model = family.build(config)
    state = dict(sd) | {k: v for k, v in fmt.tensors.items() if k not in sd}
    check_keys(family, config, {k: v.shape for k, v in state.items()}, expected_tensors(model), where)
    persistent = set(model.state_dict())
    model.load_state_dict({k: v.float() for k, v in state.items() if k in persistent}, strict=True, assign=True)
    for key in sorted(set(state) - persistent):  # non-persistent buffers (pipeline constants)
        owner, _, leaf = key.rpartition(".")
        (model.get_submodule(owner) if owner else model)._buffers[leaf] = state[key].float()
    return model.eval().requires_grad_(False)


def replace_config(config: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` for a family config (settings config.json gives that shapes cannot)."""
    return dataclasses.replace(config, **changes) if changes else config


def scale_only_format(request: LoadRequest, name: str, default: float, design: str,
                      tensors: Optional[dict[str, torch.Tensor]] = None) -> LatentFormat:
    """The latent format of a family whose latents are only scaled (HunyuanVideo 1.0 and 1.5): a ``family=`` other
    than ``name`` refused; the scaling factor given, else config.json's ``scaling_factor``, else ``default``, the
    sources saying which (``design``: e.g. ``"HunyuanVideo 1.5"``)."""
    from .scaling import check_factor

    refuse_family(request, (name,), f"a {design}-design VAE")
    cfg = request.config or {}
    sources = {"family": "given" if request.family else f"keys ({design} design)"}
    if request.scaling_factor is not None:
        scale, sources["scaling_factor"] = request.scaling_factor, "given"
    elif cfg.get("scaling_factor") is not None:
        scale = check_factor(cfg["scaling_factor"], "scaling_factor", "config.json", positive=True,
                             path=request.config_path or "config.json")
        sources["scaling_factor"] = "config.json"
    else:
        scale, sources["scaling_factor"] = default, f"{design} default"
    sources["shift_factor"] = f"none ({design} scales only)"
    return LatentFormat(name, float(scale), None, sources, dict(tensors or {}))


def refuse_family(request: LoadRequest, allowed: Iterable[str], what: str) -> None:
    """Raise VaeInputError when the user's ``family=`` is not one of ``allowed`` for a VAE described by ``what``."""
    allowed = tuple(allowed)
    if request.family is not None and request.family not in allowed:
        raise VaeInputError(f"family={request.family!r} for {what}; expected "
                            f"{' or '.join(repr(a) for a in allowed)}")
