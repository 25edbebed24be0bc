"""Device and precision policy: statistics without float64 (MPS, DirectML), native bf16 judged per device, devices
this torch does not have, free memory under container and process limits, pinned memory handed back, and the NaN
guard retrying from the weights as loaded."""
from __future__ import annotations

import copy
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import vae_core
from vae_core import devices
from vae_core.tiling import memory
from vae_core.tiling import cache as tile_cache
from vae_core import tiling
from vae_core.tiling import sweep
from vae_core.lab.metrics import signed_psnr as psnr, snr
from conftest import MINI_LDM, ROOT


class _Float64Ops(TorchDispatchMode):
    """Records every op that produces a float64 tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tree_leaves(out)):
            self.seen.append(str(func))
        return out


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).square().mean().sqrt())


def test_no_float64_device_pools_statistics_in_compensated_float32(mini_vae, image_512, monkeypatch):
    """On MPS/DirectML (no float64) exact tiling accumulates in Kahan-compensated float32 on the device: no float64
    tensor is ever made (the branch is forced here on the CPU), and the result stays as exact as with float64."""
    x = image_512[..., 128:384, 64:320]
    z = mini_vae.encode(x)
    ref_dec, ref_enc = mini_vae.decode(z, tile=64), mini_vae.encode(x, tile=64)  # float64 statistics
    monkeypatch.setattr("vae_core.tiling.stats.has_float64", lambda device: False)
    with _Float64Ops() as spy:
        dec, enc = mini_vae.decode(z, tile=64), mini_vae.encode(x, tile=64)
    assert spy.seen == [], spy.seen[:5]
    assert psnr(ref_dec, dec) >= 130 and snr(ref_enc, enc) >= 130
    with torch.no_grad():
        truth = copy.deepcopy(mini_vae.model).double().decode(z.double())
    assert _rms(dec, truth) <= 1.25 * _rms(mini_vae.decode(z), truth)
    with _Float64Ops() as spy:  # the float64 path, for contrast: it does use float64 where the device has it
        monkeypatch.setattr("vae_core.tiling.stats.has_float64", lambda device: True)
        mini_vae.decode(z, tile=64)
    assert spy.seen


def test_float64_and_bf16_policy_per_device_type(monkeypatch):
    assert devices.has_float64("cpu") and devices.has_float64("cuda")
    assert not devices.has_float64("mps") and not devices.has_float64(torch.device("privateuseone", 0))
    assert not devices.bf16_native("cpu") and not devices.bf16_native("mps")


@pytest.fixture
def two_gpus(monkeypatch):
    """A fake machine: cuda:0 an A100 (8.0), cuda:1 a T4 (7.5); torch's own check counts emulated bf16 as True."""
    caps = {0: (8, 0), 1: (7, 5)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: caps[0 if index is None else index])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.version, "hip", None)
    return caps


def test_bf16_is_native_only_from_compute_capability_8_for_the_device_given(two_gpus):
    from vae_core.precision.dtypes import bf16_supported, resolve_dtype

    assert bf16_supported(torch.device("cuda:0")) and bf16_supported(torch.device("cuda"))  # current device: 0
    assert not bf16_supported(torch.device("cuda:1"))  # a T4: emulated bf16, slow
    assert resolve_dtype("auto", torch.device("cuda:1")) == (torch.float16, True)  # fp16 with the fix instead
    assert resolve_dtype("auto", torch.device("cuda:0")) == (torch.bfloat16, False)


