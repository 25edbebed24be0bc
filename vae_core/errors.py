"""Typed errors raised by vae_core.

Every error names the offending path or value, what was found and what was expected, so host glue can show the
message to the user as is.
"""
from __future__ import annotations

__all__ = ["VaeError", "VaeLoadError", "VaeInputError", "NonFiniteOutputError", "Cancelled"]


class VaeError(Exception):
    """Base class of every error vae_core raises on purpose."""


class VaeLoadError(VaeError, ValueError):
    """A file or folder could not be read as an SD-family VAE.

    Raised for missing paths, empty or truncated files, pickles that want to run code, files without VAE weights,
    unexpected or missing keys and shape mismatches. Nothing from the file has been executed when it is raised.
    """

    def __init__(self, path: object, found: str, expected: str) -> None:
        self.path = str(path)
        self.found = found
        self.expected = expected
        super().__init__(f"{self.path}: {found}; expected {expected}")


class VaeInputError(VaeError, ValueError):
    """A tensor or argument handed to encode/decode/tiling does not fit (shape, channels, range, tile size)."""


class NonFiniteOutputError(VaeError, FloatingPointError):
    """encode/decode produced NaN or inf even in float32: the input itself is the cause (e.g. NaN latents)."""


class Cancelled(VaeError):
    """Raised between tiles (or attention chunks) when the cancel hook returns True."""
