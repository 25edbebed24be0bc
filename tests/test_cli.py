"""`python -m vae_core`: inspect every fixture format, convert, encode/decode, roundtrip, activations, bench."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import MINI_DIFFUSERS, MINI_LDM, ROOT, SAMPLE


def run(*args: str, ok: bool = True) -> str:
    proc = subprocess.run([sys.executable, "-m", "vae_core", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("formats")
    ldm = load_file(str(MINI_LDM))
    torch.save({"state_dict": ldm}, tmp / "wrapped.ckpt")
    save_file({f"first_stage_model.{k}": v for k, v in ldm.items()}, str(tmp / "checkpoint.safetensors"))
    return {"diffusers folder": MINI_DIFFUSERS, "ldm safetensors": MINI_LDM, "wrapped ckpt": tmp / "wrapped.ckpt",
            "full checkpoint": tmp / "checkpoint.safetensors",
            "diffusers file": MINI_DIFFUSERS / "diffusion_pytorch_model.safetensors"}


def test_inspect_every_fixture_format(formats):
    expect = {"diffusers folder": ("diffusers-folder", "diffusers"), "ldm safetensors": ("safetensors", "ldm"),
              "wrapped ckpt": ("pickle", "ldm"), "full checkpoint": ("safetensors", "ldm"),
              "diffusers file": ("safetensors", "diffusers")}
    for name, path in formats.items():
        out = run("inspect", path)
        container, layout = expect[name]
        assert re.search(rf"container\s+{container}", out), (name, out)
        assert re.search(rf"layout\s+{layout}", out), (name, out)
        assert "5,252,487" in out and "latent channels 4" in out and "scaling factor  0.18215" in out
    assert "first_stage_model." in run("inspect", formats["full checkpoint"])
    assert '"family": "sd1"' in run("inspect", MINI_LDM, "--json")


def test_inspect_bad_file_is_a_clean_error(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"")
    out = run("inspect", tmp_path / "x.safetensors", ok=False)
    assert "error:" in out and "empty" in out and "Traceback" not in out


def test_activations_report():
    out = run("inspect", MINI_LDM, "--activations")
    before = float(re.search(r"before the fp16 fix: ([\d.e+]+)", out).group(1))
    after = float(re.search(r"after the fp16 fix:\s+([\d.e+]+)", out).group(1))
    assert before > after and after <= 4096


def test_convert_encode_decode_roundtrip(tmp_path):
    run("convert", MINI_LDM, tmp_path / "d", "--layout", "diffusers", "--dtype", "fp32")
    assert (tmp_path / "d" / "config.json").is_file()
    run("convert", tmp_path / "d", tmp_path / "back.safetensors", "--layout", "ldm", "--dtype", "fp16")
    back, orig = load_file(str(tmp_path / "back.safetensors")), load_file(str(MINI_LDM))
    assert set(back) == set(orig) and all(torch.equal(back[k], orig[k]) for k in orig)
    run("encode", SAMPLE, "-o", tmp_path / "z.safetensors", "--vae", tmp_path / "d", "--tile", "256")
    z = load_file(str(tmp_path / "z.safetensors"))["latent"]
    assert z.shape == (1, 4, 64, 64)
    out = run("decode", tmp_path / "z.safetensors", "-o", tmp_path / "y.png")
    assert "bundled test VAE" in out and (tmp_path / "y.png").is_file()
    out = run("roundtrip", "-o", tmp_path / "rt.png")  # the first command: a real published VAE (TAEF2), said so
    assert "bundled sample photo" in out and "bundled TAEF2" in out and "VAE: taef2" in out
    assert 30.0 < float(re.search(r"PSNR ([\d.]+) dB", out).group(1)) < 32.5  # 31.07 dB measured
    out = run("roundtrip", "--vae", MINI_LDM, "-o", tmp_path / "rt2.png")  # the kl-f8 test VAE: soft, 16.8 dB
    assert 15.0 < float(re.search(r"PSNR ([\d.]+) dB", out).group(1)) < 25.0


def test_bench_prints_table():
    out = run("bench", "--vae", MINI_LDM, "--size", "128", "--tile", "64", "--op", "decode", "encode", "--runs", "2")
    rows = [line for line in out.splitlines() if line.startswith("| decode") or line.startswith("| encode")]
    names = {r.split("|")[3].strip() for r in rows}
    assert {"untiled", "vae_core exact", "vae_core fast", "diffusers untiled", "diffusers tiled"} <= names
    exact = [r for r in rows if "vae_core exact" in r]
    assert all(float(re.search(r"([\d.]+) dB", r).group(1)) >= 50 for r in exact), exact
    peer = [r for r in rows if "diffusers untiled" in r]  # the same weights in diffusers' network: float rounding
    assert all(float(re.search(r"([\d.]+) dB", r).group(1)) >= 100 for r in peer), peer
    sweeps = {r.split("|")[1].strip(): int(r.split("|")[9]) for r in exact}
    assert sweeps == {"decode": 22, "encode": 15}, sweeps  # one call's sweeps, not the sum over the runs
