"""fp16 fix on a VAE made to overflow, precision policy, and the whole-tensor NaN guard."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import vae_core
from vae_core.errors import NonFiniteOutputError, VaeInputError
from conftest import MINI_LDM
from vae_core.families.kl.fp16_fix import rescale_stream, stream_segments
from vae_core.precision.calibrate import calibration_image, measure_peaks
from vae_core.precision.dtypes import resolve_dtype

FP16_MAX = 65504.0


def _inflate(vae: vae_core.Vae, factor: float = 256.0) -> vae_core.Vae:
    """Scale the trained fixture's residual stream up: same outputs, activations past fp16's range."""
    big = vae.clone()
    enc, dec = stream_segments(big.model)
    rescale_stream(enc, big.model.encoder.norm_out, [factor] * len(enc))
    rescale_stream(dec, big.model.decoder.norm_out, [factor] * len(dec))
    return big


@pytest.fixture(scope="module")
def overflowing(mini_vae):
    return _inflate(mini_vae)


@pytest.fixture(scope="module")
def photo(image_512):
    return torch.nn.functional.interpolate(image_512, size=(64, 64), mode="area")


def _ref(vae, x):
    with torch.no_grad():
        return vae.model.decode(vae.model.encode(x))


def test_inflated_model_really_overflows_fp16(mini_vae, overflowing, photo):
    assert (_ref(overflowing, photo) - _ref(mini_vae, photo)).abs().max() <= 1e-4
    assert max(measure_peaks(overflowing.model, photo).values()) > FP16_MAX
    half = overflowing.clone().to(dtype=torch.float16)
    with torch.no_grad():
        y = half.model.decode(half.model.encode(photo.half()))
    assert not torch.isfinite(y).all()


def test_fix_keeps_outputs_and_shrinks_every_module_output(mini_vae, overflowing, photo):
    fixed = vae_core.make_fp16_safe(overflowing)
    ref = _ref(mini_vae, photo)
    assert (_ref(fixed, photo) - ref).abs().max() <= 1e-4 * float(ref.max() - ref.min())
    info = fixed.info.fp16_fix
    assert info["peak_before"] > FP16_MAX and info["peak_after"] <= 4096
    for x in (photo, calibration_image(64)):
        peaks = measure_peaks(fixed.model, x)
        assert max(peaks.values()) <= 4096, max(peaks.values())
    assert overflowing.info.fp16_fix is None  # the input VAE is left untouched


def test_fixed_model_runs_in_real_fp16(mini_vae, overflowing, photo):
    fixed = vae_core.make_fp16_safe(overflowing).to(dtype=torch.float16)
    out = {}

    def hook(mod: nn.Module, _i: object, o: object) -> None:
        if isinstance(o, torch.Tensor):
            out[mod] = max(out.get(mod, 0.0), float(o.float().abs().amax()))

    handles = [m.register_forward_hook(hook) for m in fixed.model.modules()]
    with torch.no_grad():
        y = fixed.model.decode(fixed.model.encode(photo.half()))
    for h in handles:
        h.remove()
    assert torch.isfinite(y).all() and max(out.values()) <= 4096
    assert (y.float() - _ref(mini_vae, photo)).abs().max() < 0.05  # fp16 rounding only


def test_guard_retries_once_and_remembers(overflowing, photo, caplog):
    half = overflowing.clone().to(dtype=torch.float16)
    with caplog.at_level(logging.WARNING, logger="vae_core.precision"):
        z = half.encode(photo)
        y = half.decode(z)
    assert torch.isfinite(z).all() and torch.isfinite(y).all()
    assert caplog.text.count("produced NaN/inf") == 1
    assert half.guard.working_dtype == torch.float32 and half.dtype == torch.float32
    calls = []
    real = half.model.decode

    def counting(t):
        calls.append(t.dtype)
        return real(t)

    half.model.decode = counting
    half.decode(z)
    assert calls == [torch.float32]  # remembered: no fp16 attempt, no retry


def _last_element_nan(vae: vae_core.Vae, calls: list, only_below_fp32: bool) -> None:
    real = vae.model.decode

    def decode(t):
        calls.append(t.dtype)
        y = real(t)
        if t.dtype != torch.float32 or not only_below_fp32:
            y[-1, -1, -1, -1] = float("nan")  # the LAST element: a first-element check would miss it
        return y
    vae.model.decode = decode


def test_guard_checks_every_element_and_retries_exactly_once(mini_vae, caplog):
    vae = mini_vae.clone().to(dtype=torch.bfloat16)
    calls: list = []
    _last_element_nan(vae, calls, only_below_fp32=True)
    with caplog.at_level(logging.WARNING, logger="vae_core.precision"):
        y = vae.decode(torch.randn(2, 4, 8, 8))
    assert torch.isfinite(y).all()
    assert calls == [torch.bfloat16, torch.float32]  # bf16 is not native on CPU, so one retry, in fp32
    assert caplog.text.count("produced NaN/inf in bfloat16") == 1


def test_guard_raises_when_fp32_fails_too(mini_vae):
    vae = mini_vae.clone()
    calls: list = []
    _last_element_nan(vae, calls, only_below_fp32=False)
    with pytest.raises(NonFiniteOutputError, match="input is the cause"):
        vae.decode(torch.randn(1, 4, 8, 8))
    assert calls == [torch.float32]


def test_nan_input_raises(mini_vae):
    z = torch.randn(1, 4, 8, 8)
    z[0, 0, 3, 3] = float("nan")
    with pytest.raises(VaeInputError, match="NaN"):
        mini_vae.decode(z)
    with pytest.raises(VaeInputError, match="NaN"):
        mini_vae.encode(torch.full((1, 3, 16, 16), float("inf")))


def test_fp32_non_finite_names_the_input(mini_vae):
    z = torch.full((1, 4, 8, 8), 3e38)
    with pytest.raises(NonFiniteOutputError, match="input"):
        mini_vae.decode(z)


def test_policy():
    assert resolve_dtype("auto", torch.device("cpu")) == (torch.float32, False)
    assert resolve_dtype(torch.float16, torch.device("cpu")) == (torch.float16, False)
    assert resolve_dtype("bf16", torch.device("cpu")) == (torch.bfloat16, False)
    vae = vae_core.load_vae(MINI_LDM, dtype="fp16")
    assert vae.dtype == torch.float16 and vae.to(dtype="auto").dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        resolve_dtype("fp8", torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp16_with_fix(mini_vae, overflowing, photo):
    fixed = vae_core.make_fp16_safe(overflowing).to("cuda", torch.float16)
    y = fixed.decode(fixed.encode(photo.cuda()))
    assert fixed.guard.working_dtype is None and torch.isfinite(y).all()
    assert (y.cpu() - _ref(mini_vae, photo)).abs().max() < 0.05


def test_loading_and_fix_leave_the_callers_rng_alone():
    """Hosts seed their samplers; neither load_vae nor make_fp16_safe may consume the global RNG."""
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    vae_core.make_fp16_safe(vae_core.load_vae(MINI_LDM))
    assert torch.equal(torch.rand(3), expected)
