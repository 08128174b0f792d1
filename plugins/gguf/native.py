"""The GGUF kernel library (csrc/gguf_kernels.c): Q8_0 encoding and decoding with gguf-py's bytes and values,
measured at tens of times gguf-py's numpy code (docs/gguf.md, "The native codec"), which spent most of a
GGUF merge's time. ``ADAPTOOLS_GGUF_PURE_PYTHON=1`` turns it off; without it (no C compiler at install)
codec.py uses gguf-py.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as Q

from adaptools import plugin

#: The library's interface version (``adaptools_gguf_abi``).
ABI = 1
#: Values and bytes per Q8_0 block.
Q8_0_VALUES, Q8_0_BYTES = 32, 34
#: The types this library encodes and decodes.
TYPES = frozenset({Q.Q8_0})


def _load(here: Path | None = None) -> Any:
    lib = plugin.load_kernel(here or Path(__file__).resolve().parent, "_gguf_kernels", "adaptools_gguf", ABI)
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.adaptools_gguf_isa.restype = ctypes.c_int
    lib.adaptools_q8_0_encode.argtypes = [ptr, i64, i64, ptr]
    lib.adaptools_q8_0_encode.restype = None
    lib.adaptools_q8_0_decode.argtypes = [ptr, i64, i64, ptr]
    lib.adaptools_q8_0_decode.restype = None
    return lib


LIB = None if os.environ.get("ADAPTOOLS_GGUF_PURE_PYTHON") else _load()


def describe() -> str:
    if LIB is None:
        return "gguf-py (no native kernel; reinstall with a C compiler for a faster Q8_0)"
    return f"gguf-py, Q8_0 in a native kernel ({'avx2' if LIB.adaptools_gguf_isa() == 2 else 'baseline'})"


def encode_q8_0(values: np.ndarray) -> np.ndarray:
    """float32 values, the last dimension whole 32-value blocks -> uint8 ``[..., blocks * 34]``, as gguf-py's
    ``quants.quantize(values, Q8_0)``."""
    assert LIB is not None
    values = np.ascontiguousarray(values, dtype=np.float32)
    blocks = values.size // Q8_0_VALUES
    out = np.empty(blocks * Q8_0_BYTES, dtype=np.uint8)
    plugin.split(blocks, lambda b0, b1: LIB.adaptools_q8_0_encode(values.ctypes.data, b0, b1, out.ctypes.data))
    return out.reshape(*values.shape[:-1], values.shape[-1] // Q8_0_VALUES * Q8_0_BYTES)


def decode_q8_0(data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Q8_0 bytes -> float32 values in numpy ``shape``, as gguf-py's ``quants.dequantize``."""
    assert LIB is not None
    data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    blocks = data.size // Q8_0_BYTES
    out = np.empty(blocks * Q8_0_VALUES, dtype=np.float32)
    plugin.split(blocks, lambda b0, b1: LIB.adaptools_q8_0_decode(data.ctypes.data, b0, b1, out.ctypes.data))
    return out.reshape(shape)
