"""``python -m vae_core eval``: the VAE lab on the command line (see :mod:`vae_core.lab`).

    python -m vae_core eval IMAGES... --vae A [--vae B ...] [--dtype fp32 bf16 fp16 fp16-fix] [--tile none 512]
                            [--mode exact fast diffusers] [--size N] [--clips] -o report/

Inputs are images, image folders, and clips: video files (.mp4/.webm/.mov/.mkv, through PyAV) or, with ``--clips``,
folders of numbered frames. A clip runs through a video VAE (Wan) whole and through an image VAE frame by frame; its
metrics are means over the frames plus the worst frame, and a tiled run's temporal seam against its untiled run.

Without images it uses the bundled sample photo, without ``--vae`` the bundled test VAE (and says so). Writes
``report.html``, ``results.csv``, ``summary.csv`` and ``results.json`` into the output folder and prints the
summary table. LPIPS needs the optional ``lpips`` package and a local copy of its backbone's ImageNet weights
(``--lpips-weights``); nothing is ever downloaded.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .args import cache_arg, device_arg, tile_arg
from ..errors import VaeInputError
from ..lab.run import DTYPE_CHOICES, METRICS, MODE_CHOICES, aggregate, find_images, run_lab
from ..lab.report import _ms, make_panels, write_report

__all__ = ["add_eval_parser", "cmd_eval", "load_lpips"]

#: torchvision's feature indices holding weights, per LPIPS backbone.
_BACKBONES = {"alex": {0, 3, 6, 8, 10}, "vgg": {0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28}}


def _tile(value: str) -> Optional[int]:
    """``--tile``: ``none`` (untiled) or image px ≥ 64, as elsewhere in the CLI; ``auto`` is no lab setting."""
    px = tile_arg(value)
    if px == "auto":
        raise argparse.ArgumentTypeError(f"{value!r}: automatic tiling is not a setting to measure; expected 'none' "
                                         "(untiled) or an integer ≥ 64 (image px)")
    return px  # type: ignore[return-value]


#: --size beyond this would upscale past what any VAE here is run at (16384² fp32 images are 3 GiB each).
MAX_SIZE = 16384


def _size(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 8 <= n <= MAX_SIZE:
        raise argparse.ArgumentTypeError(f"--size {value!r}: expected an integer from 8 to {MAX_SIZE} (px of the "
                                         "square crop)")
    return n


def _prepare_output(out: Path) -> list[Path]:
    """Create the report folder now and check it takes a file (before any work); returns the folders created
    (deepest first), for :func:`_remove_created` after a failure."""
    import tempfile

    from ..io.paths import describe_oserror

    created = [p for p in [out, *out.absolute().parents] if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".vae-lab-probe-"):
            pass
    except OSError as exc:
        _remove_created(created)
        raise VaeInputError(describe_oserror(out, exc, "a folder where the report can be written")) from exc
    return created


def _remove_created(created: list[Path]) -> None:
    """Remove the folders a failed run created, deepest first, as long as they are empty."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            return


