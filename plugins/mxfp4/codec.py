"""MXFP4 arithmetic (docs/mxfp4.md): a fused expert parameter stored as ``blocks [E, R, G, 16]`` uint8 (two FP4
e2m1 codes per byte, the low nibble first) and ``scales [E, R, G]`` uint8 (e8m0: the exponent plus 127), one
scale per 32 consecutive values along the last dense axis.

:func:`dequantize` gives transformers 5.25's ``convert_moe_packed_tensors`` (gpt-oss) bit for bit: each code
looked up in the 16-value table *in the model's dtype*, ``torch.ldexp`` by its block's exponent, the result
``[E, R, G·32]`` transposed to the dense ``[E, G·32, R]``. Rather than run ldexp over every value, it runs
ldexp once over all 16 codes x 256 exponent bytes (the same op on the same inputs, so the same bits: see
docs/mxfp4.md, "Decoding fast") and then only gathers from that table, one expert at a time, so that its
temporaries stay small and in cache.
"""

from __future__ import annotations

import torch

#: The value of each FP4 e2m1 code 0..15 (sign bit 8; exponent and mantissa in the low three bits).
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
#: Values per scale (one byte of blocks holds two).
BLOCK = 32
#: e8m0 exponent bias.
BIAS = 127

#: An integer type as wide as two values of each dense dtype: a byte's two values are gathered as one of these.
_PAIR = {2: torch.int32, 4: torch.int64}


def dense_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The dense parameter's shape for stored blocks ``[*prefix, R, G, 16]``: ``[*prefix, G·32, R]``."""
    *prefix, rows, groups, _ = blocks_shape
    return (*prefix, groups * BLOCK, rows)


def value_table(dtype: torch.dtype) -> torch.Tensor:
    """``[256 scale bytes, 16 codes]``: every value transformers can produce, made by the very op it runs
    (``torch.ldexp`` of the code's table value in ``dtype`` by ``scale - 127``), overflow and all."""
    values = torch.tensor(FP4_VALUES, dtype=dtype).expand(256, 16).contiguous()
    exponents = (torch.arange(256, dtype=torch.int32) - BIAS).reshape(256, 1)
    return torch.ldexp(values, exponents, out=values)


def _pair_table(dtype: torch.dtype) -> torch.Tensor:
    """``[scale byte · 256 + byte]``: the values of the byte's low and high nibble at that scale side by side,
    as one integer of ``_PAIR`` (for 8-byte dtypes, as ``[.., 2]`` values): one gather writes both values of a
    byte. 65,536 pairs: 256 KiB for bf16/fp16, 512 KiB for fp32."""
    values = value_table(dtype)
    byte = torch.arange(256)
    pairs = torch.stack([values[:, byte & 0x0F], values[:, byte >> 4]], 2).reshape(256 * 256, 2)
    pair = _PAIR.get(values.element_size())
    return pairs.view(pair).reshape(-1) if pair is not None else pairs


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense tensor (``dtype``) as transformers dequantizes ``blocks`` and ``scales``.

    Per expert: the gather index ``scale << 8 | byte``, one gather of the byte's two values into a
    ``[R, G·32]`` scratch (reused), and one transposing copy into the expert's ``[G·32, R]`` slice of the
    output; no temporary the size of the whole stack.
    """
    *prefix, rows, groups, width = blocks.shape
    table = _pair_table(dtype)
    stacked = blocks.to(torch.uint8).reshape(-1, rows * groups, width)
    shifted = (scales.to(torch.int32) << 8).reshape(-1, rows * groups, 1)
    out = torch.empty(stacked.shape[0], groups * width * 2, rows, dtype=dtype)
    index = torch.empty(rows * groups, width, dtype=torch.int32)
    scratch = torch.empty(rows, groups * width * 2, dtype=dtype)
    into = scratch.view(table.dtype).reshape(-1) if table.dim() == 1 else scratch.view(-1, 2)
    for expert in range(stacked.shape[0]):
        torch.add(shifted[expert], stacked[expert], out=index)
        torch.index_select(table, 0, index.reshape(-1), out=into)
        out[expert].copy_(scratch.T)
    return out.reshape(*prefix, groups * width * 2, rows)
