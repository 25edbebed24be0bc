"""The kl family's training-free fp16 fix: the GroupNorm-stream rescaling of :mod:`vae_core.families.groupnorm_fix`
(shared with HunyuanVideo 1.0, the same network in 3-D)."""
from ..groupnorm_fix import StreamSegment, choose_scales, fp16_fix_model, rescale_stream, stream_segments

__all__ = ["StreamSegment", "stream_segments", "rescale_stream", "choose_scales", "fp16_fix_model"]
