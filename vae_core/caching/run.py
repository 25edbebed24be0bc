"""``python -m vae_core cache``: encode a dataset once, with provenance, resumably, on one process or many.

Scale-out is torch.distributed's environment contract: under ``torchrun`` (or ``accelerate launch``) each process
reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, takes ``cuda:LOCAL_RANK`` (or the CPU), and joins a process group
(NCCL on GPUs, gloo on CPU) only for its two barriers (after rank 0 removed the old manifest, and at the end). There
is no coordinator: items are ordered by name
(:mod:`.sources`), grouped into shards of ``shard_size`` in that order, and rank ``r`` takes the shards whose index
is ``r`` modulo the world size; after the barrier rank 0 writes the manifest from the shards' indexes. So a run on
one process and on N processes write the same shards, bit for bit.

Every item gets a *key*: the sha256 of its source bytes' sha256 and of what shapes its latent (the VAE's sha256,
family and scaling, raw/scaled, mean/sample (the seed where it matters: samples, random crops), the dtypes, crop and
flip, the item's bucket and frames, and the tile and mode only where the tile is smaller than the item: elsewhere
the call is untiled). A shard whose index lists the names and keys the current settings give is done and skipped;
otherwise it is rebuilt, reusing the latents of every key any complete old shard holds and encoding only the rest.
So a re-run with the same settings does nothing, a changed tile re-encodes only the items it tiles, a changed shard
size or an added image re-encodes nothing else, and a killed run (any rank, SIGKILL) loses at most the shards in
flight. The old manifest is removed before any shard is rewritten, so a manifest always describes the shards beside
it.

Bad items (unreadable, truncated, decompression bombs, below the smallest bucket, NaN even after the guard's
retries) are recorded in their shard's index and the manifest with the reason and counted, never dropped or
zero-filled; ``strict`` stops at the first.
"""
from __future__ import annotations

import dataclasses
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
from .shards import (FORMAT, MANIFEST, listed_files, member_stem, read_index, read_manifest, read_members,
                     remove_leftovers, remove_temporaries, shard_files, shard_number, write_manifest, write_shard)
from .sources import Item, decode, exif_turned, find_items, image_size, read_bytes

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


#: the layout of what an item's key covers; bump when what vae_core writes for the same key changes
KEY_VERSION = 1


def load_settings(vae: Any) -> dict[str, Any]:
    """The VAE's load settings (``Family.user_settings``) whose values differ from its config's defaults, e.g.
    HunyuanVideo 1.0's ``chunked``: they change the latents the same weights give."""
    cfg = vae.model.config
    if not vae.family.user_settings or not dataclasses.is_dataclass(cfg):
        return {}
    fields = {f.name: f.default for f in dataclasses.fields(cfg)}
    # norm_groups is a fact of the file (config.json, metadata) as before this record had settings: not keyed here,
    # so the keys of caches written before stay as they were
    return {k: getattr(cfg, k) for k in vae.family.user_settings
            if k != "norm_groups" and k in fields and getattr(cfg, k) != fields[k]}


def run_settings(vae: Any, settings: CacheSettings) -> dict[str, Any]:
    """The run's provenance record (the manifest's ``settings``)."""
    info = vae.info
    record = {"vae": {"sha256": weights_sha256(vae), "file": Path(info.weights_file or info.path).name,
                      "family": info.family, "network": vae.family.name, "scaling_factor": info.scaling_factor,
                      "shift_factor": info.shift_factor, "latent_channels": info.latent_channels,
                      "downscale": vae.model.config.downscale}, "key_version": KEY_VERSION}
    chosen = load_settings(vae)
    if chosen:  # only where a setting changes the network's function (earlier caches' keys stay as they were)
        record["vae"]["settings"] = chosen
    record |= {k: v for k, v in asdict(settings).items() if k not in ("shard_size", "buckets")}
    record["buckets"] = None if settings.buckets is None else asdict(settings.buckets)
    return record


def key_settings(run: dict[str, Any]) -> dict[str, Any]:
    """What of the run shapes an item's latents (the key's part; the rest, e.g. the VAE's file name, the bucket
    table or ``--frames``, reaches the key through the item's own facts or not at all)."""
    v = run["vae"]
    out = {"vae": {k: v[k] for k in ("sha256", "family", "scaling_factor", "shift_factor", "settings") if k in v},
           "key_version": run["key_version"], "latents": run["latents"], "posterior": run["posterior"],
           "dtype": run["dtype"], "store_dtype": run["store_dtype"], "flip": run["flip"],
           "tile": run["tile"], "mode": run["mode"]}
    buckets = run["buckets"]
    random_crop = buckets is not None and buckets["crop"] == "random"
    if run["posterior"] == "sample" or random_crop:
        out["seed"] = run["seed"]
    out["crop"] = None if buckets is None else buckets["crop"]
    return out


