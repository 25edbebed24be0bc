"""Translation between ComfyUI's objects and vae_core. Imports ComfyUI modules; holds no VAE logic of its own.

* :func:`to_comfy_vae` builds ComfyUI's own ``comfy.sd.VAE`` from a vae_core Vae (LDM keys), so every core node and
  other pack sees a native VAE (no subclass, no duck typing that core changes could break).
* :func:`engine_for` gives the vae_core engine for ANY incoming ComfyUI VAE: a
  :class:`~vae_core.hosts.attach.HostEngine` that runs on the ComfyUI VAE's own parameters (no second copy), cached weakly per VAE object.
* :func:`run_engine` loads the VAE through ComfyUI's model management (``load_models_gpu`` with its patcher and the
  engine's memory estimate), so ComfyUI accounts for, offloads and reuses it like after its own VAE Decode.
* :func:`guard_comfy_vae` wraps one ComfyUI VAE instance's encode/decode with vae_core's whole-tensor NaN guard.
"""
from __future__ import annotations

import inspect
import logging
import weakref
from typing import Any, Callable, Optional

import torch

import comfy.model_management as mm
import comfy.sd
import comfy.utils

from ..vae_core import Vae, VaeLoadError
from ..vae_core.hosts.attach import HostEngine
from ..vae_core.hosts.guard import guard_methods
from ..vae_core.lab.measure import timed, timed_roundtrip
from ..vae_core.tiling.memory import ESTIMATE_MARGIN, estimate_bytes, plan_call, tile_bytes

log = logging.getLogger(__name__)

_ENGINES: "weakref.WeakKeyDictionary[Any, HostEngine]" = weakref.WeakKeyDictionary()
#: the tile (image px) an ``"auto"`` video call runs with in ComfyUI
VIDEO_AUTO_TILE = 512


class EngineFirstStage(torch.nn.Module):
    """The first stage of an engine-backed ComfyUI VAE: vae_core's network under ComfyUI's latent convention for its
    family. Flux.2: the normalised 2×2-patchified form (128 channels at 1/16 scale); LTX-Video: per-channel
    normalised latents (as core's own LTX VAE gives them): ``encode`` = vae_core encode then the family's
    ``scale_latents``, ``decode`` = ``unscale_latents`` then decode; other families use raw latents. ``vae`` is the
    vae_core network (the attribute name gives :class:`HostEngine` the ``vae.`` prefix it recognises)."""

    def __init__(self, model: torch.nn.Module, normalised_latents: bool) -> None:
        super().__init__()
        self.vae = model
        self.normalised_latents = normalised_latents

    def _family(self):  # noqa: ANN202
        from ..vae_core.families.registry import for_model
        return for_model(self.vae)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(x)
        return self._family().scale_latents(self.vae, None, z) if self.normalised_latents else z

    def decode(self, z: torch.Tensor, **_: Any) -> torch.Tensor:
        return self.vae.decode(self._family().unscale_latents(self.vae, None, z) if self.normalised_latents else z)


def comfy_knows(vae: Vae) -> bool:
    """Whether the running ComfyUI builds this VAE itself: SD-family kl-f8 always; a TAESD with both halves (ComfyUI
    would fill a missing half with random weights) but not TAEF2 (its pool blocks are newer than ComfyUI's TAESD);
    HunyuanVideo 1.0 at its released widths (ComfyUI's keys are ours; its mid-block attention is unmasked);
    Flux.2's (latent BatchNorm) only in versions whose VAE loader knows ``bn.running_mean`` (v0.3.64 does not)."""
    cfg = vae.model.config
    if vae.family.name == "tiny":  # TAEF2's pool blocks: not in v0.3.64's TAESD (engine VAE)
        return cfg.has_encoder and cfg.has_decoder and not cfg.pool
    if vae.family.name == "hv10":  # core builds HunyuanVideo 1.0 at the released widths only (32 latent channels
        # would send the file to its HunyuanImage refiner VAE)
        return (cfg.block_out_channels, cfg.num_res_blocks, cfg.norm_groups, cfg.in_channels, cfg.out_channels,
                cfg.temporal_scale, cfg.z_dim) == ((128, 256, 512, 512), 2, 32, 3, 3, 4, 16)
    if vae.family.name != "kl":
        return False  # Qwen-Image: v0.3.64's Wan VAE assumes Wan's widths and video (5-D) latents
    if not vae.model.config.latent_bn:
        return vae.model.config.decoder_ch is None
    return "bn.running_mean" in inspect.getsource(comfy.sd.VAE.__init__)


