"""``python -m vae_core``: inspect, convert, encode, decode and round-trip VAEs without a host; ``bench`` times it.

Commands that need a VAE and get no ``--vae`` use one bundled in ``tests/fixtures`` and say so: ``roundtrip`` the
released TAEF2 (a real model), the others the small trained kl-f8 test VAE (registry installs leave ``tests/`` out:
then pass ``--vae``). ``--tile 0`` means ``auto`` (as in the ComfyUI
and A1111 nodes); ``none`` runs untiled. ``decode`` of a batch of N > 1 latents writes ``OUT-0.png`` ..
``OUT-<N-1>.png`` next to ``-o OUT.png``. No command writes over one of its inputs; files are written atomically.
Every failure prints ``error: <path or value>: <what was found>; expected <what>`` and exits with status 2
(``-v`` adds the traceback).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, NoReturn, Optional, Sequence, TypeVar

import torch

from ..io import images
from ..precision.dtypes import HOST_CHOICES
from .args import cache_arg, device_arg, setting_arg, settings_of, tile_arg
from ..errors import VaeError, VaeInputError
from ..families.scaling import FAMILIES
from ..io.images import check_latent_output, image_format, latent_metadata, latent_ndim, load_image, load_latent, \
    save_image, save_latent
from ..io.video import DEFAULT_FPS, VIDEO_SUFFIXES, is_video_path, load_video, need_pyav, save_video
from ..lab.metrics import signed_psnr as psnr
from ..loading import load_vae, save_vae
from ..precision.calibrate import calibration_image, measure_peaks
from ..io.paths import atomic_write, check_not_input, check_writable_target, describe_oserror
from ..vae import Vae, make_fp16_safe

T = TypeVar("T")

#: convert's ``--dtype keep``: the stored dtype (the widest one when the file mixes several) as a save_vae dtype.
_KEEP = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp32"}


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: ``error: <message>`` on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def _family(value: str) -> str:
    if value not in FAMILIES:
        raise argparse.ArgumentTypeError(f"{value!r}: unknown family; expected one of {', '.join(FAMILIES)}")
    return value


def _add_run_args(p: argparse.ArgumentParser, vae_required: bool = False) -> None:
    p.add_argument("--vae", required=vae_required, help="VAE file or diffusers folder (default: the bundled kl-f8 test VAE; roundtrip: the "
                   "bundled TAEF2)")
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=[*HOST_CHOICES, "auto"])
    p.add_argument("--fp16-fix", action="store_true", help="apply the training-free fp16 fix before running")
    p.add_argument("--tile", type=tile_arg, default=None,
                   help="tile edge in image px (≥ 64), 'auto' or 0 (= auto, as in the nodes), or 'none' (default)")
    p.add_argument("--mode", default="exact", choices=["exact", "fast"], help="tiling mode")
    p.add_argument("--cache-bytes", type=cache_arg, default="auto", help="exact tiling's cache budget in bytes, or "
                   "'auto' (default: a share of free memory); less is slower, never less exact")
    p.add_argument("--family", type=_family, default=None, help=f"override the detected family ({', '.join(FAMILIES)})")
    p.add_argument("--set", dest="settings", type=setting_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="a load setting the weights cannot say (repeatable), e.g. chunked=true: HunyuanVideo 1.0 in "
                   "newer ComfyUI's 2-latent-frame chunks (memory independent of the clip length) instead of the "
                   "whole-clip reference")


def _bundled(name: str, what: str, label: str, expected: str) -> Path:
    """The bundled fixture ``name``, or a clear error when the install left ``tests/`` out."""
    path = images.bundled_fixture(name)
    if not path.is_file():
        raise VaeInputError(f"no {what} given and the bundled {label} {path} is not installed (registry installs "
                            f"leave tests/ out); expected {expected}")
    return path


def _vae_path(args: argparse.Namespace) -> Path:
    """``--vae``, or the bundled test VAE (said on stdout); a clear error when neither exists."""
    if args.vae is not None:
        return Path(args.vae)
    path = _bundled("mini-vae-ldm.safetensors", "--vae", "test VAE", "--vae PATH")
    print(f"no --vae given: using the bundled test VAE {path}")
    return path


#: The VAE ``roundtrip`` runs without ``--vae``: a real published model (madebyollin's TAEF2, MIT; its decoder half is
#: picked up beside the encoder), so a newcomer's first command shows what a VAE does, not a test network.
FIRST_VAE = "taef2/taef2_encoder.pth"


def _first_vae_path(args: argparse.Namespace) -> Path:
    """``--vae``, or the bundled TAEF2 (said on stdout, with what it is); a clear error when neither exists."""
    if args.vae is not None:
        return Path(args.vae)
    path = _bundled(FIRST_VAE, "--vae", "TAEF2", "--vae PATH")
    print(f"no --vae given: using the bundled TAEF2 {path.parent} (madebyollin's Tiny AutoEncoder for FLUX.2, a "
          "released model, MIT licence)")
    return path


def _load(args: argparse.Namespace, path: Path) -> Vae:
    vae = load_vae(path, device=args.device, dtype=torch.float32, family=args.family, settings=settings_of(args.settings))
    if args.fp16_fix:
        vae = make_fp16_safe(vae)
        print(f"fp16 fix: largest activation {vae.info.fp16_fix['peak_before']:.4g} -> "
              f"{vae.info.fp16_fix['peak_after']:.4g}")
    return vae.to(dtype=args.dtype)


def _write(path: Path, fn: Callable[[], T]) -> T:
    """Run a write and turn an OSError (full disk, permissions...) into the CLI's error format."""
    try:
        return fn()
    except OSError as exc:
        raise VaeInputError(describe_oserror(path, exc)) from exc


