"""Hostile and careless input to the loader/saver: typed errors, bounded work, atomic writes, nothing lost.

Every crafted file is built here in tmp_path; nothing binary is committed.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vae_core
from vae_core import VaeInputError
from vae_core import VaeLoadError
from vae_core.io.atomic import atomic_write, same_file
from vae_core.families.kl.convert import diffusers_to_ldm, ldm_to_diffusers
from vae_core.io.formats import MAX_JSON_BYTES
from conftest import MINI_DIFFUSERS, MINI_LDM, ROOT, diffusers_vae


@pytest.fixture(scope="module")
def ldm_sd() -> dict[str, torch.Tensor]:
    return load_file(str(MINI_LDM))


def _expect(path, *needles, **kw) -> str:
    with pytest.raises(VaeLoadError) as err:
        vae_core.load_vae(path, **kw)
    msg = str(err.value)
    assert str(path) in msg and "expected" in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _state(vae: vae_core.Vae) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in vae.model.state_dict().items()}


def _same_weights(a: vae_core.Vae, b: vae_core.Vae) -> bool:
    sa, sb = _state(a), _state(b)
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def umask077():
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


# -- 1. atomic writes -------------------------------------------------------------------------------------------

def test_atomic_write_failure_leaves_original_and_no_temp(tmp_path):
    target = tmp_path / "weights.safetensors"
    target.write_bytes(b"original")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert _listing(tmp_path) == {"weights.safetensors": b"original"}


def test_atomic_write_keeps_mode_and_new_files_get_umask_default(tmp_path, umask077):
    old = tmp_path / "old.json"
    old.write_text("x")
    os.chmod(old, 0o644)
    atomic_write(old, lambda tmp: tmp.write_text("new"))
    assert old.read_text() == "new" and stat.S_IMODE(old.stat().st_mode) == 0o644  # umask would give 0600
    os.umask(0o022)
    new = atomic_write(tmp_path / "new.json", lambda tmp: tmp.write_text("n"))
    assert stat.S_IMODE(new.stat().st_mode) == 0o644  # the umask default, not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.json", "old.json"]


def test_same_file_through_links(tmp_path):
    a = tmp_path / "a.safetensors"
    a.write_bytes(b"x")
    (tmp_path / "sym.safetensors").symlink_to(a)
    os.link(a, tmp_path / "hard.safetensors")
    assert same_file(a, tmp_path / "sym.safetensors") and same_file(a, tmp_path / "hard.safetensors")
    assert same_file(tmp_path / "sub" / ".." / "a.safetensors", a)  # resolved when one side does not exist
    assert not same_file(a, tmp_path / "b.safetensors")


def test_save_vae_failure_keeps_the_old_file(tmp_path, monkeypatch, mini_vae):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous good file")
    import safetensors.torch as st

    def broken(sd, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(st, "save_file", broken)
    with pytest.raises(RuntimeError, match="mid-write"):
        vae_core.save_vae(mini_vae, target)
    assert _listing(tmp_path) == {"out.safetensors": b"previous good file"}


def test_save_vae_keeps_mode_of_replaced_files(tmp_path, mini_vae, umask077):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old")
    os.chmod(target, 0o644)
    vae_core.save_vae(mini_vae, target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert _same_weights(vae_core.load_vae(target), mini_vae)
    folder = tmp_path / "folder"
    vae_core.save_vae(mini_vae, folder, layout="diffusers")
    os.chmod(folder / "config.json", 0o644)
    vae_core.save_vae(mini_vae, folder, layout="diffusers")
    assert stat.S_IMODE((folder / "config.json").stat().st_mode) == 0o644
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]


# -- 2. stale shards / variants in the target folder ------------------------------------------------------------

def test_save_into_sharded_folder_loads_the_new_weights(tmp_path, mini_vae):
    folder = tmp_path / "target"
    folder.mkdir()
    (folder / "config.json").write_text((MINI_DIFFUSERS / "config.json").read_text())
    old = {k: v * 0.5 for k, v in load_file(str(MINI_DIFFUSERS / "diffusion_pytorch_model.safetensors")).items()}
    keys = sorted(old)
    parts = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
             "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in parts.items():
        save_file({k: old[k] for k in part}, str(folder / name))
    index = {"weight_map": {k: name for name, part in parts.items() for k in part}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    torch.save(old, folder / "diffusion_pytorch_model.bin")
    (folder / "notes.txt").write_text("mine")
    stale = vae_core.load_vae(folder)
    assert not _same_weights(stale, mini_vae)

    vae_core.save_vae(mini_vae, folder, layout="diffusers")
    assert _same_weights(vae_core.load_vae(folder), mini_vae)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors", "notes.txt"]


# -- 3. never overwrite the input -------------------------------------------------------------------------------

def test_save_refuses_its_own_input(tmp_path):
    src = tmp_path / "vae.safetensors"
    shutil.copy(MINI_LDM, src)
    (tmp_path / "link.safetensors").symlink_to(src)
    os.link(src, tmp_path / "hard.safetensors")
    before = src.read_bytes()
    vae = vae_core.load_vae(src)
    for target in (src, tmp_path / "link.safetensors", tmp_path / "hard.safetensors"):
        with pytest.raises(VaeInputError, match="loaded from") as err:
            vae_core.save_vae(vae, target, dtype="fp16")
        assert str(target) in str(err.value) and isinstance(err.value, ValueError)
    assert src.read_bytes() == before
    via_link = vae_core.load_vae(tmp_path / "link.safetensors")
    with pytest.raises(VaeInputError):
        vae_core.save_vae(via_link, src)
    folder = tmp_path / "folder"
    shutil.copytree(MINI_DIFFUSERS, folder)
    files = _listing(folder)
    with pytest.raises(VaeInputError, match="loaded from"):
        vae_core.save_vae(vae_core.load_vae(folder), folder, layout="diffusers", dtype="fp16")
    assert _listing(folder) == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "hard.safetensors", "link.safetensors",
                                                          "vae.safetensors"]


# -- 4. scaling / shift factors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [math.nan, math.inf, 0.0, -0.18])
def test_bad_scaling_argument(bad):
    with pytest.raises(VaeInputError, match="scaling_factor") as err:
        vae_core.load_vae(MINI_LDM, scaling_factor=bad)
    assert "argument" in str(err.value) and "finite number from 0.0001 to 10000" in str(err.value)


def test_bad_factors_in_files(tmp_path, ldm_sd):
    folder = tmp_path / "cfg"
    shutil.copytree(MINI_DIFFUSERS, folder)
    cfg = json.loads((folder / "config.json").read_text())
    for bad in (-1.0, "NaN"):
        text = json.dumps(dict(cfg, scaling_factor=bad)).replace('"NaN"', "NaN")  # a bare NaN, as json.dumps writes
        (folder / "config.json").write_text(text)
        _expect(folder, "config.json", "scaling_factor")
    (folder / "config.json").write_text(json.dumps(dict(cfg, shift_factor="x")))
    _expect(folder, "config.json", "shift_factor 'x'")
    save_file(ldm_sd, str(tmp_path / "meta.safetensors"), metadata={"scaling_factor": "inf"})
    _expect(tmp_path / "meta.safetensors", "safetensors metadata", "'inf'")


def test_save_never_writes_non_finite_factors(tmp_path, mini_vae):
    vae = mini_vae.clone()
    vae.info.scaling_factor = float("nan")
    with pytest.raises(VaeInputError, match="scaling_factor"):
        vae_core.save_vae(vae, tmp_path / "folder", layout="diffusers")
    vae.info.scaling_factor, vae.info.shift_factor = 0.18215, float("inf")
    with pytest.raises(VaeInputError, match="shift_factor"):
        vae_core.save_vae(vae, tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


# -- 5. huge indices: no millions of modules --------------------------------------------------------------------

@pytest.mark.parametrize("key", ["encoder.down.0.block.10000000.conv1.weight", "encoder.down.99999.block.0.conv1.weight",
                                 "decoder.up.3.block.9" + "9" * 5000 + ".norm1.weight"])
def test_huge_level_and_block_indices_fail_before_building(tmp_path, ldm_sd, monkeypatch, key):
    built = []
    orig = vae_core.AutoencoderKL.__init__
    monkeypatch.setattr(vae_core.AutoencoderKL, "__init__", lambda self, cfg: (built.append(cfg), orig(self, cfg))[1])
    save_file(dict(ldm_sd, **{key: torch.zeros(4)}), str(tmp_path / "huge.safetensors"))
    t0 = time.monotonic()
    _expect(tmp_path / "huge.safetensors", key[:40], "at most 8 levels")
    assert time.monotonic() - t0 < 10 and built == []


# -- 6. compressed torch zips -----------------------------------------------------------------------------------

def test_deflated_zip_is_refused_before_inflating(tmp_path):
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\0" * (50 * 2**20))
    assert bomb.stat().st_size < 2**20
    t0 = time.monotonic()
    _expect(bomb, "compressed zip member", "archive/data.pkl", "uncompressed")
    assert time.monotonic() - t0 < 2  # inflating and CRC-checking 50 MB would take longer on this machine


def test_zip_stating_more_than_its_size_is_refused(tmp_path):
    torch.save({"x": torch.zeros(1000)}, tmp_path / "ok.pt")
    raw = bytearray((tmp_path / "ok.pt").read_bytes())
    with zipfile.ZipFile(tmp_path / "ok.pt") as zf:
        info = next(i for i in zf.infolist() if i.file_size >= 4000)
    # patch the uncompressed size of that member in the central directory (offset 24 of its record)
    pos = raw.find(b"PK\x01\x02")
    while pos != -1:
        name_len = int.from_bytes(raw[pos + 28:pos + 30], "little")
        if raw[pos + 46:pos + 46 + name_len].decode() == info.filename:
            raw[pos + 24:pos + 28] = (2**31).to_bytes(4, "little")
        pos = raw.find(b"PK\x01\x02", pos + 4)
    (tmp_path / "liar.pt").write_bytes(bytes(raw))
    _expect(tmp_path / "liar.pt", "zip members stating")


# -- 7. oversized / deeply nested JSON --------------------------------------------------------------------------

def test_oversized_and_deep_json_are_refused(tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(MINI_DIFFUSERS, folder)
    cfg = (MINI_DIFFUSERS / "config.json").read_text()
    (folder / "config.json").write_text(cfg + " " * MAX_JSON_BYTES)
    _expect(folder, "config.json", "refused unread")
    (folder / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    _expect(folder, "config.json", "nested")
    (folder / "config.json").write_text('{"a": ' + "[" * 40 + "]" * 40 + "}")
    _expect(folder, "config.json", "nested")
    (folder / "config.json").write_text("[1, 2]")
    _expect(folder, "config.json", "JSON list")


# -- 8. shard indexes -------------------------------------------------------------------------------------------

def _sharded(tmp_path: Path) -> tuple[Path, dict, dict]:
    sd = load_file(str(MINI_DIFFUSERS / "diffusion_pytorch_model.safetensors"))
    keys = sorted(sd)
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text((MINI_DIFFUSERS / "config.json").read_text())
    parts = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
             "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in parts.items():
        save_file({k: sd[k] for k in part}, str(folder / name))
    weight_map = {k: name for name, part in parts.items() for k in part}
    return folder, weight_map, sd


def _index(folder: Path, doc: object) -> Path:
    path = folder / "diffusion_pytorch_model.safetensors.index.json"
    path.write_text(json.dumps(doc))
    return path


def test_shard_index_types_and_names(tmp_path):
    folder, wm, _ = _sharded(tmp_path)
    first = sorted(wm)[0]
    outside = tmp_path / "outside.safetensors"
    save_file({first: torch.zeros(1)}, str(outside))
    cases = [([1, 2], "JSON list"), ({"weight_map": [first]}, "'weight_map' is list"),
             ({"weight_map": {}}, "empty"), ({"weight_map": dict(wm, **{first: 3})}, "is a int"),
             ({"weight_map": dict(wm, **{first: "../outside.safetensors"})}, "plain file name"),
             ({"weight_map": dict(wm, **{first: str(outside)})}, "plain file name"),
             ({"weight_map": dict(wm, **{first: "sub/x.safetensors"})}, "plain file name"),
             ({"weight_map": dict(wm, **{first: "..\\x.safetensors"})}, "plain file name")]
    for doc, needle in cases:
        index = _index(folder, doc)
        msg = _expect(folder, needle)
        assert str(index) in msg, msg
    assert vae_core.load_vae(MINI_DIFFUSERS)  # sanity: the shards themselves are fine
    _index(folder, {"weight_map": wm})
    assert vae_core.load_vae(folder).info.container == "diffusers-folder"


def test_shard_contents_must_match_the_index(tmp_path):
    folder, wm, sd = _sharded(tmp_path)
    names = sorted(set(wm.values()))
    k1 = sorted(k for k, v in wm.items() if v == names[0])[0]
    # a tensor the index names but its shard lacks
    _index(folder, dict(weight_map=dict(wm, **{"encoder.extra.weight": names[0]})))
    _expect(folder, "absent from their shards", "encoder.extra.weight")
    # a tensor in two shards
    _index(folder, {"weight_map": wm})
    part2 = load_file(str(folder / names[1]))
    save_file(dict(part2, **{k1: sd[k1]}), str(folder / names[1]))
    _expect(folder, k1, "also in shard")
    # a shard holding a tensor the index does not name
    save_file(dict(part2, **{"decoder.stray.weight": torch.zeros(1)}), str(folder / names[1]))
    _expect(folder, "decoder.stray.weight", "does not name")


# -- 9. NaN/inf weights -----------------------------------------------------------------------------------------

def test_non_finite_weights_are_named(tmp_path, ldm_sd):
    bad = dict(ldm_sd)
    bad["decoder.mid.block_1.conv1.weight"] = bad["decoder.mid.block_1.conv1.weight"].clone()
    bad["decoder.mid.block_1.conv1.weight"].view(-1)[7] = float("nan")
    bad["encoder.norm_out.bias"] = torch.full_like(bad["encoder.norm_out.bias"], float("inf"))
    save_file(bad, str(tmp_path / "nan.safetensors"))
    _expect(tmp_path / "nan.safetensors", "NaN/inf", "decoder.mid.block_1.conv1.weight", "encoder.norm_out.bias")


# -- 10. family vs channel count --------------------------------------------------------------------------------

def test_family_metadata_that_contradicts_the_channels_is_ignored(tmp_path, caplog):
    sd3 = diffusers_to_ldm(diffusers_vae("sd3").state_dict())
    save_file(sd3, str(tmp_path / "ae16.safetensors"), metadata={"family": "sdxl"})
    with caplog.at_level(logging.WARNING, logger="vae_core.families"):
        vae = vae_core.load_vae(tmp_path / "ae16.safetensors")
    assert vae.info.latent_channels == 16 and vae.info.family in ("flux", "sd3")
    assert "ignored family 'sdxl'" in vae.info.sources["family"]
    assert any("sdxl" in r.getMessage() for r in caplog.records)
    with pytest.raises(VaeInputError, match="16"):
        vae_core.load_vae(tmp_path / "ae16.safetensors", family="sdxl")
    with pytest.raises(VaeInputError, match="unknown"):
        vae_core.load_vae(MINI_LDM, family="sd9")


# -- 11. containers that lie about themselves -------------------------------------------------------------------

def test_zip_named_safetensors(tmp_path, ldm_sd):
    with zipfile.ZipFile(tmp_path / "not.safetensors", "w") as zf:
        zf.writestr("readme.txt", "hello")
    _expect(tmp_path / "not.safetensors", "not a safetensors file")
    torch.save(ldm_sd, tmp_path / "torch.safetensors")  # a real torch zip: loads correctly, with a warning
    assert _same_weights(vae_core.load_vae(tmp_path / "torch.safetensors"), vae_core.load_vae(MINI_LDM))


def test_safetensors_whose_header_length_starts_like_a_pickle(tmp_path, ldm_sd):
    """A header length with 0x80 as its low byte was sniffed as a pickle and refused."""
    path = tmp_path / "vae.safetensors"
    for pad in range(256):
        save_file(ldm_sd, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert vae_core.load_vae(path).info.container == "safetensors"


def test_safetensors_errors_are_typed(tmp_path):
    header = json.dumps({"w": {"dtype": "XX", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "dtype.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    _expect(tmp_path / "dtype.safetensors", "unreadable safetensors")
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    (tmp_path / "short.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    _expect(tmp_path / "short.safetensors", "unreadable safetensors")


# -- 12. weird tensors and junk in pickles ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["meta", "sparse", "expanded", "list", "nested dict"])
def test_weird_pickled_values_are_refused_naming_the_key(tmp_path, ldm_sd, kind):
    key = "decoder.conv_in.weight"
    shape = ldm_sd[key].shape
    value = {"meta": torch.zeros(shape, device="meta"), "sparse": torch.zeros(2, 2).to_sparse(),
             "expanded": torch.zeros(1).expand(10**7), "list": [1, 2, 3], "nested dict": {"a": torch.zeros(1)}}[kind]
    torch.save(dict(ldm_sd, **{key: value}), tmp_path / "weird.ckpt")
    _expect(tmp_path / "weird.ckpt", key)


def test_zero_sized_conv_is_a_load_error(tmp_path, ldm_sd):
    zero = dict(ldm_sd, **{"encoder.conv_in.weight": torch.zeros(0, 3, 3, 3)})
    save_file(zero, str(tmp_path / "zero.safetensors"))
    _expect(tmp_path / "zero.safetensors", "encoder.conv_in.weight")
    with pytest.raises(VaeLoadError, match="zero-sized|encoder.conv_in.weight"):
        vae_core.vae_from_state_dict(zero)
    with pytest.raises(VaeLoadError, match="meta"):
        vae_core.vae_from_state_dict(dict(ldm_sd, **{"encoder.conv_in.weight": torch.zeros(32, 3, 3, 3,
                                                                                              device="meta")}))


# -- 13/14. Vae.to ----------------------------------------------------------------------------------------------

def test_vae_to_accepts_module_to_arguments(mini_vae):
    vae = mini_vae.clone()
    assert vae.to(torch.float16).dtype == torch.float16
    assert vae.to("cpu", torch.bfloat16).dtype == torch.bfloat16
    assert vae.to(torch.device("cpu")).device.type == "cpu" and vae.dtype == torch.bfloat16
    assert vae.to("fp32").dtype == torch.float32 and vae.to("float16").dtype == torch.float16
    assert vae.to("cpu").dtype == torch.float16  # "cpu" is a device, not a dtype
    assert vae.to(torch.zeros(1, dtype=torch.float32)).dtype == torch.float32
    assert vae.to(device="cpu", dtype="auto").dtype == torch.float32
    for bad in ("fp8", "cuda:x", 3.5, torch.int8):
        with pytest.raises(VaeInputError):
            vae.to(bad)
    with pytest.raises(VaeInputError, match="two dtypes"):
        vae.to(torch.float16, "bf16")


def test_vae_to_keeps_the_guard_memory_across_moves(mini_vae):
    vae = mini_vae.clone()
    vae.guard.working_dtype = torch.float32  # as after an fp16 -> fp32 fallback (the model then runs in fp32)
    vae.to("cpu")
    vae.to(torch.device("cpu"), torch.float32)  # same dtype: not a new request
    assert vae.guard.working_dtype == torch.float32
    vae.to("fp16")
    assert vae.guard.working_dtype is None and vae.dtype == torch.float16


# -- 15. one dtype vocabulary -----------------------------------------------------------------------------------

def test_one_dtype_parser(tmp_path, mini_vae):
    from vae_core.precision.dtypes import parse_dtype, resolve_dtype

    assert vae_core.parse_dtype is parse_dtype
    assert parse_dtype("auto") == "auto" and parse_dtype("bf16") is torch.bfloat16 and parse_dtype(None) is None
    errors = []
    for call in (lambda: parse_dtype("fp8"), lambda: resolve_dtype("fp8", torch.device("cpu")),
                 lambda: vae_core.load_vae(MINI_LDM, dtype="fp8"), lambda: mini_vae.clone().to(dtype="fp8"),
                 lambda: vae_core.save_vae(mini_vae, tmp_path / "x.safetensors", dtype="fp8")):
        with pytest.raises(VaeInputError) as err:
            call()
        errors.append(str(err.value))
    assert all("'fp8'" in e and "'fp16'" in e and "'auto'" in e for e in errors), errors
    with pytest.raises(VaeInputError, match="'auto' is not allowed"):
        vae_core.save_vae(mini_vae, tmp_path / "x.safetensors", dtype="auto")
    assert list(tmp_path.iterdir()) == []


# -- 16. packaging ----------------------------------------------------------------------------------------------

def _have_build_backend() -> bool:
    try:
        import setuptools  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _have_build_backend(), reason="setuptools is not installed; an offline "
                    "'pip install --no-build-isolation' cannot build the package")
def test_pip_install_gives_vae_core_only(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".venv",
                                                             ".pytest_cache"))
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--quiet", "--target", str(target), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    top = sorted(p.name for p in target.iterdir())
    assert "vae_core" in top and "bin" in top
    assert [n for n in top if n not in ("vae_core", "bin") and not n.endswith(".dist-info")] == [], top
    assert (target / "bin" / "vae-core").is_file() and "vae_core.cli" in (target / "bin" / "vae-core").read_text()
    installed = {str(p.relative_to(target / "vae_core")) for p in (target / "vae_core").rglob("*.py")}
    assert {"families/kl/model.py", "families/registry.py", "tiling/sweep.py", "cli/main.py"} <= installed
    code = "import sys; sys.path.insert(0, sys.argv[1]); import vae_core; print(vae_core.__file__)"
    env = dict(os.environ, PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", code, str(target)], cwd=tmp_path, capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(str(target / "vae_core")), proc.stdout
    proc = subprocess.run([str(target / "bin" / "vae-core"), "--help"], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(env, PYTHONPATH=str(target)))
    assert proc.returncode == 0 and "inspect" in proc.stdout, proc.stdout + proc.stderr
    proc = subprocess.run([str(target / "bin" / "vae-core"), "inspect", str(tmp_path / "missing.safetensors")],
                          cwd=tmp_path, capture_output=True, text=True, env=dict(env, PYTHONPATH=str(target)))
    assert proc.returncode == 2 and "no such file" in proc.stderr, proc.stdout + proc.stderr  # main's int exits
