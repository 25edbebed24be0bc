"""The pack's one dtype vocabulary and policy: :data:`DTYPES` (the table every host, the CLI and the loader use),
:func:`parse_dtype`, and :func:`resolve_dtype` for ``"auto"`` (bf16 where the device runs it natively, fp16 with the
fp16 fix on CUDA without bf16, fp32 on CPU)."""
from __future__ import annotations

from typing import Union

import torch

from ..devices import bf16_native
from ..errors import VaeInputError

__all__ = ["DTYPES", "DTYPE_NAMES", "HOST_CHOICES", "bf16_supported", "parse_dtype", "resolve_dtype"]


def bf16_supported(device: torch.device) -> bool:
    """bf16 counts as supported where ``device`` runs it natively (:func:`vae_core.devices.bf16_native`: NVIDIA
    compute capability ≥ 8.0 or AMD CDNA2/RDNA3 and later, judged for that device), never emulated, never on CPU."""
    return bf16_native(device)


DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
                                  "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                                  "half": torch.float16, "float": torch.float32}


#: The short names hosts offer in their precision menus (ComfyUI nodes, the lab), each a key of :data:`DTYPES`.
HOST_CHOICES: tuple[str, ...] = ("fp16", "bf16", "fp32")
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