def _check_output(out: Path, inputs: Sequence[Path]) -> None:
    """Before any work: the output is a creatable file path and none of the inputs."""
    check_not_input(out, inputs)
    check_writable_target(out)


def _batch_names(out: Path, n: int) -> list[Path]:
    """Where ``decode`` writes a batch of ``n`` images: ``out`` itself for one, ``<stem>-<i><suffix>`` for more."""
    return [out] if n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


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
        print(f"path            {info.path}")
        print(f"container       {info.container}" + (f" ({info.weights_file})" if info.weights_file != info.path else ""))
        print(f"layout          {info.layout}" + (f", inside a full checkpoint under {info.prefix!r}" if info.prefix else ""))
        print(f"family          {info.family}  [{info.sources.get('family')}]")
        print(f"latent channels {info.latent_channels}")
        print(f"scaling factor  {info.scaling_factor}  [{info.sources.get('scaling_factor')}]")
        print(f"shift factor    {info.shift_factor}  [{info.sources.get('shift_factor')}]")
        print(f"stored dtype    {info.stored_dtype}" + (f"  [{info.sources['dtype']}]"
                                                           if "dtype" in info.sources else ""))
        print(f"parameters      {info.parameters:,}")
        for label, text in vae.family.summary(vae.model, info):
            print(f"{label:15s} {text}")
    if args.activations and vae.family.fp16_fix is None:
        raise VaeInputError(f"--activations for a {vae.info.family} VAE: the fp16 fix rescales GroupNorm- or "
                            f"RMS-norm-normalised streams; expected an AutoencoderKL or Qwen-Image's VAE "
                            f"({vae.family.no_fp16_fix})")
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
    src, dst = Path(args.src), Path(args.dst)
    check_not_input(dst, [src])
    if args.layout == "diffusers" and dst.suffix.lower() not in (".safetensors", ".sft"):
        targets = [dst, dst / "config.json", dst / "diffusion_pytorch_model.safetensors"]
        check_writable_target(dst, folder_ok=True)
        for t in targets[1:]:
            check_writable_target(t)
    else:
        if dst.suffix.lower() not in (".safetensors", ".sft"):
            raise VaeInputError(f"{dst}: output extension {dst.suffix or '(none)'!r}; expected a .safetensors file "
                                "(or a folder with --layout diffusers)")
        targets = [dst]
        check_writable_target(dst)
    for t in targets:
        check_not_input(t, [src])
    vae = load_vae(src, family=args.family)
    dtype = args.dtype
    if dtype == "keep":
        stored = vae.info.stored_dtype.split("/")
        dtype = "fp32" if len(stored) > 1 else _KEEP.get(stored[0], "fp32")
        if len(stored) > 1:
            print(f"{src}: mixed stored dtypes {vae.info.stored_dtype}: writing fp32 (pass --dtype to choose)")
    if vae.info.prefix:
        print(f"{src} is a full checkpoint: only its VAE part (keys under {vae.info.prefix!r}) is written to {dst}; "
              "the rest of the checkpoint is not")
    if targets[0] is dst and len(targets) == 1:
        out = _write(dst, lambda: atomic_write(dst, lambda tmp: save_vae(vae, tmp, layout=args.layout, dtype=dtype)))
    else:
        out = _write(dst, lambda: save_vae(vae, dst, layout=args.layout, dtype=dtype))
    kept = f" (stored dtype {vae.info.stored_dtype} kept)" if args.dtype == "keep" else ""
    print(f"wrote {out} ({args.layout} layout, {dtype}){kept}")
    return 0


