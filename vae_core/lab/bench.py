"""The benchmark's measurements (``python -m vae_core bench``, :mod:`vae_core.cli.bench`): time, peak memory,
fidelity and FLOPs of untiled, our tiled and diffusers' tiled calls.

Each configuration runs in a fresh worker process (``python -m vae_core.lab.bench --worker JSON``), so the CPU figure
is that process's peak RSS (``VmHWM``) and the CUDA figure ``max_memory_allocated``. Outputs are written to
temporary files and compared with the untiled output (PSNR for images with peak-to-peak 2, SNR for latents).
Without ``--vae`` the model is a random-weight SD-width AutoencoderKL (83.7 M parameters, seed 0). Inputs: the
bundled photo resized to each size (encode), its latent (decode with ``--vae``) or Gaussian latents (random model).
FLOP ratios are counted on the meta device (:func:`flop_ratio`); for exact mode each row also gives the number of
sweeps over the tiles, the share of the tiled stages' conv FLOPs spent on halos and on recomputation, and the cache
actually used.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ..precision.dtypes import DTYPES

__all__ = ["run_worker", "measure", "flop_ratio", "peak_rss", "reset_peak_rss", "proc_status_bytes"]


def _model(spec: dict[str, Any]):
    from ..loading import load_vae
    from ..families.kl.model import AutoencoderKL, ModelConfig

    if spec.get("vae"):
        return load_vae(spec["vae"]).model
    torch.manual_seed(0)
    cfg = ModelConfig(**spec.get("config", {}))
    return AutoencoderKL(cfg).eval().requires_grad_(False)


def _diffusers_model(model, device: torch.device, dtype: torch.dtype, tile: Optional[int], load: bool = True):
    """diffusers' AutoencoderKL on ``model``'s weights, with ``enable_tiling()`` at ``tile`` px (None: untiled)."""
    from diffusers import AutoencoderKL as DiffusersKL  # optional, benchmark only

    from ..families.kl.convert import diffusers_config, ldm_to_diffusers

    cfg = diffusers_config(model.config, 0.18215, None)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg["sample_size"] = tile or 512
    d = DiffusersKL(**cfg)
    if load:
        d.load_state_dict(ldm_to_diffusers(model.state_dict()))
    d = d.to(device, dtype).eval()
    if tile is not None:
        d.enable_tiling()
        d.tile_sample_min_size = tile
        d.tile_latent_min_size = tile // model.config.downscale
    return d


def _input(spec: dict[str, Any], model, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Encode: the bundled photo resized to ``size``². Decode: that photo's latent for a trained ``--vae``, unit
    Gaussian latents for the random-weight model."""
    from ..io.images import bundled_fixture, load_image

    size, op = spec["size"], spec["op"]
    img = load_image(bundled_fixture("sample.png"))
    img = torch.nn.functional.interpolate(img, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)
    if op == "encode":
        return img.to(device, dtype)
    if spec.get("vae"):
        from .. import engine, tiling

        with torch.no_grad():
            z = engine.encode(model.float(), img.to(device), tiling.TileOptions(tile=min(size, 512)))
        model.to(dtype)
        return z.to(dtype)
    f = model.config.downscale
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, model.config.latent_channels, size // f, size // f, generator=g).to(device, dtype)


