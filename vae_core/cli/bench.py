"""``python -m vae_core bench``: time, memory, fidelity and FLOPs of untiled, tiled-exact, tiled-fast and diffusers
calls, each run in a fresh worker process (:mod:`vae_core.lab.bench`), printed as a Markdown table; with
``--frames N``, the same for a video VAE (:mod:`vae_core.lab.bench_video`): the untiled streamed reference, our exact
tiling level-major and tile-major, and diffusers' own network of the family untiled and tiled, with the temporal
seam."""
from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any, Optional

import torch

from ..lab.bench import flop_ratio, measure
from ..errors import VaeInputError
from ..lab.metrics import signed_psnr as psnr, snr
from ..precision.dtypes import HOST_CHOICES
from .args import cache_arg, device_arg, setting_arg, settings_of, size_arg

__all__ = ["cmd_bench", "add_bench_parser"]


def _fmt_mem(b: Optional[float]) -> str:
    return "-" if b is None else f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def cmd_bench(args: argparse.Namespace) -> int:
    from ..loading import load_vae

    device = args.device
    from ..tiling.memory import MIN_TILE

    if args.tile < MIN_TILE:
        raise VaeInputError(f"--tile {args.tile}: below the minimum of {MIN_TILE} image px")
    if args.frames is not None:
        return _bench_video(args)
    sizes = [w for w, h in args.size] if args.size else ([1024, 2048, 4096] if device == "cuda" else [256, 512])
    bad = [f"{w}x{h}" for w, h in args.size or [] if w != h]
    if bad:
        raise VaeInputError(f"--size {bad[0]}: the image benchmark runs squares; expected N (WxH is for --frames)")
    if args.settings:
        raise VaeInputError("--set: the image benchmark runs the VAE as loaded; expected --frames N (a video "
                            "benchmark) with --set")
    try:
        import diffusers  # noqa: F401
        have_diffusers = True
    except ImportError:
        have_diffusers = False
    from ..families.kl.model import ModelConfig
    from ..families.registry import for_config

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
                if have_diffusers and for_config(config).name == "kl":  # diffusers' network: AutoencoderKL only
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


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


#: how the bench names a family's video schedules (:attr:`~vae_core.families.video.VideoFamily.video_schedules`)
SCHEDULE_LABELS = {"level": "level-major", "tile": "tile-major", "auto": "op by op"}


