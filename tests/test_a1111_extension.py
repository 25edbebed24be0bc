"""A1111 extension against the v1.10.1 stand-in: dropdown entries for every format, strict loads, reload without
double wrapping, tiled hooks installed and restored, NaN retry and the fp16 fix."""
from __future__ import annotations

import importlib.util
import logging
import shutil
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

import vae_core
from vae_core.lab.metrics import signed_psnr as psnr
from vae_core.tiling import Cancelled
from conftest import MINI_DIFFUSERS, MINI_LDM, ROOT

STANDIN = ROOT / "tests" / "a1111_standin"


def _load_script():
    """Import scripts/vae_pack.py as A1111 does: extension root on sys.path only while importing."""
    sys.path.insert(0, str(ROOT))
    try:
        spec = importlib.util.spec_from_file_location("vae_pack.py", ROOT / "scripts" / "vae_pack.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT))


@pytest.fixture(scope="module")
def a1111(tmp_path_factory, monkeypatch_module):
    models = tmp_path_factory.mktemp("a1111") / "models"
    vae_dir = models / "VAE"
    (vae_dir / "nested").mkdir(parents=True)
    shutil.copy(MINI_LDM, vae_dir / "mini-ldm.safetensors")
    shutil.copytree(MINI_DIFFUSERS, vae_dir / "mini-vae")
    ldm = load_file(str(MINI_LDM))
    torch.save({"state_dict": ldm}, vae_dir / "as-bin.bin")
    save_file({f"first_stage_model.{k}": v for k, v in ldm.items()} | {"model.diffusion_model.x": torch.zeros(1)},
              str(vae_dir / "full-checkpoint.safetensors"))
    shutil.copytree(MINI_DIFFUSERS, vae_dir / "nested" / "mini-vae")  # same folder name twice
    monkeypatch_module.setenv("A1111_STANDIN_MODELS", str(models))
    monkeypatch_module.syspath_prepend(str(STANDIN))
    for name in [m for m in sys.modules if m == "modules" or m.startswith("modules.") or m.startswith("webui_extension")]:
        del sys.modules[name]
    import ldm_standin
    from modules import devices, script_callbacks, sd_vae, shared, shared_items

    original_refresh = sd_vae.refresh_vae_list
    script = _load_script()
    sd_model = ldm_standin.SdModel([32, 64, 128, 128], 2)  # the fixture's widths
    shared.sd_model = sd_model
    sd_vae.refresh_vae_list()  # A1111 refreshes right after loading the scripts
    yield dict(sd_vae=sd_vae, shared=shared, shared_items=shared_items, devices=devices, script=script,
               callbacks=script_callbacks, sd_model=sd_model, original_refresh=original_refresh, vae_dir=vae_dir)
    script_callbacks.script_unloaded_callback()
    for name in [m for m in sys.modules if m == "modules" or m.startswith(("modules.", "webui_extension"))]:
        del sys.modules[name]
    sys.modules.pop("ldm_standin", None)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_dropdown_lists_every_format_with_unique_names(a1111):
    vd = a1111["sd_vae"].vae_dict
    assert {"mini-ldm.safetensors", "mini-vae", "mini-vae (2)", "as-bin.bin", "full-checkpoint.safetensors"} <= set(vd)
    assert "diffusion_pytorch_model.safetensors" not in vd
    assert all(__import__("os").path.isfile(p) for p in vd.values())
    items = a1111["shared_items"].sd_vae_items()
    assert items[:2] == ["Automatic", "None"] and "mini-vae" in items


def test_selecting_each_entry_strict_loads_ldm_weights(a1111):
    import ldm_standin

    sd_vae, sd_model = a1111["sd_vae"], a1111["sd_model"]
    reference = ldm_standin.first_stage([32, 64, 128, 128], 2)
    reference.load_state_dict(load_file(str(MINI_LDM)))  # diffusers' converter, not ours
    expected = reference.state_dict()
    for name in ("mini-vae", "as-bin.bin", "full-checkpoint.safetensors", "mini-ldm.safetensors", "mini-vae (2)"):
        sd_vae.reload_vae_weights(sd_model, sd_vae.vae_dict[name])
        got = sd_model.first_stage_model.state_dict()
        assert set(got) == set(expected)
        assert all(torch.equal(got[k].float(), expected[k]) for k in expected), name
        assert sd_vae.get_loaded_vae_name() == name
        assert sd_vae.get_loaded_vae_hash()
        assert "diffusion_pytorch_model.safetensors" not in sd_vae.vae_dict
    sd_vae.reload_vae_weights(sd_model, None)  # back to the checkpoint's own VAE


def test_bad_file_in_dropdown_raises_clear_error(a1111):
    bad = a1111["vae_dir"] / "broken.pt"
    bad.write_bytes(b"garbage")
    try:
        a1111["sd_vae"].refresh_vae_list()
        with pytest.raises(vae_core.VaeLoadError, match="broken.pt"):
            a1111["sd_vae"].load_vae_dict(str(bad), "cpu")
    finally:
        bad.unlink()
        a1111["sd_vae"].refresh_vae_list()


def test_other_families_give_a_clear_error_on_selection(a1111, tmp_path):
    """A1111's first stage is SD's kl-f8: a Flux.2 VAE or a TAESD in models/VAE is refused by name, not with
    strict-load noise."""
    from test_family_flux2 import _flux2

    model = _flux2()
    model.save_pretrained(tmp_path / "flux2")
    path = a1111["vae_dir"] / "flux2-ae.safetensors"
    vae_core.save_vae(vae_core.load_vae(tmp_path / "flux2"), path, layout="ldm")
    from diffusers import AutoencoderTiny

    taesd = a1111["vae_dir"] / "taesd.safetensors"
    save_file({k: v.contiguous() for k, v in AutoencoderTiny().state_dict().items()}, str(taesd))
    from test_family_taef2 import DEC_POOL, _pool_tensors
    from test_family_tiny import _original_halves

    taef2 = a1111["vae_dir"] / "taef2_decoder.pth"
    torch.save(_original_halves(AutoencoderTiny(latent_channels=32))[1] | _pool_tensors(DEC_POOL, 2), taef2)
    try:
        a1111["sd_vae"].refresh_vae_list()
        with pytest.raises(vae_core.VaeLoadError, match="taef2_decoder.pth: a tiny autoencoder.*AutoencoderKL"):
            a1111["sd_vae"].load_vae_dict(a1111["sd_vae"].vae_dict["taef2_decoder.pth"], "cpu")
        with pytest.raises(vae_core.VaeLoadError, match="flux2-ae.safetensors: a Flux.2 VAE.*SD-family"):
            a1111["sd_vae"].load_vae_dict(a1111["sd_vae"].vae_dict["flux2-ae.safetensors"], "cpu")
        with pytest.raises(vae_core.VaeLoadError, match="taesd.safetensors: a tiny autoencoder.*AutoencoderKL"):
            a1111["sd_vae"].load_vae_dict(a1111["sd_vae"].vae_dict["taesd.safetensors"], "cpu")
    finally:
        path.unlink()
        taesd.unlink()
        taef2.unlink()
        a1111["sd_vae"].refresh_vae_list()


def test_reload_ui_never_wraps_twice_and_uninstall_restores(a1111):
    sd_vae = a1111["sd_vae"]
    a1111["callbacks"].script_unloaded_callback()  # "Reload UI": unload, then import the scripts again
    assert sd_vae.refresh_vae_list is a1111["original_refresh"]
    _load_script()
    _load_script()
    assert sd_vae._vae_pack_originals["refresh_vae_list"] is a1111["original_refresh"]
    assert getattr(sd_vae.refresh_vae_list, "_vae_pack", False)
    sd_vae.refresh_vae_list()
    assert "mini-vae" in sd_vae.vae_dict
    a1111["callbacks"].script_unloaded_callback()  # A1111 clears callbacks on reload, then imports again
    _load_script()
    assert len(a1111["callbacks"].callbacks["model_loaded"]) == 1
    assert sd_vae._vae_pack_originals["refresh_vae_list"] is a1111["original_refresh"]


def _processing(a1111):
    script_mod = sys.modules["webui_extension.script"]
    return script_mod.VaePackScript(), type("P", (), {"sd_model": a1111["sd_model"], "extra_generation_params": {}})()


def test_tiled_hooks_install_and_restore(a1111, image_512):
    sd_model = a1111["sd_model"]
    fsm = sd_model.first_stage_model
    a1111["sd_vae"].reload_vae_weights(sd_model, a1111["sd_vae"].vae_dict["mini-ldm.safetensors"])
    x = torch.nn.functional.interpolate(image_512, size=(256, 256), mode="area")
    ref_post = sd_model.encode_first_stage(x).parameters
    z = sd_model.encode_first_stage(x).mean * sd_model.scale_factor
    ref = sd_model.decode_first_stage(z)
    script, p = _processing(a1111)
    script.process(p, True, 128, 128, "exact")
    assert "forward" in fsm.encoder.__dict__ and "forward" in fsm.decoder.__dict__
    assert p.extra_generation_params["VAE tiling"] == "exact, enc 128, dec 128"
    tiled_post = sd_model.encode_first_stage(x).parameters  # img2img / hires encode path
    tiled = sd_model.decode_first_stage(z)  # txt2img / hires decode path
    script.postprocess(p, None)
    assert "forward" not in fsm.encoder.__dict__ and "forward" not in fsm.decoder.__dict__
    assert psnr(ref, tiled) >= 50 and (tiled_post - ref_post).abs().max() < 1e-3
    assert torch.equal(sd_model.decode_first_stage(z), ref)  # restored: the original forward again
    script.process(p, False, 128, 128, "exact")  # disabled: nothing installed
    assert "forward" not in fsm.decoder.__dict__


class _InterruptedAfter:
    """A stand-in ``shared.state`` whose ``interrupted`` turns true after ``reads`` reads."""

    def __init__(self, reads: int) -> None:
        self.reads = reads

    @property
    def interrupted(self) -> bool:
        self.reads -= 1
        return self.reads < 0


def test_interrupt_pending_before_a_tiled_call_does_not_cancel_it(a1111, monkeypatch):
    """A1111's Interrupt stops sampling, then still decodes what it has: a tiled decode that starts interrupted runs
    to the end (it raised Cancelled, failing the job, found with the real server); an interrupt that comes during
    the call still stops it."""
    sd_model, shared = a1111["sd_model"], a1111["shared"]
    a1111["sd_vae"].reload_vae_weights(sd_model, a1111["sd_vae"].vae_dict["mini-ldm.safetensors"])
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = sd_model.decode_first_stage(z)
    script, p = _processing(a1111)
    script.process(p, True, 64, 64, "exact")
    try:
        monkeypatch.setattr(shared, "state", types.SimpleNamespace(interrupted=True))
        assert (sd_model.decode_first_stage(z) - ref).abs().max() < 1e-3
        monkeypatch.setattr(shared, "state", _InterruptedAfter(1))  # clear at the start, set at the next check
        with pytest.raises(Cancelled):
            sd_model.decode_first_stage(z)
    finally:
        script.postprocess(p, None)


def test_nan_guard_checks_whole_tensor_and_retries(a1111, caplog):
    sd_model, devices = a1111["sd_model"], a1111["devices"]
    fsm = sd_model.first_stage_model
    a1111["sd_vae"].reload_vae_weights(sd_model, a1111["sd_vae"].vae_dict["mini-ldm.safetensors"])
    devices.dtype_vae = torch.bfloat16
    fsm.to(torch.bfloat16)
    real = fsm.decoder.forward

    def last_pixel_nan(h):
        y = real(h)
        if y.dtype != torch.float32:
            y[-1, -1, -1, -1] = float("nan")  # A1111's own check reads element 0 only and would miss this
        return y

    fsm.decoder.forward = last_pixel_nan
    try:
        a1111["callbacks"].model_loaded_callback(sd_model)  # installs the guard
        with caplog.at_level(logging.WARNING):
            y = sd_model.decode_first_stage(torch.randn(1, 4, 8, 8))
        devices.test_for_nans(y, "vae")
        assert torch.isfinite(y).all() and y.dtype == torch.float32
        assert devices.dtype_vae == torch.float32 and "retrying in float32" in caplog.text
        with pytest.raises(vae_core.VaeError):
            sd_model.decode_first_stage(torch.full((1, 4, 8, 8), float("nan")))
    finally:
        del fsm.decoder.forward
        devices.dtype_vae = torch.float32
        fsm.to(torch.float32)


def test_fp16_fix_applied_on_model_load(a1111, tmp_path):
    from vae_core.families.kl.fp16_fix import rescale_stream, stream_segments

    sd_vae, sd_model, devices = a1111["sd_vae"], a1111["sd_model"], a1111["devices"]
    big = vae_core.load_vae(MINI_LDM)
    enc, dec = stream_segments(big.model)
    rescale_stream(enc, big.model.encoder.norm_out, [256.0] * len(enc))
    rescale_stream(dec, big.model.decoder.norm_out, [256.0] * len(dec))
    vae_core.save_vae(big, a1111["vae_dir"] / "overflowing.safetensors", dtype="fp32")
    sd_vae.refresh_vae_list()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    ref_model = vae_core.load_vae(MINI_LDM)
    ref = ref_model.decode(ref_model.encode(x))
    devices.dtype_vae = torch.float16
    try:
        sd_vae.reload_vae_weights(sd_model, sd_vae.vae_dict["overflowing.safetensors"])
        fsm = sd_model.first_stage_model
        hooks = sys.modules["webui_extension.hooks"]
        assert next(fsm.parameters()).dtype == torch.float16 and hooks.is_fixed(fsm)
        assert len({m.eps for m in fsm.modules() if isinstance(m, torch.nn.GroupNorm)}) > 1  # eps rescaled too
        with torch.no_grad():
            y = fsm.decode(fsm.encode(x.half()).mean)
        assert y.dtype == torch.float16 and torch.isfinite(y).all()
        assert (y.float() - ref).abs().max() < 0.05
        weights = {k: v.clone() for k, v in fsm.state_dict().items()}
        a1111["callbacks"].model_loaded_callback(sd_model)  # same weights: not rescaled twice
        assert all(torch.equal(v, weights[k]) for k, v in fsm.state_dict().items()) and hooks.is_fixed(fsm)
    finally:
        devices.dtype_vae = torch.float32
        sd_vae.reload_vae_weights(sd_model, None)
        sd_model.first_stage_model.to(torch.float32)
        (a1111["vae_dir"] / "overflowing.safetensors").unlink()



def test_install_py_quiet_outside_a1111_and_uses_its_pip_inside(tmp_path):
    import subprocess

    quiet = subprocess.run([sys.executable, str(ROOT / "install.py")], cwd=tmp_path, capture_output=True, text=True)
    assert quiet.returncode == 0 and quiet.stdout == quiet.stderr == ""
    (tmp_path / "launch.py").write_text(
        "calls = []\n"
        "def is_installed(name):\n    return name != 'safetensors'\n"
        "def run_pip(command, desc):\n    print('PIP', command)\n")
    inside = subprocess.run([sys.executable, str(ROOT / "install.py")], cwd=tmp_path, capture_output=True, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout.strip() == "PIP install safetensors>=0.4"  # only the missing one, never torch


def test_fp16_fix_reapplied_after_a_reload_of_the_same_weights(a1111):
    """A VAE inflated everywhere but its first segment keeps conv_in at factor 1 under the fix, so a conv_in checksum
    took the reloaded, un-fixed weights for fixed ones: the second fix was skipped and fp16 went non-finite. The
    fingerprint covers every tensor."""
    from vae_core.families.kl.fp16_fix import rescale_stream, stream_segments

    sd_vae, sd_model, devices = a1111["sd_vae"], a1111["sd_model"], a1111["devices"]
    hooks = sys.modules["webui_extension.hooks"]
    big = vae_core.load_vae(MINI_LDM)
    enc, dec = stream_segments(big.model)
    rescale_stream(enc, big.model.encoder.norm_out, [1.0] + [256.0] * (len(enc) - 1))
    rescale_stream(dec, big.model.decoder.norm_out, [1.0] + [256.0] * (len(dec) - 1))
    path = a1111["vae_dir"] / "inflated-but-first.safetensors"
    vae_core.save_vae(big, path, dtype="fp32")
    sd_vae.refresh_vae_list()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref_model = vae_core.load_vae(MINI_LDM)
    ref = ref_model.decode(ref_model.encode(x))
    devices.dtype_vae = torch.float16
    try:
        sd_vae.reload_vae_weights(sd_model, sd_vae.vae_dict[path.name])
        fsm = sd_model.first_stage_model
        assert hooks.is_fixed(fsm)
        sd_vae._load_vae_dict(sd_model, sd_vae.load_vae_dict(str(path), None))  # A1111 reloading the same file
        assert not hooks.is_fixed(fsm)
        a1111["callbacks"].model_loaded_callback(sd_model)
        assert hooks.is_fixed(fsm)
        hooks.remove_guard(fsm)  # the raw fp16 output, without the NaN guard's fallback
        with torch.no_grad():
            y = fsm.decode(fsm.encode(x.half()).mean)
        assert y.dtype == torch.float16 and torch.isfinite(y).all() and (y.float() - ref).abs().max() < 0.05
    finally:
        devices.dtype_vae = torch.float32
        sd_vae.reload_vae_weights(sd_model, None)
        sd_model.first_stage_model.to(torch.float32)
        path.unlink()


def test_a_failed_job_leaves_no_tiled_hook_behind(a1111):
    """A1111 skips postprocess when a job raises, and process() returned early when tiling was off, so the next
    untiled job ran tiled. Now every job starts by restoring, and closing a job (A1111 does it in a finally)
    restores too."""
    sd_model = a1111["sd_model"]
    fsm = sd_model.first_stage_model
    script, p = _processing(a1111)
    closed = []
    p.close = lambda: closed.append(True)
    script.process(p, True, 128, 128, "exact")
    assert "forward" in fsm.decoder.__dict__
    # the job fails here: no postprocess
    p.close()  # what `with closing(p)` does on the way out
    assert "forward" not in fsm.decoder.__dict__ and closed == [True]
    p.close()  # the job's own close is back, unwrapped
    assert closed == [True, True]
    script.process(p, True, 128, 128, "exact")  # failed again, and A1111 did not even close it
    _, nxt = _processing(a1111)
    script.before_process(nxt)
    assert "forward" not in fsm.decoder.__dict__ and "forward" not in fsm.encoder.__dict__
    script.process(nxt, True, 128, 128, "fast")
    script.process(nxt, False, 128, 128, "exact")  # tiling off: nothing left installed either
    assert "forward" not in fsm.decoder.__dict__


def test_a1111_guard_retries_from_the_loaded_weights(a1111, monkeypatch):
    """fp16 → bf16 → fp32 on A1111's first stage: the fp32 retry runs the loaded fp16 weights, not bf16-rounded ones
    (bf16 simulated as native)."""
    monkeypatch.setattr("vae_core.precision.dtypes.bf16_supported", lambda device: True)
    sd_model, devices = a1111["sd_model"], a1111["devices"]
    fsm = sd_model.first_stage_model
    a1111["sd_vae"].reload_vae_weights(sd_model, a1111["sd_vae"].vae_dict["mini-ldm.safetensors"])
    hooks = sys.modules["webui_extension.hooks"]
    hooks.remove_guard(fsm)
    devices.dtype_vae = torch.float16
    fsm.to(torch.float16)
    loaded = {k: v.clone() for k, v in fsm.state_dict().items()}
    real = fsm.decoder.forward
    seen = []

    def nan_below_fp32(h):
        seen.append({k: v.clone() for k, v in fsm.state_dict().items()})
        y = real(h)
        if y.dtype != torch.float32:
            y[-1, -1, -1, -1] = float("nan")
        return y

    fsm.decoder.forward = nan_below_fp32
    try:
        hooks.install_guard(fsm, lambda d: setattr(devices, "dtype_vae", d))
        y = sd_model.decode_first_stage(torch.randn(1, 4, 8, 8))
        assert torch.isfinite(y).all() and len(seen) == 3
        assert all(torch.equal(seen[2][k], v.float()) for k, v in loaded.items())
    finally:
        del fsm.decoder.forward
        hooks.remove_guard(fsm)
        devices.dtype_vae = torch.float32
        fsm.to(torch.float32)
