"""Half precision without NaNs: a training-free fp16 fix, a dtype policy and a whole-tensor NaN guard.

The fix rests on one identity: ``GroupNorm(s·x)`` with ``eps`` replaced by ``s²·eps`` equals ``GroupNorm(x)`` for
any ``s > 0``. In the AutoencoderKL every read of the residual stream goes through a GroupNorm except the residual
adds, the 1×1 shortcuts and the resampling convs, so the stream can be multiplied by a factor per *segment*
(a run of blocks joined by identity skips) by rescaling the convs that write into it (``conv_in``, each resnet's
``conv2``, attention ``proj_out``, shortcuts and resampling convs, which also undo the previous segment's factor)
and each reading GroupNorm's ``eps``. Each resnet's ``conv1`` feeds only ``norm2`` and takes a free factor of its
own. Factors are powers of two, so in fp32 the rescaled model computes the same function to rounding.

What it cannot shrink: post-GroupNorm activations, q/k/v and attention logits, and ``conv_out``; they are bounded
by the GroupNorm affine parameters and the weights.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
from torch import nn

from .devices import bf16_native
from .errors import NonFiniteOutputError, VaeInputError
from .model import AttnBlock, AutoencoderKL, Downsample, GroupNorm, ResnetBlock, Upsample

__all__ = ["Segment", "stream_segments", "rescale_stream", "measure_peaks", "choose_scales", "fp16_fix_model",
           "calibration_image", "bf16_supported", "parse_dtype", "resolve_dtype", "guarded", "GuardState", "FIX_TARGET",
           "DTYPES", "DTYPE_NAMES"]

log = logging.getLogger(__name__)

#: Largest stream activation the fix aims for on the calibration input: 64× headroom below fp16's 65504.
FIX_TARGET = 1024.0


@dataclass
class Segment:
    """A run of the residual stream at one scale: ``entry`` writes it from the previous segment (or the input)."""

    entry: nn.Module
    members: list[nn.Module] = field(default_factory=list)


def _walk(entry: nn.Conv2d, body: list[nn.Module]) -> list[Segment]:
    segs = [Segment(entry)]
    for mod in body:
        if isinstance(mod, (Upsample, Downsample)) or (isinstance(mod, ResnetBlock) and mod.nin_shortcut is not None):
            segs.append(Segment(mod))
        else:
            segs[-1].members.append(mod)
    return segs


def stream_segments(model: AutoencoderKL) -> tuple[list[Segment], list[Segment]]:
    """Encoder and decoder segments, in stream order."""
    enc, dec = model.encoder, model.decoder
    enc_body: list[nn.Module] = []
    for level in enc.down:
        enc_body += list(level.block) + ([level.downsample] if level.downsample is not None else [])
    enc_body += [enc.mid.block_1, enc.mid.attn_1, enc.mid.block_2]
    dec_body: list[nn.Module] = [dec.mid.block_1, dec.mid.attn_1, dec.mid.block_2]
    for level in reversed(dec.up):
        dec_body += list(level.block) + ([level.upsample] if level.upsample is not None else [])
    return _walk(enc.conv_in, enc_body), _walk(dec.conv_in, dec_body)


def _scale_conv(conv: nn.Conv2d, w: float, b: float) -> None:
    conv.weight.data.mul_(w)
    if conv.bias is not None:
        conv.bias.data.mul_(b)


def _scale_resnet(r: ResnetBlock, s_in: float, s_out: float, t: float) -> None:
    r.norm1.eps *= s_in * s_in
    _scale_conv(r.conv1, t, t)
    r.norm2.eps *= t * t
    _scale_conv(r.conv2, s_out, s_out)
    if r.nin_shortcut is not None:
        _scale_conv(r.nin_shortcut, s_out / s_in, s_out)


@torch.no_grad()
def rescale_stream(segments: list[Segment], final_norm: GroupNorm, scales: list[float],
                   conv1_scales: Optional[dict[ResnetBlock, float]] = None) -> None:
    """Multiply segment i of the stream by ``scales[i]`` (relative to now), in place; output unchanged.

    Args:
        segments: from :func:`stream_segments` (encoder or decoder).
        final_norm: the GroupNorm that reads the last segment (``norm_out``).
        scales: one positive factor per segment (powers of two keep fp32 results bit-close).
        conv1_scales: optional free factor per resnet ``conv1`` output.
    """
    if len(scales) != len(segments) or any(s <= 0 for s in scales):
        raise ValueError(f"scales: expected {len(segments)} positive factors, got {scales}")
    conv1_scales = conv1_scales or {}
    prev = 1.0
    for seg, s in zip(segments, scales):
        e = seg.entry
        if isinstance(e, nn.Conv2d):
            _scale_conv(e, s, s)
        elif isinstance(e, (Upsample, Downsample)):
            _scale_conv(e.conv, s / prev, s)
        else:
            _scale_resnet(e, prev, s, conv1_scales.get(e, 1.0))
        for m in seg.members:
            if isinstance(m, ResnetBlock):
                _scale_resnet(m, s, s, conv1_scales.get(m, 1.0))
            elif isinstance(m, AttnBlock):
                m.norm.eps *= s * s
                _scale_conv(m.proj_out, s, s)
        prev = s
    final_norm.eps *= prev * prev


def calibration_image(size: int = 256, device: str | torch.device = "cpu") -> torch.Tensor:
    """A built-in high-contrast synthetic image ``[1, 3, size, size]`` in [-1, 1]: saturated colour bars, hard
    black/white edges, a checkerboard, gradients and a specular-like white spot over noise."""
    g = torch.Generator().manual_seed(1234)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    img = torch.empty(3, size, size)
    img[0], img[1], img[2] = xx, yy, -xx * yy
    q = size // 4
    bars = torch.tensor([[1, 1, 1], [1, 1, -1], [-1, 1, 1], [-1, 1, -1], [1, -1, 1], [1, -1, -1], [-1, -1, 1],
                         [-1, -1, -1]], dtype=torch.float32)
    for i in range(8):
        img[:, :q, i * size // 8:(i + 1) * size // 8] = bars[i][:, None, None]
    check = (((torch.arange(size)[:, None] // 8) + (torch.arange(size)[None] // 8)) % 2).float() * 2 - 1
    img[:, q:2 * q, : size // 2] = check[q:2 * q, : size // 2]
    img[:, 2 * q:, size // 2:] = torch.rand(3, size - 2 * q, size - size // 2, generator=g) * 2 - 1
    spot = ((xx + 0.5) ** 2 + (yy - 0.6) ** 2 < 0.02).float()
    img = img * (1 - spot) + spot
    return img.clamp(-1, 1)[None].to(device)


@torch.no_grad()
def measure_peaks(model: AutoencoderKL, image: torch.Tensor, latents: Optional[torch.Tensor] = None
                  ) -> dict[nn.Module, float]:
    """Largest |output| of every module of ``model`` over an encode of ``image`` and a decode of ``latents``
    (default: the encoded image plus noise of the same std). Runs in the model's dtype (use fp32)."""
    peaks: dict[nn.Module, float] = {}

    def hook(mod: nn.Module, _inp: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            v = float(out.detach().abs().amax()) if out.numel() else 0.0
            peaks[mod] = max(peaks.get(mod, 0.0), v if math.isfinite(v) else math.inf)

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        z = model.encode(image)
        if latents is None:  # a local generator: never touch the caller's RNG state
            g = torch.Generator(device=z.device).manual_seed(0)
            noise = torch.randn(z.shape, generator=g, device=z.device, dtype=z.dtype)
            latents = torch.cat([z, noise * z.std()])
        model.decode(latents)
    finally:
        for h in handles:
            h.remove()
    return peaks


def _pow2_down(peak: float, target: float) -> float:
    if not math.isfinite(peak) or peak <= target:
        return 1.0 if math.isfinite(peak) else 2.0 ** -16
    return 2.0 ** -math.ceil(math.log2(peak / target))


def choose_scales(segments: list[Segment], peaks: dict[nn.Module, float], target: float = FIX_TARGET
                  ) -> tuple[list[float], dict[ResnetBlock, float]]:
    """Power-of-two factors bringing each segment's peak (writer outputs and conv2 outputs) and each conv1 output
    down to ``target``."""
    scales, conv1 = [], {}
    for seg in segments:
        mods = [seg.entry] + seg.members
        peak = 0.0
        for m in mods:
            peak = max(peak, peaks.get(m, 0.0))
            if isinstance(m, ResnetBlock):
                peak = max(peak, peaks.get(m.conv2, 0.0), peaks.get(m.nin_shortcut, 0.0) if m.nin_shortcut else 0.0)
                conv1[m] = _pow2_down(peaks.get(m.conv1, 0.0), target)
            elif isinstance(m, AttnBlock):
                peak = max(peak, peaks.get(m.proj_out, 0.0))
        scales.append(_pow2_down(peak, target))
    return scales, conv1


def fp16_fix_model(model: AutoencoderKL, sample: Optional[torch.Tensor] = None, target: float = FIX_TARGET
                   ) -> tuple[AutoencoderKL, float, float]:
    """A rescaled fp32 copy of ``model`` whose stream peaks on ``sample`` are ≤ ``target`` where shrinkable.

    Returns:
        ``(new_model, peak_before, peak_after)``: largest |module output| before and after, on the same input.
    """
    dev = next(model.parameters()).device
    fixed = copy.deepcopy(model).to(device=dev, dtype=torch.float32)
    image = (calibration_image(device=dev) if sample is None else sample.to(dev, torch.float32))
    before = measure_peaks(fixed, image)
    enc_segs, dec_segs = stream_segments(fixed)
    for segs, norm in ((enc_segs, fixed.encoder.norm_out), (dec_segs, fixed.decoder.norm_out)):
        scales, conv1 = choose_scales(segs, before, target)
        rescale_stream(segs, norm, scales, conv1)
    after = measure_peaks(fixed, image)
    return fixed, max(before.values()), max(after.values())


# ----------------------------------------------------------------------------------------------------------------
# dtype policy and NaN guard
# ----------------------------------------------------------------------------------------------------------------

def bf16_supported(device: torch.device) -> bool:
    """bf16 counts as supported where ``device`` runs it natively (:func:`vae_core.devices.bf16_native`: NVIDIA
    compute capability ≥ 8.0 or AMD CDNA2/RDNA3 and later, judged for that device), never emulated, never on CPU."""
    return bf16_native(device)


DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
                                  "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                                  "half": torch.float16, "float": torch.float32}
#: Every dtype string the pack accepts (the one vocabulary of load_vae, save_vae, Vae.to, the CLI and the hosts).
DTYPE_NAMES: tuple[str, ...] = tuple(DTYPES) + ("auto",)
_ACCEPTED = "'fp16', 'bf16', 'fp32' (or 'float16', 'bfloat16', 'float32', 'half', 'float'), 'auto' or a floating torch.dtype"


def parse_dtype(value: Union[str, torch.dtype, None], *, allow_auto: bool = True) -> Union[torch.dtype, str, None]:
    """The pack's one dtype parser.

    Args:
        value: a floating torch dtype, one of :data:`DTYPE_NAMES` (``"fp16"``, ``"bf16"``, ``"fp32"``, their
            ``torch`` spellings, ``"auto"``), or None.
        allow_auto: whether ``"auto"`` is meaningful to the caller (not for writing files).
    Returns:
        the torch dtype; the string ``"auto"`` (resolve it with :func:`resolve_dtype`); None for None.
    Raises:
        VaeInputError (a ValueError): anything else, naming the value and the accepted set.
    """
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        if not value.is_floating_point:
            raise VaeInputError(f"precision (dtype) {value}: not a floating-point dtype; expected one of {_ACCEPTED}")
        return value
    if isinstance(value, str):
        key = value.strip().lower()
        key = key[len("torch."):] if key.startswith("torch.") else key
        if key in DTYPES:
            return DTYPES[key]
        if key == "auto":
            if allow_auto:
                return "auto"
            raise VaeInputError(f"precision (dtype) {value!r}: 'auto' is not allowed here; expected 'fp16', 'bf16', 'fp32' or a "
                                "floating torch.dtype")
    raise VaeInputError(f"precision (dtype) {value!r}: unknown; expected one of {_ACCEPTED}")


def resolve_dtype(policy: Union[str, torch.dtype], device: torch.device) -> tuple[torch.dtype, bool]:
    """``"auto"``: bf16 where supported, else fp16 with the fix on CUDA, else fp32; any other :func:`parse_dtype`
    value as given. Returns ``(dtype, apply_fp16_fix)`` (the fix is automatic only under "auto").

    Raises:
        VaeInputError (a ValueError): ``policy`` is not a dtype :func:`parse_dtype` accepts (None included).
    """
    parsed = parse_dtype(policy)
    if parsed is None:
        raise VaeInputError(f"precision (dtype) None: expected one of {_ACCEPTED}")
    if isinstance(parsed, torch.dtype):
        return parsed, False
    if bf16_supported(device):
        return torch.bfloat16, False
    if device.type == "cuda":
        return torch.float16, True
    return torch.float32, False


def _rounds(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether casting ``src`` values to ``dst`` can change them (fp16 → bf16, fp32 → fp16, ...; not → fp32)."""
    if src == dst:
        return False
    return not (dst in (torch.float32, torch.float64) and torch.finfo(dst).bits >= torch.finfo(src).bits)


@dataclass
class GuardState:
    """Per-model memory of the NaN guard: whether it already logged, the dtype that worked, and ``pristine``: a CPU
    copy of the floating-point weights as they were before the guard's first rounding cast (taken only then, e.g.
    before an fp16 → bf16 retry), so every retry and every later cast starts from the weights the user loaded."""

    warned: bool = False
    working_dtype: Optional[torch.dtype] = None
    pristine: Optional[dict[str, torch.Tensor]] = None

    def cast(self, module: nn.Module, dtype: torch.dtype, keep: bool = True) -> None:
        """Cast ``module``'s floating-point parameters and buffers to ``dtype``: from :attr:`pristine` when it exists
        (taken first when this cast would round the current values and ``keep``: a retry's cast; a cast the user asks
        for keeps nothing), else in place as ``module.to`` does."""
        tensors = dict(module.named_parameters()) | dict(module.named_buffers())
        current = next((t.dtype for t in tensors.values() if t.is_floating_point()), dtype)
        if keep and self.pristine is None and _rounds(current, dtype):
            self.keep_weights(module)
        if self.pristine is None:
            module.to(dtype=dtype)
            return
        with torch.no_grad():
            for key, t in tensors.items():
                if key in self.pristine:
                    t.data = self.pristine[key].to(device=t.device, dtype=dtype)

    def keep_weights(self, module: nn.Module) -> None:
        """Take :attr:`pristine` now (e.g. outside a timed call) from ``module``'s current weights."""
        tensors = dict(module.named_parameters()) | dict(module.named_buffers())
        self.pristine = {k: t.detach().to("cpu", copy=True) for k, t in tensors.items() if t.is_floating_point()}

    def forget_weights(self) -> None:
        """Drop :attr:`pristine` (the weights it copied were replaced, e.g. a host module re-attached)."""
        self.pristine = None


def guarded(run: Callable[[torch.dtype], torch.Tensor], dtype: torch.dtype, device: torch.device,
            state: GuardState, what: str, describe_input: Callable[[], str]) -> tuple[torch.Tensor, torch.dtype]:
    """Run ``run(dtype)``; if any output element is non-finite, retry in bf16 (when native) then fp32.

    ``run`` casts its model to the dtype it is given with :meth:`GuardState.cast` (so a retry starts from the weights
    the user loaded, never from the rounded weights of an earlier retry). Returns ``(output, dtype_that_worked)``.
    Raises NonFiniteOutputError when fp32 fails too (the input is the cause). Logs one warning per model
    (``state``).
    """
    out = run(dtype)
    if bool(torch.isfinite(out).all()):
        return out, dtype
    tried = [dtype]
    for retry in (torch.bfloat16, torch.float32):
        if retry in tried or (retry == torch.bfloat16 and not bf16_supported(device)):
            continue
        if not state.warned:
            log.warning("%s produced NaN/inf in %s; retrying in %s and keeping that precision for this VAE", what,
                        str(dtype).replace("torch.", ""), str(retry).replace("torch.", ""))
            state.warned = True
        del out
        out = run(retry)
        tried.append(retry)
        if bool(torch.isfinite(out).all()):
            state.working_dtype = retry
            return out, retry
    raise NonFiniteOutputError(f"{what} produced NaN/inf even in float32: the input is the cause ({describe_input()})")
