"""AWQ GEMM arithmetic for one linear (docs/awq.md, "Decoding" and "Re-encoding").

A linear of ``in`` inputs and ``out`` outputs is stored as ``qweight`` int32 ``[in, out/8]``, ``qzeros`` int32
``[in/group, out/8]`` and ``scales`` fp16 ``[in/group, out]``. Eight 4-bit values share one int32 word along the
*output* axis, nibble ``i`` (bits ``4i..4i+3``) holding column ``ORDER[i]`` of the word's eight columns.

Decoding is AutoAWQ's ``dequantize_gemm`` bit for bit: ``(q - z) * s`` with ``q - z`` an exact small integer and
one rounding of the product to fp16 (that product of a 5-bit integer and an fp16 scale is exact in fp32, so
computing it in fp32 and rounding once gives the fp16 product's bits), then transposed to ``[out, in]``.
Encoding keeps ``scales`` and ``qzeros`` and puts each weight on the nearest point of that stored grid.
"""

from __future__ import annotations

import torch

from adaptools import plugin

BITS = 4
PACK = 32 // BITS
#: Nibble i of a word holds column ORDER[i] of its eight output columns.
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: Column c of a word's eight is nibble REVERSE[c] (the inverse permutation of ORDER).
REVERSE = tuple(ORDER.index(c) for c in range(PACK))
#: The shift that brings column c of a word's eight to the low nibble: straight to natural order.
_SHIFTS = torch.tensor([BITS * i for i in REVERSE], dtype=torch.int32)
#: Input rows decoded at a time: keeps the fp32 temporaries near 16 MB.
CHUNK = 1 << 22


def unpack(words: torch.Tensor) -> torch.Tensor:
    """``[rows, width]`` int32 words -> ``[rows, width * 8]`` int32 values 0..15 in natural column order."""
    nibbles = torch.bitwise_right_shift(words.to(torch.int32).unsqueeze(-1), _SHIFTS) & 0xF
    return nibbles.reshape(words.shape[0], -1)


def pack(values: torch.Tensor) -> torch.Tensor:
    """``[rows, cols]`` integers 0..15 (cols a multiple of 8) -> ``[rows, cols / 8]`` int32 words, nibble i of
    each word holding column ORDER[i] of its eight (two's complement for the top bit, as AutoAWQ's int32 shifts
    give)."""
    rows, cols = values.shape
    grouped = values.to(torch.int64).reshape(rows, cols // PACK, PACK)[..., list(ORDER)]
    shifts = torch.arange(0, 32, BITS, dtype=torch.int64)
    words = (grouped << shifts).sum(dim=-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _row_chunks(rows: int, cols: int, group: int) -> list[slice]:
    step = max(1, CHUNK // max(1, cols * group)) * group
    return [slice(r, min(rows, r + step)) for r in range(0, rows, step)]


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """The dense ``[out, in]`` fp16 weight as AutoAWQ's ``dequantize_gemm`` gives it (transposed): in the packed
    kernel when it is built (each output row is a stream of codes down a word column, column ``c`` of a word's
    eight in nibble ``REVERSE[c]``), else in torch; the same bits either way."""
    rows, cols = qweight.shape[0], scales.shape[1]
    zeros = unpack(qzeros)
    if plugin.packed_available():
        index = torch.arange(rows, dtype=torch.int64) // group
        return plugin.dequantize_packed(qweight.t(), BITS, (cols, rows), scales.t(), index, torch.float16, along=0,
                                        fields=REVERSE, zeros=zeros.t())
    out = torch.empty((cols, rows), dtype=torch.float16)
    for part in _row_chunks(rows, cols, group):
        first, last = part.start // group, -(-part.stop // group)
        values = unpack(qweight[part]).view(-1, group, cols)
        values = values - zeros[first:last].unsqueeze(1)
        product = values.to(torch.float32) * scales[first:last].to(torch.float32).unsqueeze(1)
        out[:, part] = product.reshape(-1, cols).t().to(torch.float16)
    return out


def quantize(dense: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """``qweight`` for ``dense`` ``[out, in]`` on the stored grid: each value's code is ``round(w / s) + z``
    (ties to even) in fp32, clamped to 0..15, then packed. A value the decode gives back exactly returns its
    stored code (docs/awq.md, "Re-encoding")."""
    cols, rows = dense.shape
    zeros = unpack(qzeros)
    out = torch.empty((rows, cols // PACK), dtype=torch.int32)
    for part in _row_chunks(rows, cols, group):
        first, last = part.start // group, -(-part.stop // group)
        weight = dense[:, part].t().to(torch.float32).reshape(-1, group, cols)
        codes = torch.round(weight / scales[first:last].to(torch.float32).unsqueeze(1))
        codes += zeros[first:last].unsqueeze(1)
        out[part] = pack(codes.clamp_(0, (1 << BITS) - 1).reshape(-1, cols))
    return out
