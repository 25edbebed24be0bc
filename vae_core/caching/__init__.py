"""Latent caching for training: a dataset encoded once into webdataset-style tar shards with provenance, resumable,
on one process or many (torch.distributed), and exported to the files trainers read (:mod:`.run`, :mod:`.export`)."""
