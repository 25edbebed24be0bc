"""Bad input gets a VaeLoadError naming the path, what was found and what was expected; nothing is executed."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import vae_core
from vae_core import VaeLoadError
from conftest import MINI_LDM, ROOT


@pytest.fixture(scope="module")
def ldm_sd():
    return load_file(str(MINI_LDM))


class _Payload:
    """Unpickling this object would create a marker file (it never must)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _expect(path, *needles):
    with pytest.raises(VaeLoadError) as err:
        vae_core.load_vae(path)
    msg = str(err.value)
    assert str(path) in msg and "expected" in msg, msg
    for n in needles:
        assert n in msg, msg
    assert isinstance(err.value, ValueError)
    return msg


def test_missing_and_empty(tmp_path):
    _expect(tmp_path / "nope.safetensors", "no such file")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    _expect(tmp_path / "empty.safetensors", "empty")


def test_truncated_files(tmp_path, ldm_sd):
    data = MINI_LDM.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    _expect(tmp_path / "cut.safetensors")
    torch.save(ldm_sd, tmp_path / "full.ckpt")
    raw = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(raw[: len(raw) // 2])
    _expect(tmp_path / "cut.ckpt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    _expect(tmp_path / "junk.pt", "unrecognised")


@pytest.mark.parametrize("protocol", [2, 4])
def test_pickle_with_code_is_refused_and_never_runs(tmp_path, protocol):
    marker = tmp_path / "PWNED"
    evil = tmp_path / f"evil{protocol}.ckpt"
    with open(evil, "wb") as fh:
        pickle.dump({"state_dict": {"x": _Payload(str(marker))}}, fh, protocol=protocol)
    _expect(evil, "refused")
    torch.save({"decoder.conv_in.weight": _Payload(str(marker))}, tmp_path / "evil.pt")
    _expect(tmp_path / "evil.pt", "refused")
    assert not marker.exists()


def test_folders(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "readme.txt").write_text("hi")
    _expect(tmp_path / "d", "without diffusers VAE weights")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text("{not json")
    save_file({"a": torch.zeros(1)}, str(tmp_path / "c" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(VaeLoadError, match="invalid JSON"):
        vae_core.load_vae(tmp_path / "c")


def test_files_without_a_vae(tmp_path, ldm_sd):
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)},
              str(tmp_path / "unet.safetensors"))
    _expect(tmp_path / "unet.safetensors", "UNet")
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(4)},
              str(tmp_path / "clip.safetensors"))
    _expect(tmp_path / "clip.safetensors", "text-encoder")
    full = {"model.diffusion_model.out.2.weight": torch.zeros(4, 4, 3, 3),
            **{f"first_stage_model.{k}": v for k, v in ldm_sd.items() if k.startswith("decoder.")}}
    save_file(full, str(tmp_path / "ckpt-without-encoder.safetensors"))
    _expect(tmp_path / "ckpt-without-encoder.safetensors", "only part of a VAE")


def test_key_and_shape_problems(tmp_path, ldm_sd):
    extra = dict(ldm_sd, **{"decoder.extra.weight": torch.zeros(3)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    _expect(tmp_path / "extra.safetensors", "unexpected keys", "decoder.extra.weight")
    missing = {k: v for k, v in ldm_sd.items() if k != "decoder.up.1.block.0.norm2.bias"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    _expect(tmp_path / "missing.safetensors", "missing keys", "decoder.up.1.block.0.norm2.bias")
    bad = dict(ldm_sd)
    bad["decoder.mid.block_1.conv1.weight"] = torch.zeros(128, 128, 1, 1, dtype=torch.float16)
    save_file(bad, str(tmp_path / "shape.safetensors"))
    _expect(tmp_path / "shape.safetensors", "shape mismatch", "decoder.mid.block_1.conv1.weight")
    odd = dict(ldm_sd)
    odd["encoder.conv_out.weight"] = torch.zeros(6, 128, 3, 3, dtype=torch.float16)
    save_file(odd, str(tmp_path / "odd.safetensors"))
    _expect(tmp_path / "odd.safetensors", "encoder.conv_out")


def test_failed_load_writes_nothing(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(VaeLoadError):
        vae_core.load_vae(tmp_path / "bad.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_core_imports_no_host():
    code = ("import sys, pkgutil, importlib, vae_core;"  # every module of the package, the CLI and the lab included
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(vae_core.__path__, 'vae_core.')"
            " if not m.name.endswith('__main__')];"
            "bad=[m for m in ('comfy','folder_paths','modules','gradio','nodes','launch') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_root_package_is_inert_outside_comfyui():
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('pack', 'ROOT/__init__.py',"
            " submodule_search_locations=['ROOT']); m = importlib.util.module_from_spec(spec);"
            " sys.modules['pack'] = m; spec.loader.exec_module(m);"
            " print(sorted(getattr(m, 'NODE_CLASS_MAPPINGS', {}))); sys.exit(1 if 'comfy' in sys.modules else 0)"
            ).replace("ROOT", str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
