"""The A1111/Forge side: settings, the "VAE Pack" accordion (AlwaysVisible Script) and callbacks. A few lines each;
the work is in ``vae_list``/``forge_list`` (the VAE lists), ``hooks``/``forge_hooks`` and vae_core; ``host`` says
which hooks are live (A1111, reForge and Classic: ``first_stage_model``; Forge main and Neo: the Forge VAE object)."""
from __future__ import annotations

import logging
from typing import Any

import torch

from modules import devices, script_callbacks, scripts, sd_vae, shared

from . import forge_hooks, forge_list, hooks, host, vae_list

log = logging.getLogger(__name__)
SECTION = ("vae_pack", "VAE Pack")
DEFAULTS = {"vae_pack_fp16_fix": True, "vae_pack_nan_guard": True, "vae_pack_tiled": False,
            "vae_pack_encoder_tile": 0, "vae_pack_decoder_tile": 0, "vae_pack_tile_mode": "exact"}


def opt(name: str) -> Any:
    return getattr(shared.opts, name, DEFAULTS[name])


def on_ui_settings() -> None:
    import gradio as gr

    add = shared.opts.add_option
    add("vae_pack_fp16_fix", shared.OptionInfo(True, "Training-free fp16 fix when the VAE runs in half precision",
                                               section=SECTION).info("same images, no NaNs; needs a model reload"))
    add("vae_pack_nan_guard", shared.OptionInfo(True, "Check every output pixel for NaN and retry in bf16/fp32 "
                                                "(encode and decode)", section=SECTION))
    add("vae_pack_tiled", shared.OptionInfo(False, "Tiled VAE on by default", section=SECTION))
    for key, label in (("vae_pack_encoder_tile", "Default encoder tile (px, 0 = auto)"),
                       ("vae_pack_decoder_tile", "Default decoder tile (px, 0 = auto)")):
        add(key, shared.OptionInfo(0, label, gr.Slider, {"minimum": 0, "maximum": 4096, "step": 64}, section=SECTION))
    add("vae_pack_tile_mode", shared.OptionInfo("exact", "Tiling mode", gr.Radio, {"choices": ["exact", "fast"]},
                                                section=SECTION).info("exact = identical to untiled; fast = no cache, "
                                                                      "approximate colours"))


def _first_stage(sd_model: Any) -> tuple[Any, Any]:
    """(Forge's VAE object or None, the first-stage module that runs or None)."""
    vae = host.forge_vae(sd_model)
    return vae, vae.first_stage_model if vae is not None else getattr(sd_model, "first_stage_model", None)


def on_model_loaded(sd_model: Any) -> None:
    """After a checkpoint or VAE (re)load: fp16 fix when the VAE is half precision, and the NaN guard."""
    vae, fsm = _first_stage(sd_model)
    if fsm is None:
        return
    if opt("vae_pack_fp16_fix") and next(fsm.parameters()).dtype == torch.float16:
        hooks.apply_fp16_fix(fsm)
    elif not opt("vae_pack_fp16_fix"):
        hooks.undo_fp16_fix_eps(fsm)
    if opt("vae_pack_nan_guard") and vae is not None:
        forge_hooks.install_guard(vae)
    elif opt("vae_pack_nan_guard"):
        hooks.install_guard(fsm, lambda dtype: setattr(devices, "dtype_vae", dtype))  # A1111 casts inputs to it
    else:
        hooks.remove_guard(fsm)
    if _job:  # a model (re)loaded during a tiled job (Forge: a hires checkpoint or VAE, the next batch)
        _tile(sd_model)


#: the running job's tiling: "args" (encoder tile, decoder tile, mode) and "undo" (one per VAE it was put on).
#: Hosts run one job at a time.
_job: dict[str, Any] = {}


def _tile(sd_model: Any) -> None:
    """Put the running job's tiling on ``sd_model``'s VAE (the object that decodes)."""
    vae, fsm = _first_stage(sd_model)
    if fsm is None:
        return
    enc, dec, mode = _job["args"]
    if vae is not None:
        forge_hooks.install_tiled(vae, enc, dec, mode, cancel=_interrupted)
        _job["undo"].append(lambda: forge_hooks.restore(vae))
    else:
        hooks.install_tiled(fsm, enc, dec, mode, cancel=_interrupted)
        _job["undo"].append(lambda: hooks.restore_tiled(fsm))


def _untile() -> None:
    """Take the job's tiling off every VAE it was put on."""
    undo = _job.get("undo", [])
    _job.clear()
    for fn in reversed(undo):
        fn()


def _interrupted() -> bool:
    state = getattr(shared, "state", None)
    return bool(getattr(state, "interrupted", False))


class VaePackScript(scripts.Script):
    sorting_priority = 20

    def title(self) -> str:
        return "VAE Pack"

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool) -> list:
        import gradio as gr

        with gr.Accordion("VAE Pack: tiled VAE", open=False):
            enabled = gr.Checkbox(value=opt("vae_pack_tiled"), label="Enable tiled VAE (exact, bounded memory)")
            enc = gr.Slider(0, 4096, value=opt("vae_pack_encoder_tile"), step=64, label="Encoder tile (px, 0 = auto)")
            dec = gr.Slider(0, 4096, value=opt("vae_pack_decoder_tile"), step=64, label="Decoder tile (px, 0 = auto)")
            mode = gr.Radio(["exact", "fast"], value=opt("vae_pack_tile_mode"), label="Mode")
        return [enabled, enc, dec, mode]

    def before_process(self, p: Any, *args: Any) -> None:
        _untile()  # at the start of every job: whatever a failed or cancelled job left behind
        _restore(p)

    def process(self, p: Any, enabled: bool = False, encoder_tile: int = 0, decoder_tile: int = 0,
                mode: str = "exact", *args: Any) -> None:
        _untile()
        _restore(p)  # in Forge the model is (re)loaded by now, before p.init's img2img encode
        if not enabled:
            return
        _job.update(args=(int(encoder_tile), int(decoder_tile), mode), undo=[])
        _tile(getattr(p, "sd_model", None))
        hooks.restore_when_closed(p, _untile)  # every job is closed, failed ones too
        p.extra_generation_params["VAE tiling"] = f"{mode}, enc {int(encoder_tile) or 'auto'}, " \
                                                  f"dec {int(decoder_tile) or 'auto'}"

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        _untile()
        _restore(p)


def _restore(p: Any) -> tuple[Any, Any]:
    """Put the first stage's own forwards (and Forge's own VAE wrappers) back; returns :func:`_first_stage`."""
    vae, fsm = _first_stage(getattr(p, "sd_model", None))
    if vae is not None:
        forge_hooks.restore(vae)
    elif fsm is not None:
        hooks.restore_tiled(fsm)
    return vae, fsm


def setup() -> None:
    """Run at import of the scripts/ shim (A1111 and Forge import it before the first VAE list and model load)."""
    entry = host.forge_entry()
    if entry is not None:  # Forge main / Neo: the "VAE / Text Encoder" list and Forge's loader
        from backend import loader
        from modules import paths, sd_models

        forge_list.install(entry, loader, sd_models, sd_vae, lambda: paths.models_path,
                           lambda: getattr(shared.cmd_opts, "vae_dir", None))
        script_callbacks.on_script_unloaded(lambda: forge_list.uninstall(entry, loader, sd_models, sd_vae))
    else:  # A1111, reForge, Classic: the "SD VAE" list
        vae_list.install(sd_vae)
        script_callbacks.on_script_unloaded(lambda: vae_list.uninstall(sd_vae))
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_model_loaded(on_model_loaded)
