"""The kl family: AutoencoderKL for SD1/2, SDXL, SD3, Flux.1, Flux.2 (network, key layouts, fp16 fix, tiling
segments and plan, :mod:`.family`)."""