def _read_input(path: Path) -> tuple[torch.Tensor, Optional[float]]:
    """An image ``[1, 3, H, W]``, or a video (frame folder, video file) ``[1, 3, F, H, W]`` and its fps."""
    if is_video_path(path):
        return load_video(path)
    return load_image(path), None


def _check_video_output(out: Path, inputs: Sequence[Path]) -> None:
    check_not_input(out, inputs)
    check_writable_target(out, folder_ok=not out.suffix)
    if not is_video_path(out, output=True):
        raise VaeInputError(f"{out}: a video needs a video output; expected a folder path (frames as PNGs) or one "
                            f"of {sorted(VIDEO_SUFFIXES)}")
    if out.suffix:
        need_pyav(out)  # before any work


def cmd_encode(args: argparse.Namespace) -> int:
    out, image = Path(args.output), Path(args.image)
    vae_path = _vae_path(args)
    _check_output(out, [image, vae_path])
    check_latent_output(out)
    x, fps = _read_input(image)
    vae = _load(args, vae_path)
    z = vae.encode(x, tile=args.tile, mode=args.mode, progress=_progress("encode"),
                   cache_bytes=args.cache_bytes)
    meta = {"family": vae.info.family, "scaling_factor": repr(vae.info.scaling_factor),
            "shift_factor": repr(vae.info.shift_factor), "note": "raw (unscaled) posterior mean"}
    if x.ndim == 5:
        meta |= {"frames": str(x.shape[2]), "fps": repr(fps or DEFAULT_FPS)}
    _write(out, lambda: save_latent(z, out, meta))
    print(f"wrote {out}: latent {tuple(z.shape)}, mean {z.mean():.4f}, std {z.std():.4f}")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    out, latent = Path(args.output), Path(args.latent)
    vae_path = _vae_path(args)
    if latent_ndim(latent) == 5:  # a video latent (from the header alone): a video output, checked before work
        return _decode_video(args, out, latent, vae_path)
    _check_output(out, [latent, vae_path])
    image_format(out)
    z = load_latent(latent)
    names = _batch_names(out, z.shape[0])
    for name in names[1:] if len(names) > 1 else []:
        _check_output(name, [latent, vae_path])
    vae = _load(args, vae_path)
    family = latent_metadata(latent).get("family")
    if family and family != vae.info.family:
        print(f"warning: {latent}: latent made by a {family!r} VAE, but {vae_path} is a {vae.info.family!r} VAE; "
              "the image will likely be wrong (pass the matching --vae, or --family if the detection is wrong)",
              file=sys.stderr)
    y = vae.decode(z, tile=args.tile, mode=args.mode, progress=_progress("decode"),
                   cache_bytes=args.cache_bytes)
    for i, name in enumerate(names):
        _write(name, lambda: save_image(y[i], name))
        print(f"wrote {name}: image {y.shape[3]}x{y.shape[2]}" + (f" (batch item {i} of {len(names)})"
                                                                    if len(names) > 1 else ""))
    return 0


def _decode_video(args: argparse.Namespace, out: Path, latent: Path, vae_path: Path) -> int:
    _check_video_output(out, [latent, vae_path])
    z = load_latent(latent)
    if z.shape[0] != 1:
        raise VaeInputError(f"{latent}: a batch of {z.shape[0]} latent videos; expected one ([1, C, T, h, w])")
    meta = latent_metadata(latent)
    fps = args.fps or float(meta.get("fps", DEFAULT_FPS))
    vae = _load(args, vae_path)
    y = vae.decode(z, tile=args.tile, mode=args.mode, progress=_progress("decode"), cache_bytes=args.cache_bytes)
    _write(out, lambda: save_video(y, out, fps))
    print(f"wrote {out}: {y.shape[2]} frames of {y.shape[4]}x{y.shape[3]}" + (f" at {fps:g} fps" if out.suffix else ""))
    return 0