def proc_status_bytes(field: str) -> Optional[int]:
    """A size field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``...) in bytes; None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """This process's peak resident set in bytes: ``VmHWM`` (reset by execve, unlike ``ru_maxrss``, which keeps the
    parent's high-water mark on Linux), else ``ru_maxrss``."""
    hwm = proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` (Linux ≥ 4.0), so the figure excludes setup such as preparing inputs."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration (``spec``: op, size, impl, tile, mode, dtype, device, runs, vae/config, out)."""
    from .. import engine, tiling

    device, dtype = torch.device(spec["device"]), DTYPES[spec["dtype"]]
    torch.set_grad_enabled(False)
    impl, tile = spec["impl"], spec.get("tile")
    report, opts = tiling.TileReport(), None
    if spec.get("frames"):  # a video VAE (vae_core.lab.bench_video)
        from .bench_video import video_call, video_input, video_model

        model = video_model(spec).to(device, dtype)
        x = video_input(spec, model, device, dtype)
        fn, opts = video_call(spec, model, device, dtype)
    elif impl in ("diffusers", "diffusers-untiled"):
        model = _model(spec).to(device, dtype)
        x = _input(spec, model, device, dtype)
        d = _diffusers_model(model, device, dtype, tile if impl == "diffusers" else None)
        fn = (lambda t: d.decode(t).sample) if spec["op"] == "decode" else (lambda t: d.encode(t).latent_dist.mean)
    else:
        model = _model(spec).to(device, dtype)
        x = _input(spec, model, device, dtype)
        opts = tiling.TileOptions(tile=None if impl == "untiled" else tile, mode=spec.get("mode", "exact"),
                                  cache_bytes=spec.get("cache_bytes", "auto"), report=report,
                                  channels_last=bool(spec.get("channels_last")))
        call = engine.decode if spec["op"] == "decode" else engine.encode
        fn = lambda t: call(model, t, opts)  # noqa: E731
    reset_peak_rss()
    base_rss = peak_rss()
    times, out = [], None
    try:
        for i in range(spec.get("runs", 1) + (1 if device.type == "cuda" else 0)):
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            out = None
            if opts is not None:  # the report of one call, not the sum over the runs
                opts.report = report = tiling.TileReport()
            t0 = time.perf_counter()
            out = fn(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if device.type != "cuda" or i > 0:
                times.append(time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - report OOM as a result, re-raise anything else
        if not tiling.is_oom(exc):
            raise
        return {"status": "OOM"}
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else peak_rss())
    if spec.get("out"):
        from safetensors.torch import save_file

        save_file({"out": out.float().cpu().contiguous()}, spec["out"])
    result = {"status": "ok", "seconds": statistics.median(times), "peak_bytes": peak, "base_rss_bytes": base_rss}
    if impl == "ours":
        result["report"] = dataclasses.asdict(report)
    return result


def measure(spec: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Run ``spec`` in a fresh worker process and return its result dict."""
    root = Path(__file__).resolve().parents[2]  # the folder holding vae_core/
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "vae_core.lab.bench", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"status": "error", "error": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def flop_ratio(config: Any, op: str, size: int, impl: str, tile: int, mode: str = "exact",
               cache_bytes: Any = "auto") -> Optional[float]:
    """FLOPs of one ``impl`` call over the untiled call, counted with ``torch.utils.flop_counter`` on the meta
    device (no data, deterministic: FLOPs do not depend on weight values). ``cache_bytes="auto"`` counts what the
    plan needs for full speed. None if the implementation cannot run on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    from .. import engine, tiling
    from ..families.registry import for_config

    def count(fn: Any) -> int:
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops()

    family = for_config(config)
    if impl.startswith("diffusers") and family.name != "kl":
        return None  # diffusers' AutoencoderKL holds kl-f8 VAEs only
    with torch.device("meta"):
        model = family.build(config).eval().requires_grad_(False)
    f = config.downscale
    x = (torch.empty(1, config.latent_channels, size // f, size // f, device="meta") if op == "decode"
         else torch.empty(1, 3, size, size, device="meta"))
    untiled = model.decode if op == "decode" else model.encode
    try:
        with torch.no_grad():
            base = count(lambda: untiled(x))
            if impl.startswith("diffusers"):
                with torch.device("meta"):
                    d = _diffusers_model(model, torch.device("meta"), torch.float32,
                                         tile if impl == "diffusers" else None, load=False)
                fn = (lambda: d.decode(x).sample) if op == "decode" else (lambda: d.encode(x).latent_dist.mean)
            else:
                if cache_bytes == "auto":
                    cache_bytes = engine.cache_needed(model, op, size, size, tile)
                opts = tiling.TileOptions(tile=None if impl == "untiled" else tile, mode=mode, cache_bytes=cache_bytes)
                call = engine.decode if op == "decode" else engine.encode
                fn = lambda: call(model, x, opts)  # noqa: E731
            return count(fn) / base
    except (RuntimeError, NotImplementedError, TypeError):  # an op without a meta kernel
        return None


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(run_worker(json.loads(sys.argv[2]))))
    else:
        print("usage: python -m vae_core bench ...  (this module's --worker is internal)", file=sys.stderr)
        sys.exit(2)