def test_bf16_on_amd_by_architecture(two_gpus, monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2")
    archs = {0: "gfx90a:sramecc+:xnack-", 1: "gfx906:sramecc+:xnack-"}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"gcnArchName": archs[i]})())
    assert devices.bf16_native("cuda:0") and not devices.bf16_native("cuda:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_a_device_this_torch_lacks_is_a_typed_error():
    with pytest.raises(vae_core.VaeInputError, match=r"'cuda'.*sees 0 cuda device"):
        vae_core.load_vae(MINI_LDM, device="cuda")  # torch itself: a bare AssertionError
    with pytest.raises(vae_core.VaeInputError, match="cuda:3"):
        vae_core.load_vae(MINI_LDM).to("cuda:3")
    with pytest.raises(vae_core.VaeInputError, match="meta"):
        devices.parse_device("meta")


# -- free memory under limits -----------------------------------------------------------------------------------------
def _fake_system(root, meminfo_gib: float, cgroup_line: str, files: dict[str, str]):
    proc, cg = root / "proc", root / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: 24000000 kB\nMemAvailable: {int(meminfo_gib * 2**20)} kB\n")
    (proc / "self" / "cgroup").write_text(cgroup_line)
    (proc / "self" / "status").write_text("VmSize: 1000 kB\nVmData: 500 kB\n")
    for rel, text in files.items():
        (cg / rel).parent.mkdir(parents=True, exist_ok=True)
        (cg / rel).write_text(text)
    return proc, cg


def test_free_memory_takes_the_cgroup_v2_limit(tmp_path):
    """Docker/Kubernetes: an 8 GiB memory.max on a 23 GiB machine, 1 GiB used, 0.5 GiB of it reclaimable cache."""
    proc, cg = _fake_system(tmp_path, 23, "0::/docker/abc\n", {
        "docker/abc/memory.max": str(8 * 2**30), "docker/abc/memory.current": str(2**30),
        "docker/abc/memory.stat": f"anon 1\ninactive_file {2**29}\n", "docker/memory.max": "max",
        "docker/memory.current": "5"})
    assert memory.cpu_available(proc, cg) == 8 * 2**30 - 2**30 + 2**29
    (cg / "docker" / "memory.max").write_text(str(4 * 2**30))  # a tighter parent limit wins
    (cg / "docker" / "memory.current").write_text(str(2**30))
    assert memory.cpu_available(proc, cg) == 3 * 2**30


def test_free_memory_takes_the_cgroup_v1_limit(tmp_path):
    proc, cg = _fake_system(tmp_path, 23, "4:memory:/process/x\n0::/\n", {
        "memory/memory.limit_in_bytes": "9223372036854771712", "memory/memory.usage_in_bytes": str(2**30),
        "memory/process/x/memory.limit_in_bytes": str(6 * 2**30),
        "memory/process/x/memory.usage_in_bytes": str(2 * 2**30)})
    assert memory.cpu_available(proc, cg) == 4 * 2**30
    assert memory.cpu_available(proc, tmp_path / "no-cgroups") == 23 * 2**30  # no limit: MemAvailable


def test_free_memory_takes_the_address_space_limit(tmp_path, monkeypatch):
    import resource

    proc, cg = _fake_system(tmp_path, 23, "0::/\n", {})
    limits = {resource.RLIMIT_AS: (1000 * 1024 + 3 * 2**30, resource.RLIM_INFINITY),
              resource.RLIMIT_DATA: (resource.RLIM_INFINITY, resource.RLIM_INFINITY)}
    monkeypatch.setattr(resource, "getrlimit", lambda which: limits[which])
    assert memory.cpu_available(proc, cg) == 3 * 2**30


def test_auto_decode_under_a_real_address_space_limit():
    """The process's RLIMIT_AS leaves ~0.9 GiB of headroom; an untiled 1024² decode of the test VAE needs ~1.4 GiB.
    "auto" must see the limit: tile from the start, with a cache budget inside it (reading MemAvailable alone it ran
    untiled into "can't allocate memory", then retried tiled with a cache budget of 40 % of the whole machine's RAM,
    which at 2048² failed outright)."""
    script = textwrap.dedent(f"""
        import resource, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        import vae_core
        from vae_core.tiling import memory
        from vae_core import tiling
        torch.set_num_threads(2)
        vae = vae_core.load_vae({str(MINI_LDM)!r})
        z = torch.randn(1, 4, 128, 128, generator=torch.Generator().manual_seed(0)) * 3
        used = memory._read(memory.Path("/proc/self/status"))
        size = next(int(l.split()[1]) * 1024 for l in used.splitlines() if l.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (size + 900 * 2**20, resource.RLIM_INFINITY))
        assert memory.cpu_available() <= 900 * 2**20
        report = tiling.TileReport()
        y = vae.decode(z, tile="auto", report=report)
        print("tiles", report.tiles, "budget", report.cache_budget, "finite", bool(torch.isfinite(y).all()),
              tuple(y.shape))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    words = proc.stdout.split()
    assert int(words[1]) > 1 and int(words[3]) <= 900 * 2**20, proc.stdout  # tiled, the cache within the limit
    assert "finite True (1, 3, 1024, 1024)" in proc.stdout, proc.stdout
    assert "out of memory" not in proc.stderr, proc.stderr[-2000:]  # decided up front, no failed untiled attempt


# -- pinned host memory -------------------------------------------------------------------------------------------------
def test_pinned_checkpoints_are_handed_back_when_the_call_ends(monkeypatch):
    """On CUDA checkpoints spill to pinned host memory, which PyTorch's caching host allocator keeps after the call;
    the store reports how much it pinned and empties that cache when it closes (simulated: no GPU here)."""
    released = []
    monkeypatch.setattr(tile_cache, "_pinned_like", lambda t: t.clone())
    monkeypatch.setattr(tile_cache, "release_pinned_cache", lambda: released.append(1) or True)
    store = tile_cache.CheckpointStore(torch.device("cpu"), 0)
    store.budget["host"] = 2**20  # what a CUDA store gets for its host tier
    assert store.put(0, 3, {"x": torch.zeros(1000)}) and store.entries[0][2] == "host"
    assert store.pinned_peak == 4096  # 4000 bytes in a power-of-two pinned block
    store.close()
    assert released == [1] and not store.entries
    plain = tile_cache.CheckpointStore(torch.device("cpu"), 2**20)
    plain.put(0, 3, {"x": torch.zeros(1000)})
    plain.close()
    assert released == [1]  # nothing pinned: nothing to hand back


def test_the_store_is_closed_when_a_tiled_call_fails(mini_vae, monkeypatch):
    closed = []

    class Recording(tile_cache.CheckpointStore):
        def close(self) -> None:
            closed.append(True)
            super().close()

    monkeypatch.setattr(sweep, "CheckpointStore", Recording)  # the sweep engine opens the store
    with pytest.raises(vae_core.Cancelled):
        mini_vae.decode(torch.randn(1, 4, 24, 24), tile=64, cancel=lambda: True)
    assert closed == [True]


# -- the NaN guard retries from the weights as loaded -----------------------------------------------------------------
def test_guard_retries_from_the_loaded_weights_not_a_rounded_copy(mini_vae, monkeypatch, caplog):
    """fp16 → bf16 → fp32: the fp32 retry must run the fp16 weights as loaded (not bf16-rounded ones), and casting
    back to fp16 afterwards gives exactly the loaded weights (bf16 is simulated as native here)."""
    monkeypatch.setattr("vae_core.precision.dtypes.bf16_supported", lambda device: True)
    vae = mini_vae.clone().to(dtype=torch.float16)
    loaded = {k: v.clone() for k, v in vae.model.state_dict().items()}
    seen: list[dict] = []
    real = vae.model.decode

    def decode(t):
        seen.append({k: v.clone() for k, v in vae.model.state_dict().items()})
        y = real(t)
        if t.dtype != torch.float32:
            y[-1, -1, -1, -1] = float("nan")
        return y

    vae.model.decode = decode
    with caplog.at_level(logging.WARNING):
        y = vae.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert torch.isfinite(y).all() and [s["decoder.conv_in.weight"].dtype for s in seen] == [
        torch.float16, torch.bfloat16, torch.float32]
    assert all(torch.equal(seen[2][k], v.float()) for k, v in loaded.items())  # fp32 = the loaded fp16, exactly
    vae.to(torch.float16)
    assert all(torch.equal(v, loaded[k]) for k, v in vae.model.state_dict().items())
