"""MXFP4 arithmetic (docs/mxfp4.md): a fused expert parameter stored as ``blocks [E, R, G, 16]`` uint8 (two FP4
e2m1 codes per byte, the low nibble first) and ``scales [E, R, G]`` uint8 (e8m0: the exponent plus 127), one
scale per 32 consecutive values along the last dense axis.

:func:`dequantize` is transformers 5.25's ``convert_moe_packed_tensors`` (gpt-oss), bit for bit: each code
looked up in the 16-value table *in the model's dtype*, then ``torch.ldexp`` by its block's exponent in that
dtype, and the result ``[E, R, G·32]`` transposed to the dense ``[E, G·32, R]``. It works a few experts at a
time, so its temporaries stay small.
"""

from __future__ import annotations

import torch

#: The value of each FP4 e2m1 code 0..15 (sign bit 8; exponent and mantissa in the low three bits).
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
#: Values per scale (one byte of blocks holds two).
BLOCK = 32
#: e8m0 exponent bias.
BIAS = 127
#: Stored rows (experts x R x G) decoded at a time.
CHUNK_ROWS = 1 << 16


def dense_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The dense parameter's shape for stored blocks ``[*prefix, R, G, 16]``: ``[*prefix, G·32, R]``."""
    *prefix, rows, groups, _ = blocks_shape
    return (*prefix, groups * BLOCK, rows)


#: An integer type as wide as two values of each dense dtype: a byte's two values are gathered as one of these.
_PAIR = {2: torch.int32, 4: torch.int64}


def _byte_table(dtype: torch.dtype) -> torch.Tensor:
    """For each byte 0..255, the values of its low and high nibble side by side, as one integer of ``_PAIR``:
    one gather then writes both values of a byte (ten times faster than two nibble lookups written at a
    stride; the values, hence the bits, are the same table's)."""
    lut = torch.tensor(FP4_VALUES, dtype=dtype)
    byte = torch.arange(256)
    return torch.stack([lut[byte & 0x0F], lut[byte >> 4]], 1).view(_PAIR[lut.element_size()]).reshape(256)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense tensor (``dtype``) as transformers dequantizes ``blocks`` and ``scales``."""
    *prefix, rows, groups, width = blocks.shape
    lut = torch.tensor(FP4_VALUES, dtype=dtype)
    table = _byte_table(dtype) if lut.element_size() in _PAIR else None
    flat_blocks = blocks.to(torch.uint8).reshape(-1, width)
    flat_exp = (scales.to(torch.int32) - BIAS).reshape(-1, 1)
    out = torch.empty(flat_blocks.shape[0], width * 2, dtype=dtype)
    for r0 in range(0, flat_blocks.shape[0], CHUNK_ROWS):
        r1 = min(r0 + CHUNK_ROWS, flat_blocks.shape[0])
        blk, sub = flat_blocks[r0:r1], out[r0:r1]
        if table is not None:
            torch.index_select(table, 0, blk.reshape(-1).to(torch.int32), out=sub.view(table.dtype).reshape(-1))
        else:
            sub[:, 0::2] = lut[(blk & 0x0F).to(torch.int)]
            sub[:, 1::2] = lut[(blk >> 4).to(torch.int)]
        torch.ldexp(sub, flat_exp[r0:r1], out=sub)
    return out.reshape(*prefix, rows, groups * width * 2).transpose(-2, -1).contiguous()
