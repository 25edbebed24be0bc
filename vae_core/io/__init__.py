"""Files in and out: formats (:mod:`.formats`: containers sniffed from bytes, ``weights_only`` pickles, diffusers
folders), atomic writes (:mod:`.atomic`), safe output paths (:mod:`.paths`), the bounded model-folder walk
(:mod:`.walk`), images and latents (:mod:`.images`)."""