def item_key(source_sha256: str, run: dict[str, Any], per_item: dict[str, Any]) -> str:
    """sha256 of the source bytes' sha256, what of the run shapes the latents (:func:`key_settings`; the tile and
    mode only where ``per_item`` says the item is tiled) and the item's own facts (bucket, resize, frames)."""
    settings = {k: v for k, v in key_settings(run).items() if k not in ("tile", "mode") or per_item.get("tiled")}
    text = json.dumps({"source": source_sha256, "settings": settings, "item": per_item}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class _Planned:
    """An item with what its key needs, or the reason it failed before encoding."""

    item: Item
    key: str = ""
    facts: dict[str, Any] = field(default_factory=dict)
    failure: Optional[str] = None


def _multiple(vae: Any, settings: CacheSettings) -> int:
    """The side multiple every item must have: the VAE's downscale, twice it where scaled latents are patchified
    2×2 (Flux.2)."""
    f = vae.model.config.downscale
    return 2 * f if settings.latents == "scaled" and vae.family.patched_latents(vae.model) else f


def _plan(item: Item, vae: Any, settings: CacheSettings, run: dict[str, Any]) -> _Planned:
    p = _Planned(item)
    try:
        data = read_bytes(item)
        w, h = image_size(item, data)
        f = _multiple(vae, settings)
        if settings.buckets is None:
            if w < f or h < f:
                raise VaeInputError(f"{item.name}: {w}x{h} px; expected sides of at least {f} px")
            bucket = (w // f * f, h // f * f)
        else:
            bucket = choose(settings.buckets, w, h, item.name)
        tiled = settings.tile is not None and settings.tile < max(bucket)
        p.facts = {"bucket": list(bucket), "original_size": [w, h], "tiled": tiled,
                   "resize": settings.buckets is not None}
        if item.video:
            p.facts["frames_limit"] = settings.frames
        if exif_turned(item, data):  # only then: the keys of all other items stay as they were
            p.facts["exif_turned"] = True
    except VaeInputError as exc:
        p.failure = str(exc)
        return p
    p.key = item_key(hashlib.sha256(data).hexdigest(), run, p.facts)
    return p


def _eps_seed(seed: int, key: str, flipped: bool) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}:{int(flipped)}".encode()).digest()[:8], "big") >> 1


def _encode(vae: Any, x: torch.Tensor, settings: CacheSettings, p: _Planned, flipped: bool) -> torch.Tensor:
    tile = settings.tile if p.facts["tiled"] else None
    if settings.posterior == "mean":
        z = vae.encode(x, tile=tile, mode=settings.mode)
    else:
        mean, logvar = vae.posterior(x, tile=tile, mode=settings.mode)
        g = torch.Generator().manual_seed(_eps_seed(settings.seed, p.key, flipped))  # on the CPU: any device, same ε
        eps = torch.randn(mean.shape, generator=g, dtype=torch.float32).to(mean.device)
        z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps
    if settings.latents == "scaled":
        z = vae.scale_latents(z)
    return z[0].cpu()


def _encode_item(vae: Any, settings: CacheSettings, p: _Planned) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Encode one planned item → (its record, its tar members). The NaN guard starts from the compute dtype for
    every item (a retry in a wider dtype is recorded in ``ran_as``, never carried to the next item)."""
    from safetensors.torch import save as save_bytes

    from ..lab.measure import dtype_name
    from ..precision.dtypes import DTYPES

    x = decode(p.item, read_bytes(p.item))
    content: dict[str, Any] = {"key": p.key, "bucket": p.facts["bucket"], "original_size": p.facts["original_size"]}
    if p.facts.get("exif_turned"):
        content["exif_turned"] = True
    if x.dim() == 5:
        if not vae.family.video:
            raise VaeInputError(f"{p.item.name}: a video, but {vae.family.label} takes images only")
        ft = vae.model.config.temporal_scale
        frames = x.shape[2] if settings.frames is None else min(settings.frames, x.shape[2])
        used = 1 + (frames - 1) // ft * ft
        x = x[:, :, :used]
        content["frames"] = used
    pixels, crop, resized = fit(x, tuple(p.facts["bucket"]), settings.buckets, p.key)
    content |= {"crop_box": list(crop), "resized": list(resized), "flipped": settings.flip}
    store = DTYPES[settings.store_dtype]
    used_dtypes = []
    tensors = {}
    for name, px, flipped in (("latents", pixels, False), ("latents_flipped", pixels.flip(-1), True)):
        if flipped and not settings.flip:
            continue
        vae.guard.working_dtype = None
        z = _encode(vae, px, settings, p, flipped).to(store).contiguous()
        used_dtypes.append(dtype_name(vae.guard.working_dtype or vae.dtype))
        if not bool(torch.isfinite(z.float()).all()):
            raise VaeError(f"{p.item.name}: latents hold NaN/inf (after the NaN guard's retries, as "
                           f"{settings.store_dtype})")
        tensors[name] = z
    content |= {"latent_shape": list(tensors["latents"].shape), "ran_as": "/".join(dict.fromkeys(used_dtypes))}
    meta = json.dumps(content, sort_keys=True)
    record = {"name": p.item.name, "rel": p.item.rel, "member": member_stem(p.item.name, p.key), **content}
    return record, {".safetensors": save_bytes(tensors, metadata={"vae_pack.item": meta}),
                    ".json": json.dumps(record, sort_keys=True).encode()}


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


class _Reuse:
    """The latents an earlier run left, by key (from every complete shard index found at the start), read from
    their tars on demand (a shard another rank has rewritten since may lack them: then the item is encoded)."""

    def __init__(self, out: Path, shards: Sequence[int]) -> None:
        self.out, self.where = out, {}
        self.loaded: dict[int, dict[str, dict[str, bytes]]] = {}
        for i in shards:
            for e in read_index(out, i) or []:
                if e.get("status") == "ok" and "member" in e:
                    self.where.setdefault(e["key"], (i, e["member"]))

    def get(self, key: str) -> Optional[bytes]:
        found = self.where.get(key)
        if found is None:
            return None
        shard, stem = found
        if shard not in self.loaded:
            if len(self.loaded) >= 2:  # a shard's latents at a time or two, not the whole cache
                self.loaded.pop(next(iter(self.loaded)))
            self.loaded[shard] = read_members(self.out, shard)
        member = self.loaded[shard].get(stem, {})
        return member.get(".safetensors")


def _reused(p: _Planned, data: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """An earlier run's latents for this key, with this item's name (the latents' own record holds no name)."""
    content = json.loads(_metadata(data)["vae_pack.item"])
    record = {"name": p.item.name, "rel": p.item.rel, "member": member_stem(p.item.name, p.key), **content}
    return record, {".safetensors": data, ".json": json.dumps(record, sort_keys=True).encode()}


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's bytes."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__", {})


def _check_previous(out: Path, items: list[Item], vae: Any, settings: CacheSettings, run: dict[str, Any],
                    strict: bool) -> None:
    """Before anything in ``out`` changes: a ``manifest.json`` there that this tool did not write is refused, not
    replaced; with ``strict``, a failure the previous run recorded that would recur (its item unchanged, or failing
    again before encoding) stops the run here, leaving the cache as it was.

    Raises:
        VaeInputError: naming the manifest, or the recorded failure.
    """
    if not (out / MANIFEST).exists():
        return
    try:
        manifest = read_manifest(out)
    except VaeInputError as exc:
        if _format_of(out / MANIFEST) == FORMAT:
            return  # ours, of another version or edited by hand: rebuilt from the shards' keys
        raise VaeInputError(f"{exc} — not replaced: move it away, or give an empty folder or one of this tool's "
                            "caches as -o") from None
    if not strict:
        return
    recorded = {f["name"]: f for f in manifest.get("failures", []) if isinstance(f, dict) and "name" in f}
    for item in items:
        if item.name not in recorded:
            continue
        p = _plan(item, vae, settings, run)
        number = shard_number(str(recorded[item.name].get("tar", "")))
        old = next((e for e in (read_index(out, number) if number is not None else None) or []
                    if e.get("name") == item.name), {})
        if p.failure or p.key == old.get("key"):
            raise VaeInputError(f"{p.failure or old.get('reason')} (--strict: stopped at the first bad item, recorded "
                                "by an earlier run; the cache is unchanged)")


def _format_of(path: Path) -> object:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest.get("format") if isinstance(manifest, dict) else None


def _do_shard(out: Path, index: int, items: list[Item], vae: Any, settings: CacheSettings, run: dict[str, Any],
              summary: Summary, strict: bool, progress: _Progress, kill_after: Optional[int], reuse: _Reuse) -> None:
    planned = [_plan(item, vae, settings, run) for item in items]
    done = read_index(out, index)
    if done is not None and [(e.get("name"), e.get("key")) for e in done] == [(p.item.name, p.key) for p in planned]:
        if strict:
            bad = [e for e in done if e.get("status") != "ok"]
            if bad:
                raise VaeInputError(f"{bad[0]['reason']} (recorded by an earlier run; --strict: stopped at the first "
                                    "bad item)")
        summary.skipped += 1
        summary.items += len(items)
        progress.step(len(items))
        return
    entries: list[dict[str, Any]] = []
    members: dict[str, dict[str, bytes]] = {}
    for p in planned:
        summary.items += 1
        old = reuse.get(p.key) if p.failure is None else None
        if old is not None:
            record, found = _reused(p, old)
            members[record["member"]] = found
            entries.append({"status": "ok", **record})
            summary.reused += 1
        elif p.failure is None:
            try:
                record, members[member_stem(p.item.name, p.key)] = _encode_item(vae, settings, p)
                entries.append({"status": "ok", **record})
                summary.encoded += 1
            except Exception as exc:  # noqa: BLE001 - a bad item (any error but an interrupt) is recorded
                log.debug("%s failed", p.item.name, exc_info=True)
                p.failure = str(exc) if isinstance(exc, (VaeError, ValueError)) else f"{p.item.name}: " \
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
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
    from ..precision.dtypes import DTYPES

    env = env or DistEnv()
    settings.check()
    if vae.dtype != DTYPES[settings.dtype]:
        raise VaeInputError(f"a VAE loaded in {vae.dtype} for dtype={settings.dtype!r}; expected it loaded in that "
                            "dtype (the cache records it)")
    if settings.buckets is not None:
        settings.buckets.check(_multiple(vae, settings))
    out = Path(out)
    start = time.time()
    items = find_items(data)
    run = run_settings(vae, settings)
    n = settings.shard_size
    shards = [items[i:i + n] for i in range(0, len(items), n)]
    mine = [i for i in range(len(shards)) if i % env.world == env.rank]
    out.mkdir(parents=True, exist_ok=True)
    _check_previous(out, items, vae, settings, run, strict)
    group = _join(env, vae.device)
    listed = listed_files(out)  # every rank reads it before rank 0 removes it (the start barrier)
    found = {n for n in (shard_number(f) for f in [*listed, *shard_files(out)]) if n is not None}
    reuse = _Reuse(out, sorted(found | set(range(len(shards)))))
    if group is not None:
        group.barrier()
    if env.rank == 0:  # from now on the cache is being rewritten: no manifest may describe it
        (out / MANIFEST).unlink(missing_ok=True)
    if group is not None:
        group.barrier()
    remove_temporaries(out, mine)
    summary = Summary()
    tracker = _Progress(out, env, len(items), progress)
    kill_after = _kill_hook(env)
    try:
        for i in mine:
            _do_shard(out, i, shards[i], vae, settings, run, summary, strict, tracker, kill_after, reuse)
        tracker.step(0, force=True)
        if group is not None:
            group.barrier()
        if env.rank == 0:
            summary.manifest = write_manifest(out, run, len(shards))
            remove_leftovers(out, listed, len(shards))
    finally:
        tracker.close()
        if group is not None:
            group.close()
    summary.seconds = time.time() - start
    return summary


#: how long a rank waits at a barrier for the slowest (shards can be unevenly slow: days, not minutes)
BARRIER_TIMEOUT_S = 7 * 24 * 3600


class _Group:
    """The process group of a distributed run, for its barriers: NCCL where this rank runs on a GPU (its own,
    ``cuda:LOCAL_RANK``), gloo on the CPU; joined over torchrun's ``MASTER_ADDR``/``MASTER_PORT``. A group the
    caller already made is used and left alone."""

    def __init__(self, env: DistEnv, device: torch.device) -> None:
        import datetime

        import torch.distributed as dist

        self.dist, self.own, self.device_ids = dist, not dist.is_initialized(), None
        if self.own:
            nccl = device.type == "cuda" and dist.is_nccl_available()
            if nccl:
                torch.cuda.set_device(device)
                self.device_ids = [device.index if device.index is not None else env.local_rank]
            dist.init_process_group(backend="nccl" if nccl else "gloo",
                                    timeout=datetime.timedelta(seconds=BARRIER_TIMEOUT_S))

    def barrier(self) -> None:
        if self.device_ids is not None:
            self.dist.barrier(device_ids=self.device_ids)
        else:
            self.dist.barrier()

    def close(self) -> None:
        if self.own and self.dist.is_initialized():
            self.dist.destroy_process_group()


def _join(env: DistEnv, device: torch.device) -> Optional[_Group]:
    """The run's process group (see :class:`_Group`), or None for one process."""
    return None if env.world == 1 else _Group(env, device)
