"""``python -m vae_core cache``: encode a dataset once, with provenance, resumably, on one process or many.

Scale-out is torch.distributed's environment contract: under ``torchrun`` (or ``accelerate launch``) each process
reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, takes ``cuda:LOCAL_RANK`` (or the CPU), and joins a process group
(NCCL on GPUs, gloo on CPU) only for the final barrier. There is no coordinator: items are ordered by name
(:mod:`.sources`), grouped into shards of ``shard_size`` in that order, and rank ``r`` takes the shards whose index
is ``r`` modulo the world size; after the barrier rank 0 writes the manifest from the shards' indexes. So a run on
one process and on N processes write the same shards, bit for bit.

Every item gets a *key*: the sha256 of its source bytes' sha256 and of the settings that shape its latent (the
VAE's sha256, family, scaling, raw/scaled, mean/sample and seed, dtypes, the bucket, crop and flip, and the tile and
mode only where the tile is smaller than the item: elsewhere the call is untiled). A shard whose index lists the
keys the current settings give is done and skipped; otherwise it is rebuilt, reusing the latents of every key its
old tar holds and encoding only the rest. So a re-run with the same settings does nothing, a changed tile re-encodes
only the items it tiles, and a killed run (any rank, SIGKILL) loses at most the shards it was writing.

Bad items (unreadable, truncated, decompression bombs, below the smallest bucket, NaN even after the guard's
retries) are recorded in their shard's index and the manifest with the reason and counted, never dropped or
zero-filled; ``strict`` stops at the first.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..errors import VaeError, VaeInputError
from .buckets import BucketSpec, choose, fit
from .shards import read_index, read_members, remove_temporaries, write_manifest, write_shard
from .sources import Item, decode, find_items, image_size, read_bytes

__all__ = ["CacheSettings", "DistEnv", "Summary", "run_cache", "dist_env", "item_key"]

log = logging.getLogger(__name__)

#: test hook (``"rank:n"``): that rank kills itself with SIGKILL after encoding n items, mid-shard
KILL_HOOK = "VAE_PACK_TEST_KILL_AFTER"


@dataclass(frozen=True)
class CacheSettings:
    """What shapes the latents (see the module docstring). ``latents``: ``"raw"`` (the VAE's own space) or
    ``"scaled"`` (the diffusion model's: :meth:`Vae.scale_latents`); ``posterior``: ``"mean"`` or ``"sample"``
    (``mean + exp(logvar / 2)·ε``, ε seeded per item from ``seed``); ``dtype``: the VAE's compute dtype,
    ``store_dtype``: the saved latents'; ``buckets``: None to keep each image's size (floored to the VAE's
    downscale); ``frames``: videos are trimmed to the largest ``1 + ft·k`` frames up to this many (None: all)."""

    latents: str = "raw"
    posterior: str = "mean"
    seed: int = 0
    dtype: str = "fp32"
    store_dtype: str = "fp32"
    tile: Optional[int] = None
    mode: str = "exact"
    buckets: Optional[BucketSpec] = field(default_factory=BucketSpec)
    flip: bool = False
    frames: Optional[int] = None
    shard_size: int = 256

    def check(self) -> None:
        for name, value, allowed in (("latents", self.latents, ("raw", "scaled")),
                                     ("posterior", self.posterior, ("mean", "sample")),
                                     ("dtype", self.dtype, ("fp32", "bf16", "fp16")),
                                     ("store_dtype", self.store_dtype, ("fp32", "bf16", "fp16")),
                                     ("mode", self.mode, ("exact", "fast"))):
            if value not in allowed:
                raise VaeInputError(f"{name}={value!r}; expected one of {', '.join(allowed)}")
        if self.shard_size < 1:
            raise VaeInputError(f"shard size {self.shard_size}; expected at least 1 item per shard")


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run: ``rank`` of ``world`` (``RANK``/``WORLD_SIZE``), ``local_rank``
    (``LOCAL_RANK``, its GPU)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0


def dist_env(environ: Optional[dict[str, str]] = None) -> DistEnv:
    """The torch.distributed environment contract (torchrun, accelerate launch, or none: one process).

    Raises:
        VaeInputError: values that are not integers, or a rank outside the world.
    """
    env = os.environ if environ is None else environ
    try:
        rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise VaeInputError(f"RANK={env.get('RANK')!r} WORLD_SIZE={env.get('WORLD_SIZE')!r} LOCAL_RANK="
                            f"{env.get('LOCAL_RANK')!r}; expected integers (as torchrun sets them)") from exc
    if world < 1 or not 0 <= rank < world or local < 0:
        raise VaeInputError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}; expected 0 ≤ RANK < WORLD_SIZE")
    return DistEnv(rank, world, local)


@dataclass
class Summary:
    """What one process did: ``items`` in its shards, ``encoded`` anew, ``reused`` from an earlier run, ``failed``,
    shards ``written`` and ``skipped`` (already done), ``seconds``; the manifest (rank 0)."""

    items: int = 0
    encoded: int = 0
    reused: int = 0
    failed: int = 0
    written: int = 0
    skipped: int = 0
    seconds: float = 0.0
    manifest: Optional[dict[str, Any]] = None


def weights_sha256(vae: Any) -> str:
    """sha256 of the file the VAE's tensors came from (computed once per process)."""
    from .shards import file_sha256

    path = Path(vae.info.weights_file or vae.info.path)
    return file_sha256(path) if path.is_file() else hashlib.sha256(str(path).encode()).hexdigest()


def run_settings(vae: Any, settings: CacheSettings) -> dict[str, Any]:
    """The run's provenance record (the manifest's ``settings``; every item's key includes it)."""
    info = vae.info
    record = {"vae": {"sha256": weights_sha256(vae), "file": Path(info.weights_file or info.path).name,
                      "family": info.family, "network": vae.family.name, "scaling_factor": info.scaling_factor,
                      "shift_factor": info.shift_factor, "latent_channels": info.latent_channels,
                      "downscale": vae.model.config.downscale}}
    record |= {k: v for k, v in asdict(settings).items() if k not in ("shard_size", "buckets")}
    record["buckets"] = None if settings.buckets is None else asdict(settings.buckets)
    return record


def item_key(source_sha256: str, run: dict[str, Any], per_item: dict[str, Any]) -> str:
    """sha256 of the source bytes' sha256, the run's settings (without tile and mode unless ``per_item`` says the
    item is tiled) and the item's own ``per_item`` facts (bucket, frames)."""
    settings = {k: v for k, v in run.items() if k not in ("tile", "mode") or per_item.get("tiled")}
    text = json.dumps({"source": source_sha256, "settings": settings, "item": per_item}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class _Planned:
    """An item with what its key needs, or the reason it failed before encoding."""

    item: Item
    data: bytes = b""
    key: str = ""
    facts: dict[str, Any] = field(default_factory=dict)
    failure: Optional[str] = None


def _plan(item: Item, vae: Any, settings: CacheSettings, run: dict[str, Any]) -> _Planned:
    p = _Planned(item)
    try:
        p.data = read_bytes(item)
        w, h = image_size(item, p.data)
        f = vae.model.config.downscale
        if settings.buckets is None:
            if w < f or h < f:
                raise VaeInputError(f"{item.name}: {w}x{h} px; expected sides of at least {f} px")
            bucket = (w // f * f, h // f * f)
        else:
            bucket = choose(settings.buckets, w, h, item.name)
        tiled = settings.tile is not None and settings.tile < max(bucket)
        p.facts = {"bucket": list(bucket), "original_size": [w, h], "tiled": tiled}
    except VaeInputError as exc:
        p.failure = str(exc)
        return p
    p.key = item_key(hashlib.sha256(p.data).hexdigest(), run, p.facts)
    return p


def _eps_seed(seed: int, key: str, flipped: bool) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}:{int(flipped)}".encode()).digest()[:8], "big") >> 1


def _encode(vae: Any, x: torch.Tensor, settings: CacheSettings, p: _Planned, flipped: bool) -> torch.Tensor:
    tile = settings.tile if p.facts["tiled"] else None
    if settings.posterior == "mean":
        z = vae.encode(x, tile=tile, mode=settings.mode)
    else:
        mean, logvar = vae.posterior(x, tile=tile, mode=settings.mode)
        g = torch.Generator().manual_seed(_eps_seed(settings.seed, p.key, flipped))
        eps = torch.randn(mean.shape, generator=g, dtype=torch.float32)
        z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps
    if settings.latents == "scaled":
        z = vae.scale_latents(z)
    if not bool(torch.isfinite(z).all()):
        raise VaeError(f"{p.item.name}: latents hold NaN/inf after the NaN guard's retries")
    return z[0]


def _encode_item(vae: Any, settings: CacheSettings, p: _Planned) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Encode one planned item → (its record, its tar members)."""
    from safetensors.torch import save as save_bytes

    from ..precision.dtypes import DTYPES

    x = decode(p.item, p.data)
    record = {"name": p.item.name, "key": p.key, **{k: v for k, v in p.facts.items() if k != "tiled"}}
    if x.dim() == 5:
        if not vae.family.video:
            raise VaeInputError(f"{p.item.name}: a video, but {vae.family.label} takes images only")
        ft = vae.model.config.temporal_scale
        frames = x.shape[2] if settings.frames is None else min(settings.frames, x.shape[2])
        used = 1 + (frames - 1) // ft * ft
        x = x[:, :, :used]
        record["frames"] = used
    pixels, crop = fit(x, tuple(p.facts["bucket"]), settings.buckets, p.key)
    record["crop_ltrb"] = list(crop)
    store = DTYPES[settings.store_dtype]
    tensors = {"latents": _encode(vae, pixels, settings, p, False).to(store).contiguous()}
    if settings.flip:
        tensors["latents_flipped"] = _encode(vae, pixels.flip(-1), settings, p, True).to(store).contiguous()
    record["latent_shape"] = list(tensors["latents"].shape)
    text = json.dumps(record, sort_keys=True)
    return record, {".safetensors": save_bytes(tensors, metadata={"vae_pack.item": text}),
                    ".json": text.encode()}


class _Progress:
    """Items done by this rank, in a small file rank 0 reads (no collective: ranks never wait on each other)."""

    def __init__(self, out: Path, env: DistEnv, total: int, report: Optional[Callable[[int, int, float], None]]):
        self.path, self.env, self.total, self.report = out / f".progress-rank{env.rank}.json", env, total, report
        self.done, self.start, self.last = 0, time.time(), 0.0

    def step(self, n: int = 1, force: bool = False) -> None:
        self.done += n
        now = time.time()
        if not force and now - self.last < 0.5:
            return
        self.last = now
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"done": self.done}))
        os.replace(tmp, self.path)
        if self.report is not None and self.env.rank == 0:
            done = sum(self._read(r) for r in range(self.env.world))
            self.report(done, self.total, done / max(now - self.start, 1e-9))

    def _read(self, rank: int) -> int:
        if rank == self.env.rank:
            return self.done
        try:
            return int(json.loads((self.path.with_name(f".progress-rank{rank}.json")).read_text())["done"])
        except (OSError, ValueError, KeyError):
            return 0

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


def _kill_hook(env: DistEnv) -> Optional[int]:
    value = os.environ.get(KILL_HOOK, "")
    if not value:
        return None
    rank, _, n = value.partition(":")
    return int(n) if int(rank) == env.rank else None


def _do_shard(out: Path, index: int, items: list[Item], vae: Any, settings: CacheSettings, run: dict[str, Any],
              summary: Summary, strict: bool, progress: _Progress, kill_after: Optional[int]) -> None:
    planned = [_plan(item, vae, settings, run) for item in items]
    done = read_index(out, index)
    expected = [(p.item.name, p.key) for p in planned]
    if done is not None and [(e["name"], e["key"]) for e in done] == expected:
        summary.skipped += 1
        summary.items += len(items)
        progress.step(len(items))
        return
    old = read_members(out, index)
    entries: list[dict[str, Any]] = []
    members: dict[str, dict[str, bytes]] = {}
    for p in planned:
        summary.items += 1
        if p.failure is None and p.key in old and set(old[p.key]) == {".safetensors", ".json"}:
            members[p.key] = old[p.key]
            entries.append({"status": "ok", **json.loads(old[p.key][".json"])})
            summary.reused += 1
        elif p.failure is None:
            try:
                record, members[p.key] = _encode_item(vae, settings, p)
                entries.append({"status": "ok", **record})
                summary.encoded += 1
            except (VaeError, ValueError) as exc:  # VaeInputError/VaeLoadError are ValueErrors; NaN: VaeError
                p.failure = str(exc)
            if kill_after is not None and summary.encoded >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        if p.failure is not None:
            if strict:
                raise VaeInputError(f"{p.failure} (--strict: stopped at the first bad item)")
            entries.append({"status": "failed", "name": p.item.name, "key": p.key, "reason": p.failure})
            summary.failed += 1
        progress.step()
    write_shard(out, index, entries, members)
    summary.written += 1


def run_cache(data: Sequence[os.PathLike | str], out: os.PathLike | str, vae: Any, settings: CacheSettings,
              env: Optional[DistEnv] = None, strict: bool = False,
              progress: Optional[Callable[[int, int, float], None]] = None) -> Summary:
    """Cache the latents of every item of ``data`` into ``out`` with ``vae`` (a loaded :class:`~vae_core.Vae` in
    the compute dtype on this rank's device), this process's shards only, then the barrier and (rank 0) the
    manifest. ``progress(done, total, items_per_second)`` on rank 0, over all ranks.

    Raises:
        VaeInputError: bad settings or DATA (before any work), or a bad item with ``strict``.
    """
    env = env or DistEnv()
    settings.check()
    if settings.buckets is not None:
        settings.buckets.check(vae.model.config.downscale)
    out = Path(out)
    start = time.time()
    items = find_items(data)
    run = run_settings(vae, settings)
    n = settings.shard_size
    shards = [items[i:i + n] for i in range(0, len(items), n)]
    mine = [i for i in range(len(shards)) if i % env.world == env.rank]
    out.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out, mine)
    summary = Summary()
    tracker = _Progress(out, env, len(items), progress)
    kill_after = _kill_hook(env)
    group = _join(env)
    try:
        for i in mine:
            _do_shard(out, i, shards[i], vae, settings, run, summary, strict, tracker, kill_after)
        tracker.step(0, force=True)
        if group is not None:
            group.barrier()
        if env.rank == 0:
            for stale in sorted(out.glob("shard-*.tar")) + sorted(out.glob("shard-*.jsonl")):
                if int(stale.name[6:12]) >= len(shards):  # a bigger earlier run's shards: not in this cache
                    stale.unlink()
            summary.manifest = write_manifest(out, run, len(shards))
    finally:
        tracker.close()
        if group is not None and group.is_initialized():
            group.destroy_process_group()
    summary.seconds = time.time() - start
    return summary


#: how long a rank waits at the final barrier for the slowest (shards can be unevenly slow: days, not minutes)
BARRIER_TIMEOUT_S = 7 * 24 * 3600


def _join(env: DistEnv) -> Any:
    """Join the process group (NCCL on GPUs, gloo otherwise; torchrun's ``MASTER_ADDR``/``MASTER_PORT``), used
    only for the final barrier; None for one process."""
    if env.world == 1:
        return None
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=BARRIER_TIMEOUT_S))
    return dist