def cmd_roundtrip(args: argparse.Namespace) -> int:
    out = Path(args.output)
    vae_path = _first_vae_path(args)
    image = args.image
    if image is None:
        image = _bundled("sample.png", "image", "sample photo", "an IMG argument")
        print(f"no image given: using the bundled sample photo {image}")
    image = Path(image)
    video = is_video_path(image)
    if video:
        _check_video_output(out, [image, vae_path])
    else:
        _check_output(out, [image, vae_path])
        image_format(out)
    x, fps = _read_input(image)
    vae = _load(args, vae_path)
    t0 = time.perf_counter()
    z = vae.encode(x, tile=args.tile, mode=args.mode, progress=_progress("encode"),
                   cache_bytes=args.cache_bytes)
    y = vae.decode(z, tile=args.tile, mode=args.mode, progress=_progress("decode"),
                   cache_bytes=args.cache_bytes)
    dt = time.perf_counter() - t0
    if video:
        _write(out, lambda: save_video(y, out, args.fps or fps))
        per_frame = [psnr(x[:, :, i], y[:, :, i]) for i in range(y.shape[2])]
        print(f"{vae}\nround trip of {y.shape[2]} frames {y.shape[4]}x{y.shape[3]} -> latent {tuple(z.shape[1:])} in "
              f"{dt:.2f} s; PSNR per frame: min {min(per_frame):.2f} dB, mean {sum(per_frame) / len(per_frame):.2f} "
              f"dB; wrote {out}")
        return 0
    h, w = y.shape[2], y.shape[3]
    _write(out, lambda: save_image(y, out))
    print(f"{vae}\nVAE: {vae.info.family} ({vae.family.label}), {vae.info.parameters:,} parameters")
    print(f"round trip {x.shape[3]}x{x.shape[2]} -> latent {tuple(z.shape[1:])} -> {w}x{h} in {dt:.2f} s; "
          f"PSNR {psnr(x[..., :h, :w], y):.2f} dB; wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m vae_core", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="format, family, channels, params, dtype, scaling and their sources")
    s.add_argument("path")
    s.add_argument("--json", action="store_true")
    s.add_argument("--family", type=_family, default=None)
    s.add_argument("--activations", action="store_true", help="largest activations before/after the fp16 fix")
    s.add_argument("--image", default=None, help="calibration image for --activations (default: built-in)")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("convert", help="rewrite a VAE as LDM/diffusers safetensors or a diffusers folder",
                       description="Rewrite a VAE (or the VAE part of a full checkpoint: only that part is written) "
                       "as LDM/diffusers safetensors or a diffusers folder. DST may not be SRC or inside it.")
    s.add_argument("src")
    s.add_argument("dst", help="a .safetensors file, or a folder for --layout diffusers")
    s.add_argument("--layout", default="ldm", choices=["ldm", "diffusers"])
    s.add_argument("--dtype", default="keep", choices=["keep", *HOST_CHOICES],
                   help="keep (default): the dtype stored in SRC; fp16/bf16/fp32: cast")
    s.add_argument("--family", type=_family, default=None)
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("encode", help="image or video -> raw latent .safetensors")
    s.add_argument("image", help="8/16-bit or float image (EXIF orientation applied, alpha dropped, first frame); "
                   "for video VAEs (Wan, HunyuanVideo 1.0 / 1.5, LTX-Video) also a folder of numbered frames or an "
                   ".mp4/.webm/.mov/.mkv file (PyAV), 1 + 4k frames (LTX-Video: 1 + 8k)")
    s.add_argument("-o", "--output", required=True, help="a .safetensors latent file")
    _add_run_args(s)
    s.set_defaults(fn=cmd_encode)

    s = sub.add_parser("decode", help="latent .safetensors -> PNG",
                       description="Decode a latent file. A batch of N > 1 latents writes every image: -o OUT.png "
                       "gives OUT-0.png .. OUT-<N-1>.png (all paths are printed).")
    s.add_argument("latent")
    s.add_argument("-o", "--output", required=True,
                   help="image path; its extension picks the format (.png, .jpg, .webp, .tif...); a video latent: "
                   "a folder (numbered PNG frames) or an .mp4/.webm/.mov/.mkv file")
    s.add_argument("--fps", type=float, default=None, help="video output frame rate (default: the latent's, else "
                   f"{DEFAULT_FPS:g})")
    _add_run_args(s)
    s.set_defaults(fn=cmd_decode)

    s = sub.add_parser("roundtrip", help="encode then decode an image and print the PSNR")
    s.add_argument("image", nargs="?", default=None, help="default: the bundled sample photo")
    s.add_argument("-o", "--output", default="roundtrip.png", help="an image, or for a video input a folder or "
                   "video file")
    s.add_argument("--fps", type=float, default=None, help="video output frame rate (default: the input's)")
    _add_run_args(s)
    s.set_defaults(fn=cmd_roundtrip)

    from .bench import add_bench_parser
    from .cache import add_cache_parsers
    from .lab import add_eval_parser
    add_bench_parser(sub)
    add_eval_parser(sub)
    add_cache_parsers(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status (0, or 2 after printing ``error: ...`` on stderr)."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: "
                        "%(message)s")
    try:
        return int(args.fn(args) or 0)
    except (VaeError, OSError, ValueError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, VaeError):
            message = describe_oserror(exc.filename if exc.filename is not None else "?", exc,
                                       "an existing, readable file or folder")
        else:
            message = str(exc)
        if args.verbose:
            traceback.print_exception(type(exc), exc, exc.__traceback__)
    print(f"error: {message}", file=sys.stderr)
    return 2


__all__ = ["main", "build_parser"]
