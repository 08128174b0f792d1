"""The FP8 kernel library (csrc/fp8_kernels.c), loaded with ctypes, and the threads that share its work.

The same bits as the torch expressions in codec.py, in one pass over the codes instead of five (measured in
benchmarks/fp8.py --codec-only; docs/fp8.md, "The native kernel"). ``ADAPTOOLS_FP8_PURE_TORCH=1`` turns it
off; a build without a C compiler has none, and codec.py then runs the torch expressions.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import torch

from adaptools import plugin

#: The library's interface version (``adaptools_fp8_abi``); a library built from other sources is not called.
ABI = 3
#: The kernels' codes for the dense dtypes.
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _load(here: Path | None = None) -> Any:
    lib = plugin.load_kernel(here or Path(__file__).resolve().parent, "_fp8_kernels", "adaptools_fp8", ABI)
    if lib is None:
        return None
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.adaptools_fp8_isa.restype = c_int
    lib.adaptools_fp8_quantize.argtypes = [ptr, c_int, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, i64]
    lib.adaptools_fp8_quantize.restype = None
    return lib


LIB = None if os.environ.get("ADAPTOOLS_FP8_PURE_TORCH") else _load()


def describe() -> str:
    if LIB is None:
        return "torch (no native kernel: about ten times slower; reinstall with a C compiler)"
    return f"native kernel ({'avx2' if LIB.adaptools_fp8_isa() == 2 else 'baseline'})"


def dequantize(codes: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
               ) -> torch.Tensor:
    """codec.dequantize in the shared fp8 kernel (adaptools' ``dequantize_fp8``, which compressed-tensors' FP8
    weights use too); the caller checked that it is loaded and ``dtype`` is in KINDS."""
    return plugin.dequantize_fp8(codes, scale_inv.to(torch.float32), block, dtype)


def quantize(weight: torch.Tensor, block: tuple[int, int], grid: tuple[int, int]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale_inv, each tile's amax) as codec.quantize makes them; the caller refuses a non-finite amax
    or scale (the kernel writes NaN codes there)."""
    assert LIB is not None
    rows, cols = weight.shape
    weight = weight.contiguous()
    codes = torch.empty((rows, cols), dtype=torch.float8_e4m3fn)
    scale_inv = torch.empty(grid, dtype=torch.float32)
    amax = torch.empty(grid, dtype=torch.float32)

    def work(t0: int, t1: int) -> None:
        row = torch.empty(cols, dtype=torch.float32)  # the kernel's scratch row, one per thread
        LIB.adaptools_fp8_quantize(weight.data_ptr(), KINDS[weight.dtype], rows, cols, block[0], block[1], grid[1],
                                   codes.data_ptr(), scale_inv.data_ptr(), amax.data_ptr(), row.data_ptr(), t0, t1)

    plugin.split(grid[0], work)
    return codes, scale_inv, amax
