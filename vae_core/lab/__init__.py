"""The VAE lab: image metrics (:mod:`.metrics`, the pack's one PSNR), runs over settings (:mod:`.run`), timing and peak
memory (:mod:`.measure`), the HTML/CSV/JSON report (:mod:`.report`) and the benchmark's measurements
(:mod:`.bench`)."""
