"""Packed integer codes decoded in C: ``(code - zero) * scale`` per element, the zero point and scale picked per
column by an index (docs/plugins.md, "Packed integer codes").

Many quantized formats store small unsigned codes packed into int32 words and decode them by this one
expression; they differ only in where each code sits and how groups are indexed, which the caller says here.
The kernel (csrc/packed_kernels.c, built with the package) gives the bits of the torch expression
``((codes.float() - zeros) * scales).to(dtype)`` in one pass over the words, split over threads by result rows.
:data:`LIB` is None when no kernel is built or ``ADAPTOOLS_PACKED_PURE_TORCH=1`` is set; callers then run
their own torch path, which must give the same bits.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .kernels import load_kernel, split

#: The library's interface version (``adaptools_packed_abi``).
ABI = 2
#: The kernel's codes for the result dtypes.
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
#: int64 scratch entries per thread (4 x the kernel's TILE).
_SCRATCH = 4 * 512


def _load(here: Path | None = None) -> Any:
    lib = load_kernel(here or Path(__file__).resolve().parent, "_packed_kernels", "adaptools_packed", ABI)
    if lib is None:
        return None
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.adaptools_packed_isa.restype = c_int
    lib.adaptools_packed_dequantize.argtypes = [
        ptr, i64, i64, c_int, c_int, ptr, ptr, i64, i64, ptr, i64, i64, ctypes.c_float, ptr, i64, i64, c_int, ptr,
        ptr, i64, i64]
    lib.adaptools_packed_dequantize.restype = None
    lib.adaptools_packed_fp8.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i64, c_int, ptr, i64, i64]
    lib.adaptools_packed_fp8.restype = None
    lib.adaptools_packed_add.argtypes = [ptr, c_int, ptr, ptr, c_int, i64]
    lib.adaptools_packed_add.restype = i64
    return lib


LIB = None if os.environ.get("ADAPTOOLS_PACKED_PURE_TORCH") else _load()


def packed_available() -> bool:
    """Whether the kernel is loaded (else callers run their torch path)."""
    return LIB is not None


def describe_packed() -> str:
    """What ``adaptools plugins`` says of the packed-code path."""
    if LIB is None:
        return "torch (no native kernel: reinstall with a C compiler)"
    return f"native kernel ({'avx2' if LIB.adaptools_packed_isa() == 2 else 'baseline'})"


def _fields(bits: int, fields: Sequence[int] | None) -> torch.Tensor:
    per = 32 // bits if 32 % bits == 0 else 0
    order = list(range(per)) if fields is None else list(fields)
    if (per == 0 and fields is not None) or sorted(order) != list(range(per)):
        raise ValueError(f"fields {order} are no order of a word's {per} codes of {bits} bits")
    return torch.tensor(order or [0], dtype=torch.uint8)


def dequantize_packed(words: torch.Tensor, bits: int, shape: tuple[int, int], scales: torch.Tensor,
                      index: torch.Tensor, dtype: torch.dtype, *, along: int = 1,
                      fields: Sequence[int] | None = None, zeros: torch.Tensor | None = None,
                      offset: float = 0.0) -> torch.Tensor:
    """The ``shape`` (rows, cols) result ``((code - zero) * scale).to(dtype)``, the product in float32.

    ``words``: int32, a 2-D view (any strides) of ``[rows, w]`` words when ``along`` is 1 (each result row's
    codes form one stream along its columns) or ``[w, cols]`` when ``along`` is 0 (each result column's codes
    stream along the rows). Code ``p`` of a stream is in bit field ``fields[p % (32 / bits)]`` of word
    ``p // (32 / bits)`` (identity when None); 3-bit codes are a plain stream, code ``p`` at bit ``3p`` onwards,
    crossing words. ``scales`` and ``zeros`` are ``[rows, groups]`` views; column ``k`` uses group
    ``index[k]``; with no ``zeros`` every zero point is ``offset``. Requires :func:`packed_available`."""
    assert LIB is not None
    rows, cols = shape
    if bits not in (1, 2, 3, 4, 5, 6, 7, 8) or along not in (0, 1) or words.dtype != torch.int32 or words.dim() != 2:
        raise ValueError("dequantize_packed needs int32 words in two dimensions and 1 to 8 bits")
    stream = cols if along == 1 else rows
    needed = -(-stream * bits // 32)
    if tuple(words.shape) != ((rows, needed) if along == 1 else (needed, cols)):
        raise ValueError(f"{list(words.shape)} words cannot hold {rows}x{cols} codes of {bits} bits")
    groups = scales.shape[1]
    if scales.shape[0] != rows or (zeros is not None and tuple(zeros.shape) != tuple(scales.shape)):
        raise ValueError("scales and zeros must be [rows, groups]")
    index = index.to(torch.int64).contiguous()
    if index.shape != (cols,) or (cols and (int(index.min()) < 0 or int(index.max()) >= groups)):
        raise ValueError(f"index must name one of {groups} groups for each of {cols} columns")
    table = _fields(bits, fields)
    factors = scales.to(torch.float32)
    offsets = zeros.to(torch.float32) if zeros is not None else None
    if any(t is not None and groups * t.stride(1) >= 1 << 31 for t in (factors, offsets)):
        raise ValueError("a row of scales or zero points spans more than 2^31 elements")  # the kernel's offsets
    out = torch.empty(shape, dtype=dtype)
    kind = KINDS[dtype]

    def work(n0: int, n1: int) -> None:
        scratch = torch.empty(_SCRATCH, dtype=torch.int64)
        LIB.adaptools_packed_dequantize(
            words.data_ptr(), words.stride(0), words.stride(1), along, bits, table.data_ptr(),
            factors.data_ptr(), factors.stride(0), factors.stride(1),
            offsets.data_ptr() if offsets is not None else None,
            offsets.stride(0) if offsets is not None else 0, offsets.stride(1) if offsets is not None else 0,
            float(offset), index.data_ptr(), rows, cols, kind, out.data_ptr(), scratch.data_ptr(), n0, n1)

    if words.numel() and rows and cols:
        split(rows, work)
    return out


@functools.cache
def fp8_values() -> torch.Tensor:
    """The 256 float8_e4m3fn codes' float32 values, as torch converts them (NaN for 0x7F and 0xFF)."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)


