"""The video benchmark (``python -m vae_core bench --frames N``): time, peak memory, fidelity, temporal seam and
FLOPs of a video VAE's untiled (streamed reference) call, our exact tiling in both schedules, and diffusers' network
(``AutoencoderKLWan``, ``AutoencoderKLHunyuanVideo15``) untiled and with ``enable_tiling()`` on the same weights, each in a fresh worker process
(:func:`vae_core.lab.bench.measure`).

Inputs: a clip of ``frames`` frames panned across the bundled photo (2 px to the right per frame, so there is
motion for a temporal seam to show on), ``W``×``H`` px (``size``), in [-1, 1]; a decode takes that clip's latents (encoded
untiled in the worker, outside the timing) for a trained ``--vae``, or unit Gaussian latents for the random-weight
model (Wan 2.1's real widths, seed 0). FLOPs are counted on the meta device at the model's real widths.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Optional

import torch

__all__ = ["video_model", "video_input", "diffusers_video", "video_call", "video_flop_ratio", "peer_flop_ratio",
           "peer_decode_args"]

#: diffusers' tile stride as a share of the tile (its default 192 of 256)
PEER_STRIDE = 0.75


def video_model(spec: dict[str, Any]) -> torch.nn.Module:
    """The ``--vae`` network, or a random-weight Wan 2.1 VAE at its real widths (seed 0)."""
    from ..families.registry import by_name
    from ..loading import load_vae

    if spec.get("vae"):
        return load_vae(spec["vae"], settings=spec.get("settings")).model
    torch.manual_seed(0)
    wan = by_name("wan")
    return wan.build(wan.config_type(**spec.get("config", {}))).eval().requires_grad_(False)


def video_input(spec: dict[str, Any], model: torch.nn.Module, device: torch.device,
                dtype: torch.dtype) -> torch.Tensor:
    """Encode: ``[1, 3, frames, H, W]`` (``spec["size"] = [W, H]``) panned across the bundled photo. Decode: that
    clip's latents (a ``--vae``) or unit Gaussian latents ``[1, z, 1 + (frames - 1) / 4, H / f, W / f]``."""
    from ..io.images import bundled_fixture, load_image

    (w, h), frames, op = spec["size"], spec["frames"], spec["op"]
    shift = 2
    img = load_image(bundled_fixture("sample.png"))
    img = torch.nn.functional.interpolate(img, size=(h, w + shift * frames), mode="bicubic",
                                          align_corners=False).clamp(-1, 1)
    clip = torch.stack([img[0, :, :, shift * i:shift * i + w] for i in range(frames)], 1).unsqueeze(0)
    if op == "encode":
        return clip.to(device, dtype)
    cfg = model.config
    if spec.get("vae"):
        with torch.no_grad():
            z = model.float().to(device).encode(clip.to(device))
        model.to(dtype)
        return z.to(dtype)
    g = torch.Generator().manual_seed(1)
    f, ft = cfg.downscale, cfg.temporal_scale
    shape = (1, cfg.latent_channels, 1 + (frames - 1) // ft, h // f, w // f)
    return torch.randn(shape, generator=g).to(device, dtype)


def diffusers_video(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, tile: Optional[int],
                    load: bool = True) -> Any:
    """diffusers' network of ``model``'s family (``AutoencoderKLWan``, ``AutoencoderKLHunyuanVideo15``: the class its
    ``diffusers_config`` names) on ``model``'s weights (our converter to its names), with ``enable_tiling()`` at
    ``tile`` px and a stride of :data:`PEER_STRIDE` × ``tile`` (None: untiled)."""
    import diffusers  # optional, benchmark only

    from ..families.base import LatentFormat
    from ..families.registry import for_model

    family = for_model(model)
    cfg = dict(family.diffusers_config(model, LatentFormat(family.name, 1.0, None, {})))
    cls = getattr(diffusers, cfg["_class_name"])
    d = cls(**{k: v for k, v in cfg.items() if not k.startswith("_") and k != "scaling_factor"})
    if load:
        d.load_state_dict(family.file_state_dict(model, dict(model.state_dict()), "diffusers"))
    quiet = logging.getLogger("diffusers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its advice on casting with .to() is about from_pretrained, not this copy
    try:
        d = d.to(device, dtype).eval().requires_grad_(False)
    finally:
        quiet.setLevel(level)
    if tile is not None:
        f = model.config.downscale
        stride = max(f, int(tile * PEER_STRIDE) // f * f)
        if "tile_sample_stride_height" in inspect.signature(d.enable_tiling).parameters:  # AutoencoderKLWan
            d.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile, tile_sample_stride_height=stride,
                            tile_sample_stride_width=stride)
        else:  # AutoencoderKLHunyuanVideo15: an overlap factor
            d.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile, tile_latent_min_height=tile // f,
                            tile_latent_min_width=tile // f, tile_overlap_factor=1 - PEER_STRIDE)
    return d


def video_call(spec: dict[str, Any], model: torch.nn.Module, device: torch.device, dtype: torch.dtype
               ) -> tuple[Callable[[torch.Tensor], torch.Tensor], Optional[Any]]:
    """``(fn(t) -> output, its TileOptions or None)`` for the spec's ``impl``: ``untiled``, ``ours`` (``schedule``
    ``level``/``tile``/``auto``), ``diffusers-untiled`` or ``diffusers``."""
    from .. import engine, tiling

    impl, op = spec["impl"], spec["op"]
    if impl in ("diffusers", "diffusers-untiled"):
        d = diffusers_video(model, device, dtype, spec.get("tile") if impl == "diffusers" else None)
        if op == "decode":
            return (lambda t: d.decode(t, **peer_decode_args(d, t)).sample), None
        return (lambda t: d.encode(t).latent_dist.mean), None
    opts = tiling.TileOptions(tile=None if impl == "untiled" else spec["tile"],
                              schedule=spec.get("schedule", "auto"), cache_bytes=spec.get("cache_bytes", "auto"))
    call = engine.decode if op == "decode" else engine.encode
    return (lambda t: call(model, t, opts)), opts


def peer_decode_args(d: Any, z: torch.Tensor) -> dict[str, Any]:
    """What diffusers' decode needs besides the latents: a timestep-conditioned LTX decoder takes the decode timestep
    (0.05, as ours; its blocks' noise comes from the global generator)."""
    if getattr(d.config, "timestep_conditioning", False):
        return {"temb": torch.full((z.shape[0],), 0.05, device=z.device, dtype=z.dtype)}
    return {}


def _count(fn: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def _meta_input(config: Any, op: str, frames: int, height: int, width: int) -> torch.Tensor:
    f, ft = config.downscale, config.temporal_scale
    if op == "decode":
        return torch.empty(1, config.latent_channels, 1 + (frames - 1) // ft, height // f, width // f, device="meta")
    return torch.empty(1, config.in_channels, frames, height, width, device="meta")


def video_flop_ratio(config: Any, op: str, frames: int, height: int, width: int, tile: int,
                     schedule: str = "level") -> float:
    """FLOPs of our tiled video call over the untiled (streamed reference) call, counted on the ``meta`` device at
    the config's real widths: ``frames`` pixel frames (``1 + 4k``) of ``height``×``width`` px, ``tile`` px,
    ``schedule`` ``"level"`` (level-major, what a call with the memory for it runs) or ``"tile"`` (tile-major)."""
    from ..families.registry import for_config
    from ..tiling.options import TileOptions

    family = for_config(config)
    with torch.device("meta"):
        model = family.build(config).eval().requires_grad_(False)
    x = _meta_input(config, op, frames, height, width)
    with torch.no_grad():
        base = _count(lambda: (model.decode if op == "decode" else model.encode)(x))
        opts = TileOptions(schedule=schedule)
        return _count(lambda: family.tiled(op)(model, x, tile, opts)) / base


def peer_flop_ratio(config: Any, op: str, frames: int, height: int, width: int, tile: Optional[int]
                    ) -> Optional[float]:
    """diffusers' network (``tile`` px with ``enable_tiling()``, None untiled) over our untiled call,
    counted on the meta device; None without diffusers or where its code cannot run on meta tensors."""
    from ..families.registry import for_config

    family = for_config(config)
    with torch.device("meta"):
        model = family.build(config).eval().requires_grad_(False)
    x = _meta_input(config, op, frames, height, width)
    try:
        with torch.no_grad():
            base = _count(lambda: (model.decode if op == "decode" else model.encode)(x))
            with torch.device("meta"):
                d = diffusers_video(model, torch.device("meta"), torch.float32, tile, load=False)
            fn = (lambda: d.decode(x, **peer_decode_args(d, x)).sample) if op == "decode" else \
                (lambda: d.encode(x).latent_dist.mean)
            return _count(fn) / base
    except (ImportError, RuntimeError, NotImplementedError, TypeError):
        return None