def engine_vae(vae: Vae) -> Any:
    """A ``comfy.sd.VAE`` (ComfyUI's own class, built by its own constructor on its trivial pixel-space branch, then
    given our first stage) whose encode/decode run vae_core's network: for families the running ComfyUI predates.
    Core VAE Decode/Encode, our tiled nodes and model management treat it like any VAE."""
    import comfy.model_patcher

    cvae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
    first = EngineFirstStage(vae.model.to("cpu"), vae.family.patched_latents(vae.model) or vae.family.host_normalised)
    first = first.eval().requires_grad_(False).to(cvae.vae_dtype)
    cvae.first_stage_model = first
    cvae.patcher = comfy.model_patcher.ModelPatcher(first, load_device=cvae.device,
                                                   offload_device=mm.vae_offload_device())
    patch = 2 if vae.family.patched_latents(vae.model) else 1
    cvae.downscale_ratio = cvae.upscale_ratio = patch * vae.model.config.downscale
    cvae.latent_channels = patch * patch * vae.info.latent_channels
    cvae.vae_pack_engine = True
    if vae.family.video and vae.info.family != "qwen-image":  # Qwen-Image's VAE: raw image latents, as before
        _video_engine(cvae, vae)
        return cvae
    per_px = estimate_bytes(vae.model, 1, torch.float32) / 4
    ratio = cvae.upscale_ratio ** 2
    cvae.memory_used_decode = lambda shape, dtype: int(per_px * shape[2] * shape[3] * ratio * mm.dtype_size(dtype))
    cvae.memory_used_encode = lambda shape, dtype: int(per_px * shape[2] * shape[3] * mm.dtype_size(dtype))
    return cvae


