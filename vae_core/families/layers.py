"""Building blocks several families share (the kl mid block, the Wan and HunyuanVideo 1.0 and 1.5 mid blocks): attention
over every latent pixel, with queries in chunks so the score matrix never materialises whole, and cancel checks
between chunks; the RMS norm over channels of the Wan and HunyuanVideo 1.5 designs.

Tensors: ``q``, ``k``, ``v`` are ``[B, N, C]`` (N tokens = latent pixels); the result has ``q``'s shape and dtype.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..progress import ATTENTION_HOOK

__all__ = ["attention", "frame_attention", "RMSNorm", "sdpa_is_fused", "ATTENTION_LOG_FLOPS", "ATTENTION_CHUNK_BYTES",
           "ATTENTION_CHUNK_FLOPS"]

log = logging.getLogger(__name__)


#: One attention call estimated above this many FLOPs (``4·B·N²·C``: q kᵀ and the weighted sum of v) is logged at
#: INFO, since on a CPU it can run for minutes to hours.
ATTENTION_LOG_FLOPS = 1e12


#: Upper bound, in bytes, of one chunk of attention scores (fp32) where PyTorch's *math* kernel runs (it
#: materialises the scores), per device type. Queries are processed in chunks so that the score matrix of a large
#: image never materialises whole; the bound keeps peak memory independent of the image size (CPU: 64 MiB; CUDA:
#: 512 MiB, where larger matmuls run faster).
ATTENTION_CHUNK_BYTES = {"cpu": 64 * 2**20, "cuda": 512 * 2**20}


#: Where a fused kernel runs (flash / memory-efficient / cuDNN: scores never materialise, memory is O(N)), queries
#: are chunked only so that cancel checks come between chunks: about this many FLOPs per chunk, per device type
#: (CPU: ~0.5 s on a 2-core machine); None = one call (a GPU runs even an 8K image's attention in seconds).
ATTENTION_CHUNK_FLOPS: dict[str, Optional[float]] = {"cpu": 5e10, "cuda": None}


#: ``torch._fused_sdp_choice`` results (``torch.nn.attention.SDPBackend``) of the kernels that never materialise the
#: score matrix: flash, memory-efficient, cuDNN.
_FUSED_BACKENDS = frozenset({1, 2, 3})


def sdpa_is_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``F.scaled_dot_product_attention`` on these ``[B, heads, N, C]`` tensors picks a fused kernel (flash,
    memory-efficient or cuDNN) rather than the math kernel that materialises the scores (asked of PyTorch's own
    dispatcher; False when it cannot say, e.g. on the meta device)."""
    try:
        return int(torch._fused_sdp_choice(q, k, v)) in _FUSED_BACKENDS
    except (AttributeError, RuntimeError, TypeError, NotImplementedError):
        return False


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_bytes: Optional[int] = None) -> torch.Tensor:
    """Single-head softmax attention over tokens, computed in query chunks.

    Args:
        q, k, v: ``[B, N, C]`` tensors of one dtype (run as ``[B, 1, N, C]``: the layout PyTorch's fused kernels take;
            ``[B, N, C]`` falls back to the slow math kernel).
        chunk_bytes: bound on the fp32 score block ``[B, n_chunk, N]`` per chunk. Default: per device where the math
            kernel runs (:data:`ATTENTION_CHUNK_BYTES`); where a fused kernel runs the scores never materialise and
            chunks only bound the work between cancel checks (:data:`ATTENTION_CHUNK_FLOPS`).
    Returns:
        ``[B, N, C]``, ``softmax(q kᵀ / √C) v``. Memory beyond q/k/v is O(chunk · N) at most, not O(N²).

    :data:`ATTENTION_HOOK`, when set, is called after every query chunk (``hook(done, total)``; one call when the
    whole call is one chunk); an exception raised by it stops the loop. Calls estimated above
    :data:`ATTENTION_LOG_FLOPS` are logged at INFO with N and the estimate.
    """
    b, n, c = q.shape
    q4, k4, v4 = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    flops = 4.0 * b * n * k.shape[1] * max(c, v.shape[-1])
    if chunk_bytes is not None or not sdpa_is_fused(q4, k4, v4):
        if chunk_bytes is None:
            chunk_bytes = ATTENTION_CHUNK_BYTES.get(q.device.type, ATTENTION_CHUNK_BYTES["cpu"])
        step = max(1, min(n, chunk_bytes // max(1, b * k.shape[1] * 4)))
    else:
        budget = ATTENTION_CHUNK_FLOPS.get(q.device.type, ATTENTION_CHUNK_FLOPS["cpu"])
        step = n if budget is None else max(1, min(n, int(n * budget / max(flops, 1.0))))
    if flops > ATTENTION_LOG_FLOPS:
        log.info("attention over N=%d tokens (batch %d, %d channels): about %.3g FLOPs in %d query chunks; this "
                 "can take long on a CPU (tile the call to bound it)", n, b, c, flops, -(-n // step))
    hook = ATTENTION_HOOK.get()
    if step >= n:
        out = F.scaled_dot_product_attention(q4, k4, v4).squeeze(1)
        if hook is not None:
            hook(1, 1)
        return out
    total = -(-n // step)
    out = q.new_empty(b, n, v.shape[-1])
    for i, start in enumerate(range(0, n, step)):
        out[:, start : start + step] = F.scaled_dot_product_attention(q4[:, :, start : start + step], k4, v4)[:, 0]
        if hook is not None:
            hook(i + 1, total)
    return out


class RMSNorm(nn.Module):
    """``normalize(x, over channels) · √C · γ`` (per pixel and frame; fp16/bf16 normalised in fp32 as the reference
    does); γ stored ``[C, 1, 1, 1]`` (blocks, 5-D) or ``[C, 1, 1]`` (per-frame 4-D attention)."""

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.normalize(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dim=1).to(x.dtype)
        return y * self.scale * self.gamma.view(-1, *([1] * (x.dim() - 2)))


def frame_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: int, causal: bool,
                    first: int = 0) -> torch.Tensor:
    """Attention of queries ``q [B, n·P, C]`` (frames ``first .. first + n`` of ``P`` tokens each) over keys/values
    ``[B, T·P, C]`` of all ``frames`` frames; with ``causal`` a query of frame t sees frames 0..t only."""
    if not causal:
        return attention(q, k, v)
    per = k.shape[1] // frames
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    for i in range(q.shape[1] // per):
        end = (first + i + 1) * per
        out[:, i * per:(i + 1) * per] = attention(q[:, i * per:(i + 1) * per], k[:, :end], v[:, :end])
    return out
