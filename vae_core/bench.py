"""``python -m vae_core bench``: time, peak memory, fidelity and FLOPs of untiled, our tiled and diffusers' tiled
calls.

Each configuration runs in a fresh worker process (``python -m vae_core.bench --worker JSON``), so the CPU figure
is that process's peak RSS (``VmHWM``) and the CUDA figure ``max_memory_allocated``. Outputs are written to
temporary files and compared with the untiled output (PSNR for images with peak-to-peak 2, SNR for latents).
Without ``--vae`` the model is a random-weight SD-width AutoencoderKL (83.7 M parameters, seed 0). Inputs: the
bundled photo resized to each size (encode), its latent (decode with ``--vae``) or Gaussian latents (random model).
FLOP ratios are counted on the meta device (:func:`flop_ratio`); for exact mode each row also gives the number of
sweeps over the tiles, the share of the tiled stages' conv FLOPs spent on halos and on recomputation, and the cache
actually used.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from .images import psnr, snr
from .precision import DTYPES

__all__ = ["add_bench_parser", "run_worker", "measure", "flop_ratio"]


def _model(spec: dict[str, Any]):
    from .loading import load_vae
    from .model import AutoencoderKL, ModelConfig

    if spec.get("vae"):
        return load_vae(spec["vae"]).model
    torch.manual_seed(0)
    cfg = ModelConfig(**spec.get("config", {}))
    return AutoencoderKL(cfg).eval().requires_grad_(False)


def _diffusers_model(model, device: torch.device, dtype: torch.dtype, tile: Optional[int], load: bool = True):
    """diffusers' AutoencoderKL on ``model``'s weights, with ``enable_tiling()`` at ``tile`` px (None: untiled)."""
    from diffusers import AutoencoderKL as DiffusersKL  # optional, benchmark only

    from .convert import diffusers_config, ldm_to_diffusers

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
    from .images import bundled_fixture, load_image

    size, op = spec["size"], spec["op"]
    img = load_image(bundled_fixture("sample.png"))
    img = torch.nn.functional.interpolate(img, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)
    if op == "encode":
        return img.to(device, dtype)
    if spec.get("vae"):
        from . import tiling

        with torch.no_grad():
            z = tiling.encode(model.float(), img.to(device), tiling.TileOptions(tile=min(size, 512)))
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
    from . import tiling

    device, dtype = torch.device(spec["device"]), DTYPES[spec["dtype"]]
    torch.set_grad_enabled(False)
    model = _model(spec).to(device, dtype)
    x = _input(spec, model, device, dtype)
    impl, tile = spec["impl"], spec.get("tile")
    if impl in ("diffusers", "diffusers-untiled"):
        d = _diffusers_model(model, device, dtype, tile if impl == "diffusers" else None)
        fn = (lambda t: d.decode(t).sample) if spec["op"] == "decode" else (lambda t: d.encode(t).latent_dist.mean)
    else:
        report = tiling.TileReport()
        opts = tiling.TileOptions(tile=None if impl == "untiled" else tile, mode=spec.get("mode", "exact"),
                                  cache_bytes=spec.get("cache_bytes", "auto"), report=report,
                                  channels_last=bool(spec.get("channels_last")))
        engine = tiling.decode if spec["op"] == "decode" else tiling.encode
        fn = lambda t: engine(model, t, opts)  # noqa: E731
    reset_peak_rss()
    base_rss = peak_rss()
    times, out = [], None
    try:
        for i in range(spec.get("runs", 1) + (1 if device.type == "cuda" else 0)):
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            out = None
            if impl == "ours":  # the report of one call, not the sum over the runs
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
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "vae_core.bench", "--worker", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout, env=env)
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

    from . import tiling
    from .model import AutoencoderKL

    def count(fn: Any) -> int:
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops()

    from .model_tiny import TinyAutoencoder, TinyConfig
    from .model_wan import WanConfig, WanImageVAE

    tiny = isinstance(config, (TinyConfig, WanConfig))  # halo-tiled families: no cache, no diffusers row
    if tiny and impl.startswith("diffusers"):
        return None  # diffusers' AutoencoderKL holds kl-f8 VAEs only
    with torch.device("meta"):
        model = (TinyAutoencoder(config) if isinstance(config, TinyConfig) else WanImageVAE(config)
                 if isinstance(config, WanConfig) else AutoencoderKL(config)).eval().requires_grad_(False)
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
                    cache_bytes = 0 if tiny else tiling.cache_needed(model, op, size, size, tile)
                opts = tiling.TileOptions(tile=None if impl == "untiled" else tile, mode=mode, cache_bytes=cache_bytes)
                engine = tiling.decode if op == "decode" else tiling.encode
                fn = lambda: engine(model, x, opts)  # noqa: E731
            return count(fn) / base
    except (RuntimeError, NotImplementedError, TypeError):  # an op without a meta kernel
        return None


def _fmt_mem(b: Optional[float]) -> str:
    return "-" if b is None else f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def cmd_bench(args: argparse.Namespace) -> int:
    from .loading import load_vae

    device = args.device
    sizes = args.size or ([1024, 2048, 4096] if device == "cuda" else [256, 512])
    try:
        import diffusers  # noqa: F401
        have_diffusers = True
    except ImportError:
        have_diffusers = False
    from .model import ModelConfig

    label = args.vae or "random-weight SD-width AutoencoderKL (83.7 M params)"
    config = load_vae(args.vae).model.config if args.vae else ModelConfig()  # fails early with a clear error
    machine = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU, {os.cpu_count()} threads"
    print(f"# vae_core bench: {label}; {args.dtype} on {machine}; torch {torch.__version__}; tile {args.tile} px; "
          f"cache {args.cache_bytes}; median of {args.runs} run(s)")
    mem_label = "peak alloc" if device == "cuda" else "peak RSS"
    print(f"| op | size | implementation | time (s) | time vs untiled | {mem_label} | fidelity vs untiled | "
          "FLOPs vs untiled | sweeps | halo / recompute FLOPs | cache used |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for op in args.op:
            for size in sizes:
                impls = [("untiled", None), ("vae_core exact", "exact"), ("vae_core fast", "fast")]
                if have_diffusers and isinstance(config, ModelConfig):  # diffusers' network: AutoencoderKL only
                    impls += [("diffusers untiled", None), ("diffusers tiled", None)]
                ref, t_ref = None, None
                for name, mode in impls:
                    impl = {"untiled": "untiled", "diffusers untiled": "diffusers-untiled",
                            "diffusers tiled": "diffusers"}.get(name, "ours")
                    out = os.path.join(tmp, f"{op}{size}{impl}{mode}.safetensors")
                    spec = {"op": op, "size": size, "impl": impl, "mode": mode or "exact", "tile": args.tile,
                            "dtype": args.dtype, "device": device, "runs": args.runs, "vae": args.vae, "out": out,
                            "cache_bytes": args.cache_bytes, "channels_last": args.channels_last}
                    res = measure(spec)
                    if res["status"] != "ok":
                        print(f"| {op} | {size}² | {name} | {res['status']} {res.get('error', '')} | | | | | | | |",
                              flush=True)
                        continue
                    from safetensors.torch import load_file

                    y = load_file(out)["out"]
                    if ref is None and impl == "untiled":
                        ref, fid = y, "reference"
                    elif ref is None:
                        fid = "-"
                    else:
                        fid = f"{psnr(ref, y):.1f} dB PSNR" if op == "decode" else f"{snr(ref, y):.1f} dB SNR"
                    if impl == "untiled":
                        t_ref = res["seconds"]
                    ratio = flop_ratio(config, op, size, impl, args.tile, mode or "exact", args.cache_bytes)
                    rep = res.get("report") or {}
                    total = sum(rep.get(k, 0) for k in ("flops_useful", "flops_halo", "flops_recompute"))
                    shares = (f"{100 * rep['flops_halo'] / total:.1f} % / {100 * rep['flops_recompute'] / total:.1f} %"
                              if total else "-")
                    t_ratio = f"{res['seconds'] / t_ref:.2f}×" if t_ref else "-"
                    f_ratio = "-" if ratio is None else f"{ratio:.2f}×"
                    cache = _fmt_mem(rep["cache_peak"]) if rep else "-"
                    if rep.get("pinned_peak"):
                        cache += f" ({_fmt_mem(rep['pinned_peak'])} pinned)"
                    print(f"| {op} | {size}² | {name} | {res['seconds']:.3f} | {t_ratio} | "
                          f"{_fmt_mem(res['peak_bytes'])} | {fid} | {f_ratio} | {rep.get('sweeps', '-')} | {shares} | "
                          f"{cache} |", flush=True)
    return 0


def add_bench_parser(sub: Any) -> None:
    s = sub.add_parser("bench", help="time/memory/fidelity table: untiled vs our tiled vs diffusers' tiled")
    s.add_argument("--size", type=int, nargs="+", help="image edges (default 1024 2048 4096 on CUDA, 256 512 on CPU)")
    s.add_argument("--dtype", default="fp32", choices=["fp16", "bf16", "fp32"])
    s.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--vae", default=None, help="VAE to benchmark (default: random-weight SD-width model)")
    s.add_argument("--tile", type=int, default=256, help="tile edge in image px (ours and diffusers')")
    s.add_argument("--op", nargs="+", default=["decode", "encode"], choices=["decode", "encode"])
    s.add_argument("--runs", type=int, default=1)
    s.add_argument("--channels-last", action="store_true", help="our calls on channels-last activations")
    s.add_argument("--cache-bytes", type=cache_arg, default="auto",
                   help="exact tiling's cache budget in bytes, or 'auto' (default: a share of free memory)")
    s.set_defaults(fn=cmd_bench)


def device_arg(value: str) -> str:
    """argparse type of ``--device``: a device that exists here (:func:`vae_core.devices.parse_device`)."""
    from .devices import parse_device
    from .errors import VaeInputError

    try:
        return str(parse_device(value))
    except VaeInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def cache_arg(value: str) -> Any:
    """argparse type of ``--cache-bytes``: ``auto`` or an int ≥ 0."""
    if value == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"--cache-bytes {value!r}: expected 'auto' or an int ≥ 0 (bytes)")
    return n


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(run_worker(json.loads(sys.argv[2]))))
    else:
        print("usage: python -m vae_core bench ...  (this module's --worker is internal)", file=sys.stderr)
        sys.exit(2)
