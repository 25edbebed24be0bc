"""``python -m vae_core``: inspect, convert, encode, decode and round-trip VAEs without a host; ``bench`` times it.

Commands that need a VAE and get no ``--vae`` use the small trained test VAE bundled in ``tests/fixtures`` and say so.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Optional, Sequence

import torch

from .errors import VaeError
from .images import bundled_fixture, load_image, load_latent, psnr, save_image, save_latent
from .loading import load_vae, save_vae
from .precision import calibration_image, measure_peaks
from .vae import Vae, make_fp16_safe


def _tile(value: str) -> object:
    if value in ("none", "None", "0"):
        return None
    if value == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--tile {value!r}: expected an integer (image px), 'auto' or 'none'") from exc


def _add_run_args(p: argparse.ArgumentParser, vae_required: bool = False) -> None:
    p.add_argument("--vae", required=vae_required, help="VAE file or diffusers folder (default: bundled test VAE)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16", "auto"])
    p.add_argument("--fp16-fix", action="store_true", help="apply the training-free fp16 fix before running")
    p.add_argument("--tile", type=_tile, default=None, help="tile edge in image px, 'auto' or 'none' (default)")
    p.add_argument("--mode", default="exact", choices=["exact", "fast"], help="tiling mode")
    p.add_argument("--family", default=None, help="override the detected family (sd1, sdxl, sd3, flux)")


def _load(args: argparse.Namespace) -> Vae:
    path = args.vae
    if path is None:
        path = bundled_fixture()
        print(f"no --vae given: using the bundled test VAE {path}")
    vae = load_vae(path, device=args.device, dtype=torch.float32, family=args.family)
    if args.fp16_fix:
        vae = make_fp16_safe(vae)
        print(f"fp16 fix: largest activation {vae.info.fp16_fix['peak_before']:.4g} -> "
              f"{vae.info.fp16_fix['peak_after']:.4g}")
    return vae.to(dtype=args.dtype)


def _progress(label: str):
    state = {"t": time.time()}

    def cb(done: int, total: int) -> None:
        if time.time() - state["t"] > 1 or done == total:
            print(f"\r{label}: tile {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)
            state["t"] = time.time()
    return cb


def cmd_inspect(args: argparse.Namespace) -> int:
    vae = load_vae(args.path, family=args.family)
    info = vae.info
    if args.json:
        print(json.dumps(info.as_dict(), indent=2, default=str))
    else:
        cfg = info.config
        print(f"path            {info.path}")
        print(f"container       {info.container}" + (f" ({info.weights_file})" if info.weights_file != info.path else ""))
        print(f"layout          {info.layout}" + (f", inside a full checkpoint under {info.prefix!r}" if info.prefix else ""))
        print(f"family          {info.family}  [{info.sources.get('family')}]")
        print(f"latent channels {info.latent_channels}")
        print(f"scaling factor  {info.scaling_factor}  [{info.sources.get('scaling_factor')}]")
        print(f"shift factor    {info.shift_factor}  [{info.sources.get('shift_factor')}]")
        print(f"stored dtype    {info.stored_dtype}")
        print(f"parameters      {info.parameters:,}")
        print(f"channels        {[cfg.ch * m for m in cfg.ch_mult]}, {cfg.num_res_blocks} res blocks per level, "
              f"quant convs: {'yes' if cfg.use_quant_conv else 'no'}, GroupNorm groups {cfg.norm_groups}")
    if args.activations:
        image = load_image(args.image) if args.image else calibration_image()
        peaks = measure_peaks(vae.model, image)
        fixed = make_fp16_safe(vae, image)
        after = measure_peaks(fixed.model, image)
        top = sorted(peaks.items(), key=lambda kv: -kv[1])[:5]
        names = {m: n for n, m in vae.model.named_modules()}
        print(f"largest activation before the fp16 fix: {max(peaks.values()):.5g} (fp16 max 65504)")
        for mod, val in top:
            print(f"  {names.get(mod, '?'):45s} {val:.5g}")
        print(f"largest activation after the fp16 fix:  {max(after.values()):.5g}")
        fnames = {m: n for n, m in fixed.model.named_modules()}
        for mod, val in sorted(after.items(), key=lambda kv: -kv[1])[:5]:
            print(f"  {fnames.get(mod, '?'):45s} {val:.5g}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    vae = load_vae(args.src, family=args.family)
    out = save_vae(vae, args.dst, layout=args.layout, dtype=args.dtype)
    print(f"wrote {out} ({args.layout} layout, {args.dtype})")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    vae = _load(args)
    x = load_image(args.image)
    z = vae.encode(x, tile=args.tile, mode=args.mode, progress=_progress("encode"))
    meta = {"family": vae.info.family, "scaling_factor": repr(vae.info.scaling_factor),
            "shift_factor": repr(vae.info.shift_factor), "note": "raw (unscaled) posterior mean"}
    save_latent(z, args.output, meta)
    print(f"wrote {args.output}: latent {tuple(z.shape)}, mean {z.mean():.4f}, std {z.std():.4f}")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    vae = _load(args)
    z = load_latent(args.latent)
    y = vae.decode(z, tile=args.tile, mode=args.mode, progress=_progress("decode"))
    save_image(y, args.output)
    print(f"wrote {args.output}: image {y.shape[3]}x{y.shape[2]}")
    return 0


def cmd_roundtrip(args: argparse.Namespace) -> int:
    vae = _load(args)
    image = args.image
    if image is None:
        image = bundled_fixture("sample.png")
        print(f"no image given: using the bundled sample photo {image}")
    x = load_image(image)
    t0 = time.perf_counter()
    z = vae.encode(x, tile=args.tile, mode=args.mode, progress=_progress("encode"))
    y = vae.decode(z, tile=args.tile, mode=args.mode, progress=_progress("decode"))
    dt = time.perf_counter() - t0
    h, w = z.shape[2] * 8, z.shape[3] * 8
    save_image(y, args.output)
    print(f"{vae}\nround trip {x.shape[3]}x{x.shape[2]} -> latent {tuple(z.shape[1:])} -> {w}x{h} in {dt:.2f} s; "
          f"PSNR {psnr(x[..., :h, :w], y):.2f} dB; wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vae_core", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="format, family, channels, params, dtype, scaling and their sources")
    s.add_argument("path")
    s.add_argument("--json", action="store_true")
    s.add_argument("--family", default=None)
    s.add_argument("--activations", action="store_true", help="largest activations before/after the fp16 fix")
    s.add_argument("--image", default=None, help="calibration image for --activations (default: built-in)")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("convert", help="rewrite a VAE as LDM/diffusers safetensors or a diffusers folder")
    s.add_argument("src")
    s.add_argument("dst", help="a .safetensors file, or a folder for --layout diffusers")
    s.add_argument("--layout", default="ldm", choices=["ldm", "diffusers"])
    s.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    s.add_argument("--family", default=None)
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("encode", help="image -> raw latent .safetensors")
    s.add_argument("image")
    s.add_argument("-o", "--output", required=True)
    _add_run_args(s)
    s.set_defaults(fn=cmd_encode)

    s = sub.add_parser("decode", help="latent .safetensors -> PNG")
    s.add_argument("latent")
    s.add_argument("-o", "--output", required=True)
    _add_run_args(s)
    s.set_defaults(fn=cmd_decode)

    s = sub.add_parser("roundtrip", help="encode then decode an image and print the PSNR")
    s.add_argument("image", nargs="?", default=None, help="default: the bundled sample photo")
    s.add_argument("-o", "--output", default="roundtrip.png")
    _add_run_args(s)
    s.set_defaults(fn=cmd_roundtrip)

    from .bench import add_bench_parser
    add_bench_parser(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: "
                        "%(message)s")
    try:
        return int(args.fn(args) or 0)
    except VaeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


__all__ = ["main", "build_parser"]
