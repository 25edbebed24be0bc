"""The A1111 side: settings, the "VAE Pack" accordion (AlwaysVisible Script) and callbacks. A few lines each;
the work is in ``vae_list``, ``hooks`` and vae_core."""
from __future__ import annotations

import logging
from typing import Any

import torch

from modules import devices, script_callbacks, scripts, sd_vae, shared

from . import hooks, vae_list

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


def on_model_loaded(sd_model: Any) -> None:
    """After a checkpoint or VAE (re)load: fp16 fix when the VAE is half precision, and the NaN guard."""
    fsm = getattr(sd_model, "first_stage_model", None)
    if fsm is None:
        return
    if opt("vae_pack_fp16_fix") and next(fsm.parameters()).dtype == torch.float16:
        hooks.apply_fp16_fix(fsm)
    elif not opt("vae_pack_fp16_fix"):
        hooks.undo_fp16_fix_eps(fsm)
    if opt("vae_pack_nan_guard"):
        hooks.install_guard(fsm, devices)
    else:
        hooks.remove_guard(fsm)


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
        _restore(p)  # at the start of every job: whatever a failed or cancelled job left behind

    def process(self, p: Any, enabled: bool = False, encoder_tile: int = 0, decoder_tile: int = 0,
                mode: str = "exact", *args: Any) -> None:
        fsm = _restore(p)
        if not enabled or fsm is None:
            return
        hooks.install_tiled(fsm, int(encoder_tile), int(decoder_tile), mode, cancel=_interrupted)
        hooks.restore_when_closed(p, fsm)  # A1111 closes every job in a finally, failed ones too
        p.extra_generation_params["VAE tiling"] = f"{mode}, enc {int(encoder_tile) or 'auto'}, " \
                                                  f"dec {int(decoder_tile) or 'auto'}"

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        _restore(p)


def _restore(p: Any) -> Any:
    """Put the first stage's own forwards back; returns the first stage (or None)."""
    fsm = getattr(getattr(p, "sd_model", None), "first_stage_model", None)
    if fsm is not None:
        hooks.restore_tiled(fsm)
    return fsm


def setup() -> None:
    """Run at import of the scripts/ shim (A1111 imports it before the first VAE refresh and model load)."""
    vae_list.install(sd_vae)
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_model_loaded(on_model_loaded)
    script_callbacks.on_script_unloaded(lambda: vae_list.uninstall(sd_vae))
