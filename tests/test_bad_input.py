"""Classes of bad input that got through or crashed (hostile sweep): out-of-range factors and configs, arguments
validated on some paths only, untyped errors on output paths, and legitimate files refused (fp8 weights, a legacy
protocol-0 pickle with a misleading message). Each is a typed error naming the value, before any work."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import vae_core
from vae_core.cli.main import main
from conftest import MINI_DIFFUSERS, MINI_LDM


def _folder(tmp_path, **config):
    folder = tmp_path / "vae"
    shutil.copytree(MINI_DIFFUSERS, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(config)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("bad", [1e300, 1e-300, 1e5, 1e-5])
def test_scaling_factors_that_make_latents_non_finite_are_refused(tmp_path, bad):
    with pytest.raises(vae_core.VaeLoadError, match=re.escape(f"scaling_factor {bad!r} from config.json") +
                       ".*from 0.0001 to 10000"):
        vae_core.load_vae(_folder(tmp_path, scaling_factor=bad))
    with pytest.raises(vae_core.VaeInputError, match="scaling_factor"):
        vae_core.load_vae(MINI_LDM, scaling_factor=bad)
    with pytest.raises(vae_core.VaeInputError, match="shift_factor"):
        vae_core.load_vae(MINI_LDM, shift_factor=-bad if bad > 1 else 1e6)


@pytest.mark.parametrize("groups", [4096, 0, -2, "32", 3.5, True])
def test_config_group_count_out_of_range_is_named(tmp_path, groups):
    with pytest.raises(vae_core.VaeLoadError, match=r"norm_num_groups .*expected an integer from 1 to 256"):
        vae_core.load_vae(_folder(tmp_path, norm_num_groups=groups))


def test_config_values_beyond_any_real_vae_are_named():
    from vae_core.families.kl.convert import infer_config

    sd = {k: torch.empty(v.shape, device="meta") for k, v in load_file(str(MINI_LDM)).items()}
    assert infer_config(sd).ch == 32
    wide = dict(sd)  # a decoder 128× wider, 16384 at its widest (meta: shapes only, nothing allocated)
    wide["decoder.conv_in.weight"] = torch.empty(16384, 4, 3, 3, device="meta")
    with pytest.raises(vae_core.VaeLoadError, match="channel width 16384.*at most 8192"):
        infer_config(wide, "wide.safetensors")
    many = dict(sd, **{"decoder.conv_in.weight": torch.empty(128, 2048, 3, 3, device="meta"),
                       "encoder.conv_out.weight": torch.empty(4096, 128, 3, 3, device="meta"),
                       "quant_conv.weight": torch.empty(4096, 4096, 1, 1, device="meta"),
                       "post_quant_conv.weight": torch.empty(2048, 2048, 1, 1, device="meta")})
    with pytest.raises(vae_core.VaeLoadError, match="latent channels 2048.*at most 1024"):
        infer_config(many, "many.safetensors")


def test_per_channel_statistics_out_of_range_are_named(tmp_path):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1).save_pretrained(tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["latents_std"] = [1.0] * 15 + [1e-30]
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(vae_core.VaeLoadError, match=r"latents_std\[15\] 1e-30 from config.json"):
        vae_core.load_vae(tmp_path / "q")


def test_flux2_batchnorm_statistics_out_of_range_are_named(tmp_path):
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    m = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                           block_out_channels=(32, 32), layers_per_block=1, latent_channels=32, norm_num_groups=32)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    sd["bn.running_var"][5] = 1e30
    save_file(sd, str(tmp_path / "f2.safetensors"))
    with pytest.raises(vae_core.VaeLoadError, match=r"bn.running_var\[5\] = 1e\+30"):
        vae_core.load_vae(tmp_path / "f2.safetensors")


def test_taesd_scaling_in_the_file_is_checked(tmp_path):
    from diffusers import AutoencoderTiny
    from diffusers_host import taesd_keys

    torch.manual_seed(0)
    sd = taesd_keys(AutoencoderTiny(latent_channels=4).state_dict())
    save_file(dict(sd, vae_scale=torch.tensor(1e20), vae_shift=torch.tensor(0.0)), str(tmp_path / "t.safetensors"))
    with pytest.raises(vae_core.VaeLoadError, match=r"vae_scale 1\.0*\d*e\+20 from the file"):
        vae_core.load_vae(tmp_path / "t.safetensors")
    save_file(dict(sd, vae_scale=torch.ones(3), vae_shift=torch.tensor(0.0)), str(tmp_path / "t3.safetensors"))
    with pytest.raises(vae_core.VaeLoadError, match=r"vae_scale of shape \(3,\)"):
        vae_core.load_vae(tmp_path / "t3.safetensors")


def test_mode_is_checked_untiled_too(mini_vae):
    z = torch.randn(1, 4, 8, 8)
    with pytest.raises(vae_core.VaeInputError, match="mode='bogus'"):
        mini_vae.decode(z, mode="bogus")  # untiled: it used to be accepted silently
    with pytest.raises(vae_core.VaeInputError, match="mode='bogus'"):
        mini_vae.encode(torch.zeros(1, 3, 16, 16), tile="auto", mode="bogus")


@pytest.mark.parametrize("sample,match", [
    (torch.full((1, 3, 64, 64), float("nan")), "NaN"),
    (torch.zeros(3, 64, 64), r"shape \(3, 64, 64\)"),
    (torch.zeros(1, 4, 64, 64), r"shape \(1, 4, 64, 64\)"),
    (torch.full((1, 3, 64, 64), 200.0), r"values in \[200, 200\]"),
    ("image.png", "expected a torch.Tensor"),
])
def test_fp16_fix_calibration_sample_is_checked(mini_vae, sample, match):
    with pytest.raises(vae_core.VaeInputError, match=match):
        vae_core.make_fp16_safe(mini_vae, sample)


def test_save_vae_onto_a_folder_or_a_file_of_the_wrong_kind(tmp_path, mini_vae):
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(vae_core.VaeInputError, match="dir.safetensors: is a folder"):
        vae_core.save_vae(mini_vae, tmp_path / "dir.safetensors")  # was IsADirectoryError
    (tmp_path / "afile").write_bytes(b"x")
    with pytest.raises(vae_core.VaeInputError, match="afile: is an existing file; expected a folder"):
        vae_core.save_vae(mini_vae, tmp_path / "afile", layout="diffusers")
    assert (tmp_path / "afile").read_bytes() == b"x"


def test_disk_full_during_safetensors_serialisation_is_one_error_line(tmp_path, capsys, monkeypatch):
    """safetensors reports ENOSPC as its own SafetensorError (not an OSError): convert printed a traceback."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code = main(["convert", str(MINI_LDM), str(tmp_path / "out.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {tmp_path / 'out.safetensors'}")
    assert "No space left on device (ENOSPC); expected enough free disk space" in err
    assert list(tmp_path.iterdir()) == []  # no half file, no temp file


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3fn", "e5m2"])
def test_fp8_weight_files_load_upcast_and_say_so(tmp_path, dtype):
    sd = load_file(str(MINI_LDM))
    save_file({k: v.to(dtype) for k, v in sd.items()}, str(tmp_path / "fp8.safetensors"))
    vae = vae_core.load_vae(tmp_path / "fp8.safetensors")  # isfinite has no float8 kernel: it crashed
    name = str(dtype).replace("torch.", "")
    assert vae.info.stored_dtype == name and name in vae.info.sources["dtype"]
    expected = vae_core.vae_from_state_dict({k: v.to(dtype).float() for k, v in sd.items()})
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(vae.decode(z), expected.decode(z))
    bad = {k: v.to(dtype) for k, v in sd.items()}
    bad["decoder.conv_in.weight"].view(-1)[0] = float("nan")
    save_file(bad, str(tmp_path / "nan8.safetensors"))
    with pytest.raises(vae_core.VaeLoadError, match="NaN/inf values.*decoder.conv_in.weight"):
        vae_core.load_vae(tmp_path / "nan8.safetensors")


@pytest.mark.parametrize("protocol", [0, 1])
def test_legacy_protocol_0_and_1_pickles_are_named_for_what_they_are(tmp_path, protocol):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": load_file(str(MINI_LDM))}, path, _use_new_zipfile_serialization=False,
               pickle_protocol=protocol)
    with pytest.raises(vae_core.VaeLoadError, match="legacy torch checkpoint pickled with protocol 0 or 1") as err:
        vae_core.load_vae(path)
    assert "unrecognised leading bytes" not in str(err.value) and "nothing in it was run" in str(err.value)
