"""The one table of floating-point dtype names: what users type, what safetensors and config.json say.

Users type ``fp32``/``fp16``/``bf16``; safetensors headers say ``F32``/``F16``/``BF16``; config.json and
quant states say ``float32``/``float16``/``bfloat16``. Every module that translates between them uses
this table, so that the spellings cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FloatType:
    """One dense floating-point dtype under each of its names."""

    short: str  # what users type: fp32
    code: str  # safetensors dtype code: F32
    config: str  # config.json / quant-state name: float32
    torch: torch.dtype


FLOAT_TYPES = (
    FloatType("fp32", "F32", "float32", torch.float32),
    FloatType("fp16", "F16", "float16", torch.float16),
    FloatType("bf16", "BF16", "bfloat16", torch.bfloat16),
)
#: What ``--dtype`` accepts: ``auto`` keeps each tensor's dtype.
DTYPE_CHOICES = ("auto", *(t.short for t in FLOAT_TYPES))

_BY_SHORT = {t.short: t for t in FLOAT_TYPES}
_BY_CODE = {t.code: t for t in FLOAT_TYPES}
_BY_CONFIG = {t.config: t for t in FLOAT_TYPES}
_BY_TORCH = {t.torch: t for t in FLOAT_TYPES}


def by_short(name: str) -> FloatType:
    return _BY_SHORT[name]


def by_code(code: str) -> FloatType | None:
    """The float type stored under a safetensors code, or None for non-float codes (I64, U8, ...)."""
    return _BY_CODE.get(code)


def by_config(name: str) -> FloatType | None:
    """The float type a config.json or quant state names (``bfloat16``), or None."""
    return _BY_CONFIG.get(name)


def by_torch(dtype: torch.dtype) -> FloatType | None:
    return _BY_TORCH.get(dtype)


#: safetensors dtype code -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
for _code, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_code] = (getattr(torch, _attr), torch.empty((), dtype=getattr(torch, _attr)).element_size())
TORCH_TO_CODE = {torch_dtype: code for code, (torch_dtype, _) in DTYPES.items()}

