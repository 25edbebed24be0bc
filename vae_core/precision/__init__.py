"""Precision: the one dtype table and policy (:mod:`.dtypes`), the NaN guard that retries in a wider dtype from
the loaded weights (:mod:`.guard`), and what every training-free fp16 fix shares (:mod:`.calibrate`); each family's
fix itself lives with the family (``families/<name>/fp16_fix.py``)."""