def _video_engine(cvae: Any, vae: Vae) -> None:
    """ComfyUI's video-VAE conventions on an engine VAE (as core sets them for its own Wan VAE): 5-D latents
    ``[B, C, T, h, w]``, IMAGE frames as one clip, ``1 + ft·(T − 1)`` frames out; memory from the family's streamed
    working-set estimate (untiled: frame-count independent but for the output)."""
    f, ft = vae.model.config.downscale, vae.model.config.temporal_scale
    cvae.latent_dim, cvae.not_video = 3, False
    cvae.upscale_ratio = (lambda a: max(0, a * ft - (ft - 1)), f, f)
    cvae.downscale_ratio = (lambda a: max(0, (a + ft - 1) // ft), f, f)
    cvae.upscale_index_formula = cvae.downscale_index_formula = (ft, f, f)
    model, family = vae.model, vae.family

    def need(kind: str, frames: int, h: int, w: int, dtype: torch.dtype) -> int:
        return int(family.video_working_set(model, kind, max(1, frames), h, w, None, dtype)["total"])

    cvae.memory_used_decode = lambda shape, dtype: need("decode", 1 + ft * (shape[2] - 1), shape[3] * f, shape[4] * f,
                                                        dtype)
    cvae.memory_used_encode = lambda shape, dtype: need("encode", shape[2], shape[3], shape[4], dtype)


def to_comfy_vae(vae: Vae) -> Any:
    """A ``comfy.sd.VAE`` with ``vae``'s weights: ComfyUI's own network where the running ComfyUI knows the family
    (with our GroupNorm eps, which the fp16 fix changes), else :func:`engine_vae`."""
    if not comfy_knows(vae):
        return engine_vae(vae)
    sd = {k: v.detach().cpu() for k, v in vae.model.state_dict().items()}
    if vae.family.name == "tiny":  # ComfyUI's TAESD keys, with its latent scaling parameters
        sd = vae.family.file_state_dict(vae.model, sd, "ldm")
        cvae = comfy.sd.VAE(sd=sd)
        cvae.throw_exception_if_invalid()
        return cvae
    kwargs: dict[str, Any] = {"sd": sd, "config": comfy_config(vae) if vae.family.name == "kl" else None}
    if "metadata" in inspect.signature(comfy.sd.VAE.__init__).parameters:
        kwargs["metadata"] = {"vae_pack.family": vae.info.family}
    cvae = comfy.sd.VAE(**kwargs)
    cvae.throw_exception_if_invalid()
    engine_for(cvae).set_host_eps(vae.model)  # the fp16 fix changes eps; ComfyUI builds its norms with the default
    return cvae


def comfy_config(vae: Vae) -> Optional[dict]:
    """``config`` for ``comfy.sd.VAE``: None for SD's own shapes (ComfyUI detects SD1/2/XL/SD3/Flux itself), an LDM
    ``ddconfig`` for other widths (ComfyUI would otherwise assume SD's 128/256/512/512)."""
    cfg = vae.model.config
    if cfg.ch == 128 and tuple(cfg.ch_mult) == (1, 2, 4, 4) and cfg.num_res_blocks == 2 and cfg.norm_groups == 32:
        return None
    if not cfg.use_quant_conv or cfg.norm_groups != 32:
        raise VaeLoadError(vae.info.path, f"a VAE with widths {[cfg.ch * m for m in cfg.ch_mult]}, "
                           f"{cfg.norm_groups} groups and quant convs {'on' if cfg.use_quant_conv else 'off'}",
                           "SD's widths, or quant convs and 32 groups, to build a ComfyUI VAE")
    dd = {"double_z": True, "z_channels": cfg.z_channels, "resolution": 256, "in_channels": cfg.in_channels,
          "out_ch": cfg.out_channels, "ch": cfg.ch, "ch_mult": list(cfg.ch_mult), "num_res_blocks": cfg.num_res_blocks,
          "attn_resolutions": [], "dropout": 0.0}
    return {"params": {"ddconfig": dd, "embed_dim": cfg.embed_dim}}


def engine_for(cvae: Any) -> HostEngine:
    """The vae_core engine on ``cvae.first_stage_model``'s own parameters, built once per VAE object.

    Raises:
        VaeLoadError: a VAE of no family vae_core knows (video Wan 2.2, audio, pixel-space VAEs, ...).
    """
    engine = _ENGINES.get(cvae)
    if engine is None:
        cvae.throw_exception_if_invalid()
        engine = HostEngine(cvae.first_stage_model, name=f"ComfyUI VAE ({type(cvae.first_stage_model).__name__})")
        _ENGINES[cvae] = engine
    return engine


def run_engine(cvae: Any, fn: Callable[[Vae, Optional[int], str], torch.Tensor], image_shape: tuple[int, int, int],
               tile: Any, video: Optional[tuple[str, int]] = None) -> torch.Tensor:
    """Run ``fn(vae, tile, schedule)`` on the engine of ``cvae`` after ComfyUI's model management has loaded the
    VAE (``schedule``: the video schedule to run, ``"auto"`` for images).

    ``image_shape`` is ``(batch, height, width)`` of the images decoded or encoded; ``tile`` an edge in px, None
    (untiled) or ``"auto"``. For ``"auto"`` the call is planned against the device's *total* usable memory first
    (:func:`vae_core.tiling.memory.plan_call`): untiled only where it fits at all, else the largest tile that fits.
    Model
    management is then asked for the working set of the call that will really run, so it evicts the UNet and text
    encoders only when that buys an untiled call (a 4K decode on a 12 GB card tiles anyway and evicts nothing it need
    not). The whole VAE is loaded (the engine runs plain modules on the loaded weights).

    ``video``: ``(kind, pixel frames)`` of a video call; its working set is the family's streamed estimate
    (:meth:`~vae_core.families.wan.family.WanFamily.video_working_set`), and ``"auto"`` means 512-px tiles (the
    streamed working set does not grow with the frame count, so the default tile fits any clip that an image of
    the frame size fits). It is planned against the device's total usable memory too: level-major (about the
    untiled cost) where its working set fits there, so model management evicts other models only for that; else
    tile-major (least memory).
    """
    engine = engine_for(cvae)
    model = engine.vae.model
    dtype = engine.vae.guard.working_dtype or getattr(cvae, "vae_dtype", torch.float32)
    batch, height, width = image_shape
    schedule = "auto"
    if video is not None:
        tile = VIDEO_AUTO_TILE if tile == "auto" else tile
        family = engine.vae.family
        level = family.video_working_set(model, video[0], video[1], height, width, tile, dtype, "level")["total"]
        if level * ESTIMATE_MARGIN <= _usable(cvae):
            schedule, need = "level", level
        else:
            schedule = "tile"
            need = family.video_working_set(model, video[0], video[1], height, width, tile, dtype, "tile")["total"]
    elif tile == "auto":
        tile, need = plan_call(model, height, width, batch, dtype, _usable(cvae))
    elif tile is None:
        need = estimate_bytes(model, batch * height * width, dtype)
    else:
        need = tile_bytes(model, int(tile), dtype)
    mm.load_models_gpu([cvae.patcher], memory_required=need, force_full_load=True)
    with engine.attached() as vae:
        return fn(vae, tile, schedule)


def _usable(cvae: Any) -> int:
    """The device's total memory less what must stay: the VAE's weights and ComfyUI's reserve."""
    device = getattr(cvae, "device", None) or mm.get_torch_device()
    weights = mm.module_size(cvae.first_stage_model) if hasattr(mm, "module_size") else 0
    reserved = mm.extra_reserved_memory() if hasattr(mm, "extra_reserved_memory") else 0
    return int(mm.get_total_memory(device)) - int(weights) - int(reserved)


def comfy_tiled(cvae: Any, method: str, t: torch.Tensor, tile: int) -> torch.Tensor:
    """ComfyUI's own tiled call, for a VAE the engine does not know: ``decode`` takes raw latents and returns IMAGE
    ``[B, H, W, C]`` in 0..1; ``encode`` takes IMAGE and returns raw latents. ``tile`` in image pixels (0 = 512);
    the overlap is a quarter (decode) or an eighth (encode) of the tile, ComfyUI's node defaults' proportions."""
    tile = tile or 512
    if method == "decode":
        r = int(cvae.spacial_compression_decode())
        lt = max(8, tile // r)
        return cvae.decode_tiled(t, tile_x=lt, tile_y=lt, overlap=max(1, lt // 4))
    return cvae.encode_tiled(t, tile_x=tile, tile_y=tile, overlap=max(8, tile // 8))


def progress_and_cancel() -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A per-tile ComfyUI progress bar and the interrupt check (raises ComfyUI's own interrupt exception)."""
    bar: dict[str, Optional[comfy.utils.ProgressBar]] = {"bar": None}

    def progress(done: int, total: int) -> None:
        if bar["bar"] is None or bar["bar"].total != total:
            bar["bar"] = comfy.utils.ProgressBar(total)
        bar["bar"].update_absolute(done, total)

    return progress, mm.throw_exception_if_processing_interrupted


def guard_comfy_vae(cvae: Any) -> Any:
    """Wrap this VAE instance's ``decode``/``encode`` so non-finite outputs are retried in bf16/fp32 (whole tensor)."""
    if not getattr(cvae, "_vae_pack_guarded", False):
        guard_methods(cvae, ("decode", "encode"), lambda: cvae.first_stage_model, dtype_now=lambda: cvae.vae_dtype,
                      set_dtype=lambda d: setattr(cvae, "vae_dtype", d),
                      device=lambda x: torch.device(getattr(cvae, "device", "cpu")))
        cvae._vae_pack_guarded = True
    return cvae


def comfy_roundtrip(cvae: Any, x: torch.Tensor, tile: int, mode: str, precision: str) -> tuple[torch.Tensor, float, str]:
    """Encode + decode images ``x`` (``[B, 3, H, W]`` in [-1, 1]) with any ComfyUI VAE, for VAE Compare.

    The engine runs it where vae_core knows the VAE (``tile`` px, 0 = untiled; ``precision`` ``"as loaded"`` or a
    dtype name, run on a temporary copy in that dtype); else ComfyUI's own ``encode``/``decode`` (untiled, in the
    VAE's own dtype). Returns ``(images [B, 3, H, W] about [-1, 1], seconds of the encode + decode alone, how it
    ran)``."""
    try:
        engine_for(cvae)  # raises for a VAE the engine does not know
    except VaeLoadError as exc:
        if getattr(cvae, "patcher", None) is not None:  # load first, so the time is the round trip's alone
            mm.load_models_gpu([cvae.patcher])
        img, seconds = timed(lambda: cvae.decode(cvae.encode(((x + 1) / 2).movedim(1, -1))))
        img = img.reshape(-1, *img.shape[-3:])[: x.shape[0]]
        ignored = [what for what, on in (("tile", bool(tile)), ("precision", precision != "as loaded")) if on]
        how = f"ComfyUI's own encode/decode, untiled, in the VAE's own dtype ({exc.found})"
        if ignored:
            how += f"; {' and '.join(ignored)} not applied to it"
        return img.movedim(-1, 1).float().cpu() * 2 - 1, seconds, how
    ran: dict[str, Any] = {}

    def call(v: Vae, planned: Optional[int], schedule: str) -> torch.Tensor:
        y, ran["seconds"], ran["how"] = timed_roundtrip(v, x, planned, mode, precision, tile_label=tile)
        return y

    y = run_engine(cvae, call, (x.shape[0], x.shape[-2], x.shape[-1]), tile or None)
    return y.float().cpu(), ran["seconds"], ran["how"]
