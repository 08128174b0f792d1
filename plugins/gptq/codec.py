"""GPTQ arithmetic for one linear weight (docs/gptq.md, "Packing", "Decoding" and "--requantize").

Codes of ``bits`` bits are packed into int32 words: ``qweight`` along the input dimension (a word holds
consecutive *rows* of the ``[in, out]`` code matrix), ``qzeros`` along the output dimension (consecutive
*columns* of ``[groups, out]``). 2-, 4- and 8-bit codes sit whole in a word, code ``i`` at bit ``i * bits``;
3-bit codes go 32 to three words, two of them split across a word boundary (:func:`unpack_rows` says where).

Decoding is GPTQModel's ``convert_gptq_file`` (its dequantizer of GPTQ safetensors) bit for bit: each code minus
its group's zero point, times its group's scale, in fp32, rounded once to the scale's dtype. Its torch kernel
multiplies in fp16 instead; with fp16 scales both give the same bits, since the fp32 product of an fp16 scale and
an integer below 2^9 is exact and is rounded once either way (docs/gptq.md, "Precision"). The tests compare with
the library on every fixture weight.

It is written here rather than called from GPTQModel, which needs torch 2.14, a build step and some thirty
packages; it is as fast and needs less than half the memory (docs/gptq.md, "Speed and memory").
"""

from __future__ import annotations

import torch

from adaptools import plugin

MASK32 = (1 << 32) - 1
#: Codes decoded at a time: int64 and fp32 temporaries of a few tens of MB.
CHUNK = 1 << 21