def dequantize_fp8(codes: torch.Tensor, scales: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
                   ) -> torch.Tensor:
    """The ``[rows, cols]`` result ``(codes.float() * scale).to(dtype)``, one scale per ``block`` tile from the
    row-major grid ``scales`` (``[ceil(rows / block[0]), ceil(cols / block[1])]``, any float dtype, widened to
    float32). The same bits as that torch expression, and as the product computed in a 16-bit ``dtype`` with
    16-bit scales (docs/plugins.md, "FP8 codes"). Requires :func:`packed_available`."""
    assert LIB is not None
    rows, cols = codes.shape
    brow, bcol = max(1, block[0]), max(1, block[1])
    grid = (-(-rows // brow), -(-cols // bcol))
    if codes.dtype != torch.float8_e4m3fn or codes.dim() != 2 or tuple(scales.shape) != grid:
        raise ValueError(f"dequantize_fp8 needs 2-D float8_e4m3fn codes and a {list(grid)} scale grid")
    codes, factors = codes.contiguous(), scales.to(torch.float32).contiguous()
    out = torch.empty((rows, cols), dtype=dtype)
    table = fp8_values()
    kind = KINDS[dtype]

    def work(t0: int, t1: int) -> None:
        LIB.adaptools_packed_fp8(codes.data_ptr(), factors.data_ptr(), table.data_ptr(), rows, cols, brow, bcol,
                                 grid[1], kind, out.data_ptr(), t0, t1)

    if rows and cols:
        split(grid[0], work)
    return out


def add_rounded(base: torch.Tensor, delta: torch.Tensor, out: torch.Tensor) -> int:
    """``out = (base.float() + delta).to(out.dtype)`` in one pass, returning how many results are not finite
    (then compute it again in torch: NaN payloads are torch's to choose). Contiguous tensors of the same number
    of elements; ``delta`` float32, ``base`` and ``out`` of :data:`KINDS`. Requires :func:`packed_available`."""
    assert LIB is not None
    if not (base.is_contiguous() and delta.is_contiguous() and out.is_contiguous()) or delta.dtype != torch.float32 \
            or not base.numel() == delta.numel() == out.numel():
        raise ValueError("add_rounded needs contiguous tensors of one size and a float32 delta")
    return int(LIB.adaptools_packed_add(base.data_ptr(), KINDS[base.dtype], delta.data_ptr(), out.data_ptr(),
                                        KINDS[out.dtype], base.numel()))
