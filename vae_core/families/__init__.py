"""VAE families, one folder each (``kl/``, ``wan/``, ``tiny/``): network, key conversion, fp16 fix and tiling plan
of one design, behind the protocol in :mod:`.base`; :mod:`.registry` lists them; :mod:`.scaling` holds the latent
scaling families of the kl design (``sd1``, ``sdxl``, ``sd3``, ``flux``, ``flux2``)."""
