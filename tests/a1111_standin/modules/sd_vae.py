"""Stand-in for modules/sd_vae.py of A1111 v1.10.1 (behaviour from the notes; written from scratch)."""
import collections
import glob
import os
from copy import deepcopy

from modules import devices, paths, script_callbacks, sd_models, shared

vae_path = os.path.abspath(os.path.join(paths.models_path, "VAE"))
vae_ignore_keys = {"model_ema.decay", "model_ema.num_updates"}
vae_dict = {}
base_vae = None
loaded_vae_file = None
checkpoint_info = None
checkpoints_loaded = collections.OrderedDict()
unspecified = object()


def get_loaded_vae_name():
    return None if loaded_vae_file is None else os.path.basename(loaded_vae_file)


def get_loaded_vae_hash():
    if loaded_vae_file is None:
        return None
    assert os.path.isfile(loaded_vae_file)  # the real one hashes the file
    return "0123456789"


def get_filename(filepath):
    return os.path.basename(filepath)


def refresh_vae_list():
    vae_dict.clear()
    patterns = [os.path.join(sd_models.model_path, f"**/*.vae.{e}") for e in ("ckpt", "pt", "safetensors")]
    patterns += [os.path.join(vae_path, f"**/*.{e}") for e in ("ckpt", "pt", "safetensors")]
    if shared.cmd_opts.vae_dir is not None and os.path.isdir(shared.cmd_opts.vae_dir):
        patterns += [os.path.join(shared.cmd_opts.vae_dir, f"**/*.{e}") for e in ("ckpt", "pt", "safetensors")]
    for pattern in patterns:
        for filepath in glob.iglob(pattern, recursive=True):
            vae_dict[get_filename(filepath)] = filepath
    vae_dict.update(dict(sorted(vae_dict.items(), key=lambda item: shared.natural_sort_key(item[0]))))


def store_base_vae(model):
    global base_vae, checkpoint_info
    if checkpoint_info != model.sd_checkpoint_info:
        assert not loaded_vae_file, "Trying to store non-base VAE!"
        base_vae = deepcopy(model.first_stage_model.state_dict())
        checkpoint_info = model.sd_checkpoint_info


def delete_base_vae():
    global base_vae, checkpoint_info
    base_vae = None
    checkpoint_info = None


def restore_base_vae(model):
    global loaded_vae_file
    if base_vae is not None and checkpoint_info == model.sd_checkpoint_info:
        _load_vae_dict(model, base_vae)
        loaded_vae_file = None
    delete_base_vae()


def load_vae_dict(filename, map_location):
    vae_ckpt = sd_models.read_state_dict(filename, map_location=map_location)
    return {k: v for k, v in vae_ckpt.items() if k[0:4] != "loss" and k not in vae_ignore_keys}


def load_vae(model, vae_file=None, vae_source="from unknown source"):
    global loaded_vae_file
    if vae_file:
        assert os.path.isfile(vae_file), f"VAE {vae_source} doesn't exist: {vae_file}"
        store_base_vae(model)
        _load_vae_dict(model, load_vae_dict(vae_file, map_location=shared.weight_load_location))
        vae_opt = get_filename(vae_file)
        if vae_opt not in vae_dict:
            vae_dict[vae_opt] = vae_file
    elif loaded_vae_file:
        restore_base_vae(model)
    loaded_vae_file = vae_file
    model.base_vae = base_vae
    model.loaded_vae_file = loaded_vae_file


def _load_vae_dict(model, vae_dict_1):
    model.first_stage_model.load_state_dict(vae_dict_1)
    model.first_stage_model.to(devices.dtype_vae)


def clear_loaded_vae():
    global loaded_vae_file
    loaded_vae_file = None


def reload_vae_weights(sd_model=None, vae_file=unspecified):
    sd_model = sd_model or shared.sd_model
    if vae_file is unspecified:
        vae_file = vae_dict.get(shared.opts.sd_vae)
    if loaded_vae_file == vae_file:
        return None
    load_vae(sd_model, vae_file, "from function argument")
    script_callbacks.model_loaded_callback(sd_model)
    return sd_model