def _bench_video(args: argparse.Namespace) -> int:
    """``bench --frames N``: one table per op and size for a video VAE (see the module docstring)."""
    import importlib.util

    from ..families.registry import by_name, for_config
    from ..lab.bench_video import peer_flop_ratio, video_flop_ratio
    from ..lab.metrics import frame_psnrs, temporal_seam
    from ..loading import load_vae

    frames, device = args.frames, args.device
    settings = settings_of(args.settings)
    if settings and not args.vae:
        raise VaeInputError(f"--set {', '.join(settings)} without --vae; expected --vae PATH (settings are the VAE's)")
    config = load_vae(args.vae, settings=settings).model.config if args.vae else by_name("wan").config_type()
    family = for_config(config)
    if not family.video:
        raise VaeInputError(f"--frames {frames} with {args.vae}: {family.label}, which takes images only; expected a "
                            "video VAE (Wan 2.1 / 2.2, HunyuanVideo 1.0 / 1.5, LTX-Video)")
    if frames < 1 or (frames - 1) % config.temporal_scale:
        raise VaeInputError(f"--frames {frames}: expected 1 + {config.temporal_scale}k frames "
                            f"(1, {1 + config.temporal_scale}, {1 + 2 * config.temporal_scale}, ...)")
    f = config.downscale
    sizes = args.size or ([(1280, 720)] if device == "cuda" else [(256, 256)])
    bad = [f"{w}x{h}" for w, h in sizes if w % f or h % f]
    if bad:
        raise VaeInputError(f"--size {bad[0]}: expected sides that are multiples of {f} (the VAE's downscale)")
    label = args.vae or "random-weight Wan 2.1 VAE at its real widths"
    machine = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU, {os.cpu_count()} threads"
    print(f"# vae_core bench: {label}; {frames} frames; {args.dtype} on {machine}; torch {torch.__version__}; tile "
          f"{args.tile} px; cache {args.cache_bytes}; median of {args.runs} run(s)")
    reference = "chunked network" if getattr(config, "chunked", False) else family.video_reference
    impls = [(f"untiled ({reference})", "untiled", None)]
    chunks = " per chunk" if getattr(config, "chunked", False) else ""
    impls += [(f"vae_core exact, {SCHEDULE_LABELS[s]}{chunks}", "ours", s) for s in family.video_schedules]
    if importlib.util.find_spec("diffusers") is not None:  # diffusers has every video family here
        impls += [("diffusers untiled", "diffusers-untiled", None), ("diffusers tiled", "diffusers", None)]
    mem_label = "peak alloc" if device == "cuda" else "peak RSS"
    print(_row(["op", "size", "implementation", "time (s)", "time vs untiled", mem_label, "min frame PSNR vs untiled",
                "temporal seam (8-bit levels)", "FLOPs vs untiled"]))
    print(_row(["---"] * 9))
    with tempfile.TemporaryDirectory() as tmp:
        for op in args.op:
            for w, h in sizes:
                ref, t_ref = None, None
                for name, impl, schedule in impls:
                    out = os.path.join(tmp, f"{op}{w}x{h}{impl}{schedule}.safetensors")
                    spec = {"op": op, "size": [w, h], "frames": frames, "impl": impl, "tile": args.tile,
                            "schedule": schedule or "auto", "dtype": args.dtype, "device": device, "runs": args.runs,
                            "vae": args.vae, "settings": settings, "out": out, "cache_bytes": args.cache_bytes}
                    res = measure(spec)
                    if res["status"] != "ok":
                        print(_row([op, f"{w}x{h}", name, f"{res['status']} {res.get('error', '')}"] + [""] * 5),
                              flush=True)
                        continue
                    from safetensors.torch import load_file

                    y = load_file(out)["out"]
                    if impl == "untiled":
                        ref, t_ref = y, res["seconds"]
                        fid, seam = "reference", "-"
                    elif ref is None:
                        fid, seam = "-", "-"
                    elif op == "decode":
                        fid, seam = f"{min(frame_psnrs(y, ref)):.1f} dB", f"{temporal_seam(y, ref):.0f}"
                    else:
                        fid, seam = f"{snr(ref, y):.1f} dB SNR", "-"
                    if impl == "untiled":
                        ratio: Optional[float] = 1.0
                    elif impl == "ours":
                        ratio = video_flop_ratio(config, op, frames, h, w, args.tile, schedule)
                    else:
                        ratio = peer_flop_ratio(config, op, frames, h, w,
                                                args.tile if impl == "diffusers" else None)
                    t_ratio = f"{res['seconds'] / t_ref:.2f}×" if t_ref else "-"
                    print(_row([op, f"{w}x{h}", name, f"{res['seconds']:.3f}", t_ratio, _fmt_mem(res["peak_bytes"]),
                                fid, seam, "-" if ratio is None else f"{ratio:.3f}×"]), flush=True)
    return 0


def add_bench_parser(sub: Any) -> None:
    s = sub.add_parser("bench", help="time/memory/fidelity table: untiled vs our tiled vs diffusers' tiled")
    s.add_argument("--size", type=size_arg, nargs="+",
                   help="image edges (default 1024 2048 4096 on CUDA, 256 512 on CPU); with --frames, N or WxH "
                        "(default 1280x720 on CUDA, 256 on CPU)")
    s.add_argument("--frames", type=int, default=None,
                   help="benchmark a video VAE (Wan, HunyuanVideo 1.0 / 1.5, LTX-Video) on clips of this many frames "
                        "(1 + 4k; "
                        "LTX-Video: 1 + 8k); "
                        "default model: a "
                        "random-weight Wan 2.1 VAE at its real widths")
    s.add_argument("--dtype", default="fp32", choices=list(HOST_CHOICES))
    s.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--vae", default=None, help="VAE to benchmark (default: random-weight SD-width model)")
    s.add_argument("--set", dest="settings", type=setting_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="a load setting of --vae (repeatable; videos), e.g. chunked=true for HunyuanVideo 1.0")
    s.add_argument("--tile", type=int, default=256, help="tile edge in image px (ours and diffusers')")
    s.add_argument("--op", nargs="+", default=["decode", "encode"], choices=["decode", "encode"])
    s.add_argument("--runs", type=int, default=1)
    s.add_argument("--channels-last", action="store_true", help="our calls on channels-last activations")
    s.add_argument("--cache-bytes", type=cache_arg, default="auto",
                   help="exact tiling's cache budget in bytes, or 'auto' (default: a share of free memory)")
    s.set_defaults(fn=cmd_bench)
