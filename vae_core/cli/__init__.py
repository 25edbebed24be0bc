"""``python -m vae_core``: the commands (:mod:`.main`), their shared argument types (:mod:`.args`), ``bench``
(:mod:`.bench`) and ``eval`` (:mod:`.lab`). The only layer that prints."""
