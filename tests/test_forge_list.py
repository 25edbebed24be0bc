"""Forge's module list and loader wrappers (webui_extension/forge_list.py) on plain modules shaped like Forge's: fast
checks of naming, routing and error translation; the real Forge server runs them in tests/test_forge_server.py."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from conftest import MINI_DIFFUSERS, MINI_LDM, ROOT

sys.path.insert(0, str(ROOT))
from vae_core.errors import VaeLoadError  # noqa: E402
from webui_extension import forge_list, host  # noqa: E402


def _modules(tmp_path: Path, prefill: bool = False) -> tuple[ModuleType, ModuleType, ModuleType, list]:
    """Stand-ins for main_entry, backend.loader and modules.sd_models with Forge's signatures; ``calls`` records
    what reached Forge's own functions."""
    calls: list = []
    entry, loader, sd_models = ModuleType("main_entry"), ModuleType("loader"), ModuleType("sd_models")
    sd_vae = ModuleType("sd_vae")
    sd_vae.refresh_vae_list = lambda: calls.append(("refresh_vae_list",))
    entry.module_list = {}
    te = tmp_path / "models" / "text_encoder"
    te.mkdir(parents=True)
    (te / "clip_l.safetensors").write_bytes(b"")

    def refresh_models():  # Forge: every file by base name, the last of a name wins
        entry.module_list.clear()
        for base in (tmp_path / "models" / "VAE", te):
            for f in sorted(base.rglob("*")):
                if f.suffix in (".ckpt", ".pt", ".bin", ".safetensors", ".gguf") and f.is_file():
                    entry.module_list[f.name] = str(f)
        return ["ckpt"], entry.module_list.keys()

    def modules_change(values, save=True, refresh=True):  # Forge: each value by base name
        entry.chosen = [entry.module_list[Path(v).name] for v in values if Path(v).name in entry.module_list]
        return True

    def load_torch_file(ckpt, safe_load=False, device=None):
        calls.append(("load", ckpt, safe_load))
        return {"forge": torch.zeros(1)}

    def replace_state_dict(sd, asd, guess):
        calls.append(("replace", sorted(asd)[:1]))
        return sd

    def forge_loader(sd, additional_state_dicts=None):
        try:
            for path in additional_state_dicts or []:
                loader.replace_state_dict({}, loader.load_torch_file(path), guess)
        except:  # noqa: E722 - as Forge does
            raise ValueError("Failed to recognize model type!")
        return "model"

    guess = SimpleNamespace(huggingface_repo="runwayml/stable-diffusion-v1-5")
    entry.modules_change = modules_change
    entry.refresh_models, loader.load_torch_file, loader.replace_state_dict = refresh_models, load_torch_file, \
        replace_state_dict
    loader.__file__ = str(tmp_path / "backend" / "loader.py")
    sd_models.forge_loader = forge_loader
    cfg = tmp_path / "backend" / "huggingface" / guess.huggingface_repo / "vae" / "config.json"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(json.dumps({"block_out_channels": [32, 64, 128, 128], "latent_channels": 4,
                               "layers_per_block": 2}))
    if prefill:  # a fork that lists at import, before extensions load
        refresh_models()
    forge_list.install(entry, loader, sd_models, sd_vae, lambda: str(tmp_path / "models"), lambda: None)
    entry.sd_vae = sd_vae
    return entry, loader, sd_models, calls


@pytest.fixture()
def forge(tmp_path):
    vae = tmp_path / "models" / "VAE"
    shutil.copytree(MINI_DIFFUSERS, vae / "mini-vae")
    shutil.copytree(MINI_DIFFUSERS, vae / "sub" / "mini-vae")
    shutil.copy(MINI_LDM, vae / "mini.sft")
    shutil.copy(MINI_LDM, vae / "sub" / "mini.sft")
    torch.save({"text_model.embeddings.token_embedding.weight": torch.zeros(3, 2)}, vae / "te.pt")
    save_file({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2)}, vae / "t5.safetensors")
    (vae / "t5-q8.gguf").write_bytes(b"GGUF")
    entry, loader, sd_models, calls = _modules(tmp_path)
    entry.refresh_models()
    yield SimpleNamespace(entry=entry, loader=loader, sd_models=sd_models, calls=calls, vae=vae)
    forge_list.uninstall(entry, loader, sd_models, entry.sd_vae)


def test_every_vae_listed_once_under_a_unique_name(forge):
    listed = forge.entry.module_list
    assert set(listed) == {"mini-vae", "mini-vae (2)", "mini.sft", "mini (2).sft", "te.pt", "t5.safetensors",
                           "t5-q8.gguf", "clip_l.safetensors"}
    assert listed["mini-vae"] == str(forge.vae / "mini-vae")  # the shallower one keeps the plain name
    assert listed["mini-vae (2)"] == str(forge.vae / "sub" / "mini-vae (2)")  # virtual: base name = entry name
    assert not any("diffusion_pytorch_model" in p for p in listed.values())
    forge.entry.refresh_models()  # a second refresh gives the same list, wrapped once
    assert set(forge.entry.module_list) == set(listed) and forge.entry.refresh_models._vae_pack
    shutil.copy(MINI_LDM, forge.vae / "late.safetensors")  # added after start-up: the API's refresh-vae lists it
    forge.entry.sd_vae.refresh_vae_list()
    assert forge.calls == [("refresh_vae_list",)] and "late.safetensors" in forge.entry.module_list
    assert "clip_l.safetensors" in forge.entry.module_list  # text encoders kept


