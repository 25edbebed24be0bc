"""Hooks long kernels call between chunks of work, so a host can cancel or show progress inside one call."""
from __future__ import annotations

import contextvars
from typing import Callable, Optional

__all__ = ["ATTENTION_HOOK"]

#: When set to a callable ``hook(done_chunks, total_chunks)``, attention calls it after each query chunk
#: (``done_chunks`` = 1..total), so a caller can report progress or cancel a long untiled attention by raising from
#: it (the exception propagates and no further chunk is computed; the tiling engine sets it to the host's cancel
#: check). Unset: no calls.
ATTENTION_HOOK: contextvars.ContextVar[Optional[Callable[[int, int], object]]] = contextvars.ContextVar(
    "vae_core_attention_hook", default=None)