def load_lpips(weights: Path, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """LPIPS (the ``lpips`` package's linear layers, v0.1) on a backbone read from ``weights``: torchvision's
    ImageNet AlexNet (``alexnet-owt-7be5be79.pth``) or VGG16 (``vgg16-397923af.pth``) state dict, as found in a torch
    hub cache (``~/.cache/torch/hub/checkpoints/``). Read with ``weights_only=True``; nothing is downloaded (the
    network is built with ``pnet_rand=True``, then given these weights). Returns ``f(a, b)`` on images in [-1, 1].

    Raises:
        VaeInputError: ``lpips`` is not installed, or the file is not one of those backbones.
    """
    try:
        import lpips  # optional extra: pip install lpips
    except ImportError as exc:
        raise VaeInputError(f"--lpips-weights {weights}: the optional package 'lpips' is not importable ({exc}); "
                            "expected `pip install lpips` (it ships its linear layers; the backbone weights are the "
                            "file given here)") from exc
    if not Path(weights).is_file():
        raise VaeInputError(f"--lpips-weights {weights}: no such file; expected torchvision's alexnet-owt-7be5be79.pth "
                            "or vgg16-397923af.pth (e.g. from ~/.cache/torch/hub/checkpoints/)")
    try:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise VaeInputError(f"--lpips-weights {weights}: not a readable weights-only torch file ({exc}); expected "
                            "torchvision's AlexNet or VGG16 ImageNet state dict") from exc
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise VaeInputError(f"--lpips-weights {weights}: a {type(sd).__name__} that is not a state dict of named "
                            "tensors; expected torchvision's AlexNet or VGG16 ImageNet state dict")
    feats = {int(k.split(".")[1]) for k in sd if k.startswith("features.") and k.split(".")[1].isdigit()}
    net = next((n for n, idx in _BACKBONES.items() if feats == idx), None)
    if net is None:
        raise VaeInputError(f"--lpips-weights {weights}: feature layers {sorted(feats)}; expected torchvision's "
                            f"AlexNet {sorted(_BACKBONES['alex'])} or VGG16 {sorted(_BACKBONES['vgg'])}")
    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    where = {idx: f"{sname}.{idx}" for sname, sl in model.net.named_children() for idx, _ in sl.named_children()}
    backbone = {f"{where[k.split('.')[1]]}.{k.split('.', 2)[2]}": v for k, v in sd.items()
                if k.startswith("features.") and k.split(".")[1] in where}
    try:
        model.net.load_state_dict(backbone, strict=True)
    except RuntimeError as exc:  # missing biases, wrong shapes
        raise VaeInputError(f"--lpips-weights {weights}: {str(exc).splitlines()[0]} ...; expected torchvision's "
                            f"{'AlexNet' if net == 'alex' else 'VGG16'} ImageNet state dict with its shapes") from exc
    model = model.eval().requires_grad_(False).to(device)

    def dist(a: torch.Tensor, b: torch.Tensor) -> float:
        with torch.inference_mode():
            return float(model(a.to(device).float().clamp(-1, 1), b.to(device).float().clamp(-1, 1)).mean())
    return dist


def _progress() -> Callable[[int, int, str], None]:
    state = {"t": 0.0}

    def cb(done: int, total: int, label: str) -> None:
        if time.time() - state["t"] > 0.5 or done == total:
            width = 24
            bar = "#" * (width * done // total) + "." * (width - width * done // total)
            print(f"\r[{bar}] {done}/{total} {label[:70]:70s}", end="\n" if done == total else "", file=sys.stderr,
                  flush=True)
            state["t"] = time.time()
    return cb


def _labels(paths: list[Path]) -> list[str]:
    labels: list[str] = []
    for p in paths:
        base = p.stem if p.is_file() else p.name
        label, i = base, 2
        while label in labels:
            label, i = f"{base} ({i})", i + 1
        labels.append(label)
    return labels


def cmd_eval(args: argparse.Namespace) -> int:
    from ..io.images import bundled_fixture
    from ..loading import load_vae
    from ..io.paths import check_not_input, check_writable_target

    if args.images:
        images = find_images(args.images, clips=args.clips)
    else:
        sample = bundled_fixture("sample.png")
        if not sample.is_file():
            raise VaeInputError(f"no images given and the bundled sample photo {sample} is not installed; expected "
                                "IMAGES (files or folders)")
        print(f"no images given: using the bundled sample photo {sample}")
        images = [sample]
    vae_paths = [Path(v) for v in args.vae] if args.vae else [bundled_fixture("mini-vae-ldm.safetensors")]
    if not args.vae:
        if not vae_paths[0].is_file():
            raise VaeInputError(f"no --vae given and the bundled test VAE {vae_paths[0]} is not installed; expected "
                                "--vae PATH")
        print(f"no --vae given: using the bundled test VAE {vae_paths[0]}")
    out = Path(args.output)
    check_writable_target(out, folder_ok=True)
    for name in ("report.html", "results.csv", "summary.csv", "results.json"):
        check_not_input(out / name, [*images, *vae_paths])
        check_writable_target(out / name)
    device = torch.device(args.device)
    lpips_fn = load_lpips(Path(args.lpips_weights), device) if args.lpips_weights else None
    vaes = {label: load_vae(p, device=device, dtype=torch.float32) for label, p in zip(_labels(vae_paths), vae_paths)}
    if "diffusers" in args.mode and all(t is None for t in args.tile):
        print("note: --mode diffusers only applies to tiled runs; give --tile N for diffusers' tiling row")
    created = _prepare_output(out)
    try:
        result = run_lab(images, vaes, args.dtype, args.tile, args.mode, size=args.size,
                         cache_bytes=args.cache_bytes, lpips=lpips_fn, progress=_progress(), panels=make_panels,
                         clips=args.clips)
        command = "python -m vae_core " + " ".join(shlex.quote(a) for a in (args.argv or ["eval"]))
        paths = write_report(result, out, command)
    except BaseException:
        _remove_created(created)  # a failed run leaves no folder it made behind
        raise
    rows = aggregate(result)
    keys = [(k, lab, unit) for k, lab, unit, _ in METRICS if any(row[k] is not None for row in rows)]
    n_clips = sum("frames" in im for im in result.images)
    what = ", ".join(f"{n} {kind}(s)" for n, kind in ((len(result.images) - n_clips, "image"), (n_clips, "clip"))
                     if n)
    print(f"\n{what} on {result.machine['device']}, torch {result.machine['torch']}")
    print("| setting | ran as | " + " | ".join(f"{lab}{' (' + unit + ')' if unit else ''}" for _, lab, unit in keys)
          + " |")
    print("|---|---|" + "---|" * len(keys))
    for row in rows:
        print(f"| {row['setting'].label} | {', '.join(row['ran_as'])} | "
              + " | ".join(_ms(row[k], k, row["images"]) for k, *_ in keys) + " |")
    for note in result.notes:
        print(f"note: {note}")
    bad = [r for r in result.runs if any(v is not None and math.isnan(v) for v in r.values.values())]
    if bad:
        print(f"warning: {len(bad)} run(s) gave NaN metrics (non-finite output), e.g. {bad[0].setting.label} on "
              f"{bad[0].image}", file=sys.stderr)
    for kind, p in paths.items():
        print(f"wrote {p}")
    return 0


def add_eval_parser(sub: Any) -> None:
    s = sub.add_parser("eval", help="VAE lab: PSNR/SSIM/MS-SSIM, time and memory of VAEs, dtypes and tilers on "
                       "your images, with an HTML report", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("images", nargs="*", help="image files or folders, video files (default: the bundled sample "
                   "photo)")
    s.add_argument("--clips", action="store_true", help="read each folder given as one clip of numbered frames "
                   "(00000.png, ...) instead of a folder of images")
    s.add_argument("--vae", action="append", help="VAE file or diffusers folder; repeat to compare "
                   "(default: the bundled test VAE)")
    s.add_argument("--dtype", nargs="+", default=["fp32"], choices=DTYPE_CHOICES,
                   help="fp32, bf16, fp16 (as is) and fp16-fix (fp16 after the training-free fix); default fp32")
    s.add_argument("--tile", nargs="+", type=_tile, default=[None], help="'none' (untiled) and/or tile edges in "
                   "image px; each tiled run is also compared with its untiled run")
    s.add_argument("--mode", nargs="+", default=["exact"], choices=MODE_CHOICES,
                   help="tiling modes: vae_core exact/fast, and diffusers' enable_tiling as a peer row (kl-f8 VAEs, "
                        "Wan VAEs)")
    s.add_argument("--size", type=_size, default=None, help="resize the shorter side to N and centre-crop N×N "
                   "(the model cards' protocol); default: each image as it is")
    s.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--cache-bytes", type=cache_arg, default="auto", help="exact tiling's cache budget")
    s.add_argument("--lpips-weights", default=None, help="torchvision AlexNet/VGG16 ImageNet weights file for LPIPS "
                   "(needs `pip install lpips`; never downloaded)")
    s.add_argument("-o", "--output", default="vae-lab", help="report folder (default: vae-lab)")
    s.set_defaults(fn=cmd_eval, argv=None)