def chunk_rows(outputs: int) -> int:
    """Input rows per chunk: about :data:`CHUNK` codes, a multiple of 32 (so a 3-bit block never splits)."""
    return max(32, CHUNK // max(1, outputs) // 32 * 32)
#: 3-bit layout of 32 codes in three words: (word, bit) of each code's lowest bit, in code order.
_THREE = [(0, 3 * i) for i in range(11)] + [(1, 1 + 3 * i) for i in range(11)] + [(2, 2 + 3 * i) for i in range(10)]


def pack_factor(bits: int) -> int:
    """Codes per packed word for 2, 4 and 8 bits; 3-bit codes go 32 per three words."""
    return 32 // bits


def packed_rows(count: int, bits: int) -> int:
    """Words needed along the packed dimension for ``count`` codes (``count`` a whole number of words' codes)."""
    return count * bits // 32


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """``[rows * 32 / bits, cols]`` int32 codes from ``[rows, cols]`` int32 words packed along the rows."""
    if bits in (4, 8):  # whole bytes or nibbles: byte k of a word holds codes 2k, 2k+1 (4-bit) or k (8-bit)
        flat = words.contiguous().reshape(-1)  # flat: a size-1 dimension may keep any stride
        raw = flat.view(torch.uint8).view(words.shape[0], words.shape[1], 4).permute(0, 2, 1)
        if bits == 8:  # little-endian byte order (x86, ARM)
            return raw.reshape(-1, words.shape[1]).to(torch.int32)
        codes = torch.empty((words.shape[0], 4, 2, words.shape[1]), dtype=torch.int32)
        codes[:, :, 0] = raw & 0xF
        codes[:, :, 1] = raw >> 4
        return codes.view(-1, words.shape[1])
    wide = words.to(torch.int64) & MASK32
    if bits == 3:
        blocks = wide.reshape(-1, 3, wide.shape[1])
        stacked = torch.cat([blocks, torch.zeros_like(blocks[:, :1])], dim=1)  # a zero fourth word
        out = torch.empty((blocks.shape[0], 32, wide.shape[1]), dtype=torch.int64)
        for code, (word, bit) in enumerate(_THREE):  # a code at bit 30 or 31 continues in the next word
            out[:, code] = ((stacked[:, word] >> bit) | (stacked[:, word + 1] << (32 - bit))) & 0x7
        return out.reshape(-1, wide.shape[1]).to(torch.int32)
    factor = pack_factor(bits)
    shifts = (torch.arange(factor, dtype=torch.int64) * bits).view(1, factor, 1)
    return ((wide.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1, wide.shape[1]).to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of :func:`unpack_rows`: ``[n, cols]`` codes (``0 <= code < 2^bits``) into int32 words."""
    if bits in (4, 8):  # the byte view of unpack_rows, backwards
        cols = codes.shape[1]
        raw = codes.to(torch.uint8).view(-1, 4, 32 // bits // 4, cols)
        packed = raw[:, :, 0] if bits == 8 else raw[:, :, 0] | (raw[:, :, 1] << 4)
        return packed.permute(0, 2, 1).contiguous().reshape(-1).view(torch.int32).view(-1, cols)
    values = codes.to(torch.int64)
    if bits == 3:
        blocks = values.reshape(-1, 32, values.shape[1])
        words = torch.zeros((blocks.shape[0], 4, values.shape[1]), dtype=torch.int64)
        for code, (word, bit) in enumerate(_THREE):
            words[:, word] |= blocks[:, code] << bit
            if bit > 29:  # the high bits spill into the next word's low bits
                words[:, word + 1] |= blocks[:, code] >> (32 - bit)
        wide = (words[:, :3] & MASK32).reshape(-1, values.shape[1])
    else:
        factor = pack_factor(bits)
        shifts = (torch.arange(factor, dtype=torch.int64) * bits).view(1, factor, 1)
        wide = (values.reshape(-1, factor, values.shape[1]) << shifts).sum(dim=1) & MASK32
    return torch.where(wide >= 1 << 31, wide - (1 << 32), wide).to(torch.int32)


def unpack_cols(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes packed along the columns (``qzeros``)."""
    return unpack_rows(words.t(), bits).t()


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of :func:`unpack_cols`."""
    return pack_rows(codes.t(), bits).t().contiguous()


def zero_points(qzeros: torch.Tensor, bits: int, v1: bool) -> torch.Tensor:
    """``[groups, out]`` zero points. A ``gptq`` (v1) checkpoint stores each one minus one, in its own field:
    adding one back wraps within the field (a stored ``2^bits - 1`` is zero), as the reference does."""
    zeros = unpack_cols(qzeros, bits)
    return (zeros + 1) & ((1 << bits) - 1) if v1 else zeros


def dequantize(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
               bits: int) -> torch.Tensor:
    """The dense ``[out, in]`` weight in the scales' dtype: ``(code - zero[g]) * scale[g]`` for each input row's
    group ``g = g_idx[row]``, in fp32, rounded once to the scales' dtype (docs/gptq.md, "Precision"); in the
    packed kernel when it is built (each output row is the stream of codes down one word column), else in torch,
    the same bits either way."""
    inputs, outputs = g_idx.shape[0], scales.shape[1]
    if plugin.packed_available():
        return plugin.dequantize_packed(qweight.t(), bits, (outputs, inputs), scales.t(), g_idx, scales.dtype,
                                        zeros=zeros.t())
    out = torch.empty((inputs, outputs), dtype=scales.dtype)
    factors, offsets = scales.to(torch.float32), zeros.to(torch.float32)
    groups = g_idx.to(torch.long)
    step = chunk_rows(scales.shape[1])
    for first in range(0, inputs, step):
        last = min(inputs, first + step)
        codes = unpack_rows(qweight[packed_rows(first, bits): packed_rows(last, bits)], bits).to(torch.float32)
        rows = groups[first:last]
        out[first:last] = ((codes - offsets[rows]) * factors[rows]).to(scales.dtype)
    return out.t().contiguous()


def quantize(dense: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
             bits: int) -> torch.Tensor:
    """``qweight`` for a dense ``[out, in]`` weight on the stored grid (scales, zero points and g_idx unchanged):
    GPTQModel's packing expression ``round((w + zero * scale) / scale)`` in fp32, clamped to the codes' range.
    Rounding to the nearest grid point is all it does: no calibration (docs/gptq.md, "--requantize")."""
    inputs = g_idx.shape[0]
    words = torch.empty((packed_rows(inputs, bits), scales.shape[1]), dtype=torch.int32)
    factors, offsets = scales.to(torch.float32), zeros.to(torch.float32)
    groups = g_idx.to(torch.long)
    transposed = dense.t()
    step = chunk_rows(scales.shape[1])
    for first in range(0, inputs, step):
        last = min(inputs, first + step)
        rows = groups[first:last]
        scale = factors[rows]
        part = transposed[first:last].to(torch.float32)
        codes = torch.round((part + offsets[rows] * scale) / scale).clamp_(0, (1 << bits) - 1)
        words[packed_rows(first, bits): packed_rows(last, bits)] = pack_rows(codes.to(torch.int32), bits)
    return words
