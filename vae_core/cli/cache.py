"""``python -m vae_core cache`` (encode a dataset into a latent cache, on one process or under torchrun /
accelerate launch), ``cache-export`` (kohya / musubi files from a cache) and ``cache-bench`` (items/s on 1 vs N
processes, in one run). See :mod:`vae_core.caching`."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import VaeInputError
from .args import setting_arg, settings_of, tile_arg

__all__ = ["add_cache_parsers", "cmd_cache", "cmd_cache_export", "cmd_cache_bench"]


def _settings(args: argparse.Namespace) -> Any:
    from ..caching.buckets import BucketSpec
    from ..caching.run import CacheSettings

    if args.tile == "auto":
        raise VaeInputError("--tile auto (or 0): a cache records its tile (it is part of every item's key); expected "
                            "'none' or an integer ≥ 64 (image px)")
    if args.frames is not None and args.frames < 1:
        raise VaeInputError(f"--frames {args.frames}; expected at least 1 (frames of each video to cache)")
    buckets = None if args.no_buckets else BucketSpec(args.resolution, args.bucket_min_side, args.bucket_max_side,
                                                      args.bucket_step, args.crop, args.seed)
    return CacheSettings(latents=args.latents, posterior=args.posterior, seed=args.seed, dtype=args.dtype,
                         store_dtype=args.store_dtype, tile=args.tile, mode=args.mode, buckets=buckets,
                         flip=args.flip, frames=args.frames, shard_size=args.shard_size)


def _bar(done: int, total: int, rate: float) -> None:
    width = 24
    filled = width * done // max(total, 1)
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} items, {rate:.2f} items/s", end="",
          file=sys.stderr, flush=True)


def _check_inputs_outside(out: Path, inputs: list[str]) -> None:
    """Refuse inputs inside the cache folder: a cache run deletes shard files there that it no longer lists."""
    root = out.resolve()
    for given in inputs:
        p = Path(given).resolve()
        if p == root or root in p.parents:
            raise VaeInputError(f"{given}: inside the cache folder {out}; expected inputs outside it (a cache run "
                                "rewrites and removes the files in its folder)")


def cmd_cache(args: argparse.Namespace) -> int:
    from ..caching.run import dist_env, run_cache
    from ..caching.shards import verify
    from ..io.paths import check_not_input, check_writable_target
    from ..loading import load_vae

    out = Path(args.output)
    if args.verify:
        problems = verify(out)
        for p in problems:
            print(p)
        print(f"{out}: {'sound' if not problems else f'{len(problems)} problem(s)'}")
        return 0 if not problems else 1
    if not args.data or not args.vae:
        raise VaeInputError("cache: expected DATA (folders, lists or shards) and --vae PATH (or --verify)")
    env = dist_env()
    settings = _settings(args)
    check_writable_target(out, folder_ok=True)
    check_not_input(out, [*args.data, args.vae])
    _check_inputs_outside(out, [*args.data, args.vae])
    device = args.device
    if device == "auto":
        device = f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu"
    vae = load_vae(args.vae, device=device, dtype=args.dtype, settings=settings_of(args.settings))
    summary = run_cache(args.data, out, vae, settings, env, strict=args.strict,
                        progress=None if args.quiet else _bar)
    if env.rank == 0 and not args.quiet:
        print(file=sys.stderr)
    line = (f"rank {env.rank}/{env.world}: {summary.items} items in its shards, {summary.encoded} encoded, "
            f"{summary.reused} reused, {summary.failed} failed; {summary.written} shards written, {summary.skipped} "
            f"already done; {summary.seconds:.1f} s")
    print(line)
    if summary.manifest is not None:
        m = summary.manifest
        print(f"wrote {out / 'manifest.json'}: {m['items']} items, {m['ok']} cached, {m['failed']} failed, "
              f"{len(m['shards'])} shards")
        for f in m["failures"][:10]:
            print(f"  failed: {f['name']}: {f['reason']}")
        if len(m["failures"]) > 10:
            print(f"  ... and {len(m['failures']) - 10} more (manifest.json lists them all)")
    return 0


def cmd_cache_export(args: argparse.Namespace) -> int:
    from ..caching.export import export_cache

    files = export_cache(Path(args.cache), Path(args.output), args.to, args.arch)
    print(f"wrote {len(files)} {args.to} files under {args.output}")
    if files.skipped:
        print(f"skipped {len(files.skipped)} item(s) (not encoded, or not exportable to {args.to}):")
        for f in files.skipped[:10]:
            print(f"  {f['name']}: {f['reason']}")
    return 0


def cmd_cache_bench(args: argparse.Namespace) -> int:
    """Time the same cache run on each process count (torchrun on this machine), in fresh output folders."""
    from ..caching.sources import find_items

    items = len(find_items(args.data))
    import shlex

    passthrough = shlex.split(args.cache_args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vae-cache-bench-") as tmp:
        for n in args.procs:
            out = Path(tmp) / f"procs{n}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m",
                   "vae_core", "cache", *map(str, args.data), "--vae", str(args.vae), "-o", str(out), "--quiet",
                   *passthrough]
            env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // n)))
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            seconds = time.perf_counter() - t0
            if done.returncode != 0:
                raise VaeInputError(f"cache-bench: {n} process(es) failed: {done.stderr.strip().splitlines()[-1:]}")
            manifest = json.loads((out / "manifest.json").read_text())
            rows.append((n, seconds, manifest["ok"]))
            shutil.rmtree(out, ignore_errors=True)
    machine = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"# vae_core cache-bench: {items} items, {args.vae}; {machine}; torch {torch.__version__}; launched by torchrun "
          "(start-up included)")
    print("| processes | seconds | items/s | vs 1 process |\n|---|---|---|---|")
    base = rows[0][2] / rows[0][1]
    for n, seconds, ok in rows:
        print(f"| {n} | {seconds:.2f} | {ok / seconds:.2f} | {ok / seconds / base:.2f}× |")
    return 0


def add_cache_parsers(sub: Any) -> None:
    s = sub.add_parser("cache", help="encode a dataset once into a latent cache (tar shards, manifest), resumably, "
                       "on one process or under torchrun / accelerate launch")
    s.add_argument("data", nargs="*", help="image/video folders, file lists (.txt) or webdataset tar shards")
    s.add_argument("-o", "--output", required=True, help="the cache folder (created; re-running resumes it)")
    s.add_argument("--vae", help="the VAE (any file or folder vae_core loads)")
    s.add_argument("--set", dest="settings", type=setting_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="a load setting of the VAE (repeatable), e.g. chunked=true for HunyuanVideo 1.0 (recorded in "
                   "the manifest and every item's key)")
    s.add_argument("--device", default="auto", help="auto: cuda:LOCAL_RANK where CUDA is, else cpu")
    s.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="the VAE's compute dtype (the "
                   "NaN guard retries wider)")
    s.add_argument("--store-dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="dtype of the saved latents")
    s.add_argument("--latents", default="raw", choices=["raw", "scaled"], help="raw: the VAE's own latents; scaled: "
                   "the diffusion model's (scaling/shift or per-channel statistics applied)")
    s.add_argument("--posterior", default="mean", choices=["mean", "sample"], help="the posterior mean, or a sample "
                   "seeded per item by --seed")
    s.add_argument("--seed", type=int, default=0, help="seed of samples and random crops")
    s.add_argument("--tile", type=tile_arg, default=None, help="exact tiling for items larger than this (image px; "
                   "default none)")
    s.add_argument("--mode", default="exact", choices=["exact", "fast"])
    s.add_argument("--resolution", type=int, default=1024, help="bucket target area: resolution² (default 1024)")
    s.add_argument("--bucket-min-side", type=int, default=256)
    s.add_argument("--bucket-max-side", type=int, default=2048)
    s.add_argument("--bucket-step", type=int, default=64)
    s.add_argument("--no-buckets", action="store_true", help="keep each image's size (floored to the VAE's "
                   "multiple) instead of bucketing")
    s.add_argument("--crop", default="center", choices=["center", "random"])
    s.add_argument("--flip", action="store_true", help="also cache the horizontally flipped latents")
    s.add_argument("--frames", type=int, default=None, help="videos: at most this many frames (trimmed to 1 + ft·k)")
    s.add_argument("--shard-size", type=int, default=256, help="items per tar shard (the unit of resume)")
    s.add_argument("--strict", action="store_true", help="stop at the first bad item instead of recording it")
    s.add_argument("--verify", action="store_true", help="check an existing cache against its manifest and exit")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_cache)

    e = sub.add_parser("cache-export", help="write a cache's latents as kohya (.npz) or musubi-tuner (.safetensors) "
                       "files")
    e.add_argument("cache", help="a cache folder (with manifest.json)")
    e.add_argument("--to", required=True, choices=["kohya", "musubi"])
    e.add_argument("-o", "--output", required=True, help="where to write (e.g. the image folder, for sd-scripts)")
    e.add_argument("--arch", default=None, help="the trainer's architecture name when the family does not say it")
    e.set_defaults(fn=cmd_cache_export)

    b = sub.add_parser("cache-bench", help="items/s of `cache` on 1 vs N processes (torchrun), in one run")
    b.add_argument("data", nargs="+")
    b.add_argument("--vae", required=True)
    b.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    b.add_argument("--cache-args", default="", help="options passed to every cache run, one string (e.g. "
                   "\"--resolution 512 --dtype bf16\")")
    b.set_defaults(fn=cmd_cache_bench)
