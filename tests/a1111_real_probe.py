"""Run inside a REAL A1111 v1.10.1 tree with its own interpreter (see tests/test_a1111_real.py).

Initialises A1111 offline without UI or checkpoint as its webui.py does before the UI, with this pack installed as
an extension in the data dir, then prints one JSON line: which scripts loaded, the errors A1111 recorded, the
dropdown entries, and for every entry whether it loads strictly (through A1111's own ``sd_vae.load_vae``) into the
real ``ldm.models.autoencoder.AutoencoderKL`` with the fixture's tensors.
Usage: python a1111_real_probe.py A1111_DIR DATA_DIR FIXTURE_LDM_SAFETENSORS
"""
import json
import os
import sys
import types

a1111, data_dir, fixture = sys.argv[1:4]
os.chdir(a1111)
sys.path.insert(0, a1111)
os.environ.pop("COMMANDLINE_ARGS", None)
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", IGNORE_CMD_ARGS_ERRORS="1")
sys.argv = [sys.argv[0], "--data-dir", data_dir, "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half",
            "--no-half-vae", "--skip-prepare-environment", "--skip-install", "--skip-version-check",
            "--no-download-sd-model", "--skip-load-model-at-start", "--do-not-download-clip"]

from modules import initialize  # noqa: E402

initialize.imports()
initialize.check_versions()
initialize.initialize()

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from ldm.models.autoencoder import AutoencoderKL  # noqa: E402
from modules import errors, scripts, sd_vae, shared_items  # noqa: E402

result = {"scripts": [os.path.relpath(s.path, data_dir) for s in scripts.scripts_data if "vae" in s.path.lower()],
          "errors": [str(e)[:300] for e in getattr(errors, "exception_records", [])],
          "entries": dict(sd_vae.vae_dict), "items": shared_items.sd_vae_items(),
          "wrapped": bool(getattr(sd_vae.load_vae_dict, "_vae_pack", False)), "loads": {}}
cfg = OmegaConf.load("configs/v1-inference.yaml")
params = cfg.model.params.first_stage_config.params
params.ddconfig.ch = 32  # the fixture's width
expected = {k: v.float() for k, v in load_file(fixture).items()}
for name, path in sd_vae.vae_dict.items():
    model = types.SimpleNamespace(first_stage_model=AutoencoderKL(**params), sd_checkpoint_info=object())
    try:
        sd_vae.load_vae(model, path, "from the probe")  # A1111's own loading path: isfile, strict load_state_dict
        got = model.first_stage_model.state_dict()
        same = set(got) == set(expected) and all(torch.equal(got[k].float(), expected[k]) for k in expected)
        result["loads"][name] = {"ok": same, "class": type(model.first_stage_model).__module__ + ".AutoencoderKL",
                                 "loaded_name": sd_vae.get_loaded_vae_name()}
    except Exception as exc:  # report, do not stop: the test asserts on every entry
        result["loads"][name] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    sd_vae.loaded_vae_file = None
    sd_vae.delete_base_vae()
print("PROBE " + json.dumps(result))