def test_a_list_filled_before_the_pack_loads_is_relisted(tmp_path):
    shutil.copytree(MINI_DIFFUSERS, tmp_path / "models" / "VAE" / "mini-vae")
    entry, loader, sd_models, _ = _modules(tmp_path, prefill=True)
    try:
        assert set(entry.module_list) == {"mini-vae", "clip_l.safetensors"}, entry.module_list
    finally:
        forge_list.uninstall(entry, loader, sd_models, entry.sd_vae)


def test_each_entry_loads_its_own_weights_through_vae_core(forge):
    load = forge.loader.load_torch_file
    a, b = load(forge.entry.module_list["mini-vae"]), load(forge.entry.module_list["mini-vae (2)"])
    assert "decoder.conv_in.weight" in a and torch.equal(a["decoder.conv_in.weight"], b["decoder.conv_in.weight"])
    assert "decoder.conv_in.weight" in load(forge.entry.module_list["mini (2).sft"])
    assert forge.calls == []  # none of them went to Forge's reader
    load("/elsewhere/model.ckpt")  # not in a VAE folder: Forge's reader as it was called
    for name in ("t5.safetensors", "t5-q8.gguf"):  # text encoders beside the VAEs: told apart without reading them
        load(str(forge.vae / name))
    assert forge.calls == [("load", "/elsewhere/model.ckpt", False), ("load", str(forge.vae / "t5.safetensors"), True),
                           ("load", str(forge.vae / "t5-q8.gguf"), True)]
    # a pickle is read by vae_core first (weights_only), then, holding no VAE, by Forge with safe_load
    assert forge.sd_models.forge_loader("m", additional_state_dicts=[str(forge.vae / "te.pt")]) == "model"
    assert forge.calls[-2:] == [("load", str(forge.vae / "te.pt"), True), ("replace", ["forge"])]


def test_a_choice_by_path_or_a_saved_virtual_path_loads_that_file(forge):
    """Forge matches choices by base name: the deeper folder's real path must not pick the shallower one; a virtual
    path saved in a config resolves in a new process (nothing listed yet, as with --nowebui)."""
    deeper = str(forge.vae / "sub" / "mini-vae")
    forge.entry.modules_change([deeper])
    assert forge.entry.chosen == [forge.entry.module_list["mini-vae (2)"]]
    forge.entry.modules_change([str(forge.vae / "mini-vae")])
    assert forge.entry.chosen == [str(forge.vae / "mini-vae")]
    virtual = forge.entry.module_list["mini (2).sft"]
    forge_list._virtual.clear()
    forge.entry.module_list.clear()
    assert "decoder.conv_in.weight" in forge.loader.load_torch_file(virtual) and forge.calls == []


def test_wrong_shape_and_hostile_files_raise_ours_with_422(forge, tmp_path):
    """The config says SD widths of 32..128 here (our test VAE's), so a VAE with other widths is refused by name;
    a pickle that wants to run code is refused, never handed to Forge's unsafe reader."""
    cfg = tmp_path / "backend" / "huggingface" / "runwayml" / "stable-diffusion-v1-5" / "vae" / "config.json"
    cfg.write_text(json.dumps({"block_out_channels": [128, 256, 512, 512], "latent_channels": 4,
                               "layers_per_block": 2}))
    with pytest.raises(VaeLoadError, match=r"mini\.sft.*\[32, 64, 128, 128\].*\[128, 256, 512, 512\]") as err:
        forge.sd_models.forge_loader("model.ckpt", additional_state_dicts=[forge.entry.module_list["mini.sft"]])
    assert err.value.status_code == 422
    evil = forge.vae / "evil.ckpt"

    class Boom:
        def __reduce__(self):
            return (print, ("ran",))
    torch.save({"x": Boom()}, evil)
    with pytest.raises(VaeLoadError, match="evil.ckpt"):
        forge.sd_models.forge_loader("model.ckpt", additional_state_dicts=[str(evil)])
    assert not any(c[0] == "load" for c in forge.calls)


def test_a_fitting_vae_reaches_forge_with_ldm_keys(forge):
    assert forge.sd_models.forge_loader("m", additional_state_dicts=[forge.entry.module_list["mini-vae"]]) == "model"
    assert forge.calls == [("replace", ["decoder.conv_in.bias"])]


def test_host_detection_reads_what_the_host_exposes():
    fsm = torch.nn.Conv2d(1, 1, 1)

    class VAE:  # Forge main's shape: decode/encode look up the patcher's wrappers
        def __init__(self):
            self.first_stage_model, self.patcher = fsm, SimpleNamespace(model_options={})

        def decode(self, x):
            return self.patcher.model_options.get("model_vae_decode_wrapper")

        def encode(self, x):
            return self.patcher.model_options.get("model_vae_encode_wrapper")

    class Neo(VAE):
        def decode(self, x):
            return x

    forge_main = SimpleNamespace(first_stage_model=None, forge_objects=SimpleNamespace(vae=VAE()))
    neo = SimpleNamespace(first_stage_model=fsm, forge_objects=SimpleNamespace(vae=Neo()))
    reforge = SimpleNamespace(first_stage_model=fsm, forge_objects=SimpleNamespace(vae=Neo()))  # Forge1-based
    other = SimpleNamespace(first_stage_model=torch.nn.Conv2d(1, 1, 1), forge_objects=SimpleNamespace(vae=VAE()))
    a1111 = SimpleNamespace(first_stage_model=fsm)
    assert host.forge_vae(forge_main) is forge_main.forge_objects.vae and host.looks_up_wrappers(VAE())
    assert host.forge_vae(neo) is neo.forge_objects.vae and not host.looks_up_wrappers(Neo())
    assert host.forge_vae(reforge) is reforge.forge_objects.vae  # the object that decodes the same module
    assert host.forge_vae(other) is None and host.forge_vae(a1111) is None  # first_stage_model is what runs
    assert host.forge_entry() is None  # no modules_forge here
