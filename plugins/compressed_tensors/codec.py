"""compressed-tensors arithmetic for one weight (docs/compressed-tensors.md, "Decoding" and "Encoding").

Decoding is the library's ``decompress`` bit for bit: each stored integer (minus its zero point) or fp8 value
times its scale, computed as the library does in the scale's dtype, where the integers and their differences are
exact (the tests compare with the library on every fixture weight and on random scales).

The decoder is written here, not called from the library, for these reasons, measured by
benchmarks/ct_bases.py (docs/compressed-tensors.md, "Speed and memory"): importing ``compressed_tensors`` takes
6-10 s (it imports transformers) on every CLI start, and would make the library a runtime dependency; its
``decompress`` works on a whole weight at once (peak memory above the stored 8192x8192 weight: 362 / 320 / 1505
MiB for int4 groups / fp8 channels / NVFP4, against 217 / 211 / 299 MiB here, a few rows at a time). Its speed
is comparable (within a factor of three either way on a busy 2-CPU machine).

Encoding (``--requantize``) writes the library's own expressions in the same dtypes (``calculate_qparams`` from
the weight's minima and maxima, as llm-compressor's min-max observer feeds it, then ``quantize``), so its bytes
are the library's.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from adaptools import plugin

from .layout import Layout, Scheme

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
#: Elements handled at a time: fp32 temporaries of 16 MB.
CHUNK = 1 << 22


def row_chunks(shape: tuple[int, int], multiple: int = 1) -> Iterator[slice]:
    """Consecutive row ranges of about :data:`CHUNK` elements, each a whole number of ``multiple`` rows."""
    step = max(1, CHUNK // max(1, shape[1] * multiple)) * multiple
    for first in range(0, shape[0], step):
        yield slice(first, min(shape[0], first + step))


def unpack(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """``[rows, cols]`` unsigned ``bits``-bit values packed densely into each row's int32 words, value ``j``
    at bits ``j * bits`` onwards of the row (little end first), possibly across two words."""
    rows = words.shape[0]
    if bits == 8 or bits == 4:  # whole bytes or nibbles: no value crosses a byte
        raw = words.contiguous().view(torch.uint8).view(rows, -1)  # little-endian byte order (x86, ARM)
        if bits == 8:
            return raw[:, :cols].to(torch.int32)
        return torch.stack((raw & 0xF, raw >> 4), dim=-1).view(rows, -1)[:, :cols].to(torch.int32)
    wide = words.to(torch.int64) & 0xFFFFFFFF
    wide = torch.cat([wide, wide.new_zeros(rows, 1)], dim=1)
    start = torch.arange(cols, dtype=torch.int64) * bits
    word, offset = start // 32, start % 32
    values = (wide[:, word] >> offset) | (wide[:, word + 1] << (32 - offset))
    return (values & ((1 << bits) - 1)).to(torch.int32)


def padding_is_zero(words: torch.Tensor, layout: Layout) -> bool:
    """Whether the bits after the last value of each packed row are zero, as the library pads them: a
    ``weight_shape`` naming fewer columns than were packed fails this."""
    used = layout.shape[1] * layout.scheme.bits % 32
    if not used or words.shape[1] == 0:
        return True
    tail = (words[:, -1].to(torch.int64) & 0xFFFFFFFF) >> used
    return not bool(tail.any())


def zero_points(stored: torch.Tensor, scheme: Scheme, shape: tuple[int, int]) -> torch.Tensor:
    """The zero points as signed values of the scale's shape (pack-quantized packs them along the rows for
    group and channel strategies only, as the library does; layout.checked holds every other one to I8)."""
    if scheme.format == "pack-quantized" and scheme.strategy in ("group", "channel"):
        return unpack(stored.t(), scheme.bits, shape[0]).t() - (1 << (scheme.bits - 1))
    return stored.to(torch.int32)


def _expand(values: torch.Tensor, rows: slice, scheme: Scheme, cols: int) -> torch.Tensor:
    """Per-element values (scales or zero points) for ``rows`` of the weight, from the strategy's grid."""
    if scheme.strategy == "tensor":
        return values.reshape(1, 1)
    if scheme.strategy == "channel":
        return values[rows]
    if scheme.strategy == "group":
        return values[rows].repeat_interleave(scheme.group_size, dim=1)
    height, width = scheme.block
    grid = values[rows.start // height: -(-rows.stop // height)]
    full = grid.repeat_interleave(height, dim=0).repeat_interleave(width, dim=1)
    first = rows.start - (rows.start // height) * height
    return full[first: first + rows.stop - rows.start, :cols]


def _codes(layout: Layout, weight: torch.Tensor, rows: slice, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """The stored values of ``rows`` in ``dtype`` (integers of up to 8 bits and fp8 values are exact in bf16,
    fp16 and fp32), and the offset still to subtract (packed values are stored ``2^(bits-1)`` above the signed
    value)."""
    scheme, cols = layout.scheme, layout.shape[1]
    if scheme.format != "pack-quantized":
        return weight[rows].to(dtype), 0.0
    if scheme.bits == 4:  # two nibbles a byte, low first: straight to floats, no integer temporaries
        raw = weight[rows].contiguous().view(torch.uint8).view(rows.stop - rows.start, -1)
        pairs = torch.empty((raw.shape[0], raw.shape[1], 2), dtype=dtype)
        pairs[..., 0] = raw & 0xF
        pairs[..., 1] = raw >> 4
        return pairs.view(raw.shape[0], -1)[:, :cols], 8.0
    return unpack(weight[rows], scheme.bits, cols).to(dtype), float(1 << (scheme.bits - 1))


def dequantize(layout: Layout, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               dtype: torch.dtype) -> torch.Tensor:
    """The dense weight as the library decompresses it: ``(q - zp) * scale`` in ``dtype`` (the scale's), the
    same operations in the same dtype: the integers and their differences are exact there, and the product
    is rounded once."""
    scheme, shape = layout.scheme, layout.shape
    factors = scale.to(dtype)
    offsets = zero_points(zero, scheme, shape).to(dtype) if zero is not None else None
    if scheme.format == "pack-quantized" and scheme.strategy in ("group", "channel") and plugin.packed_available():
        # the packed kernel: each row one stream of codes, stored 2^(bits-1) above the signed value
        unsigned = float(1 << (scheme.bits - 1))
        size = scheme.group_size if scheme.strategy == "group" else shape[1] or 1
        index = torch.arange(shape[1], dtype=torch.int64) // size
        return plugin.dequantize_packed(weight, scheme.bits, shape, factors, index, dtype,
                                        zeros=offsets + unsigned if offsets is not None else None, offset=unsigned)
    if (weight.dtype == FP8 and offsets is None and dtype in (torch.float32, torch.bfloat16, torch.float16)
            and plugin.packed_available()):
        # fp8 codes times a scale per tile in the shared kernel: the same bits as ``codes.to(dtype) * scale`` in
        # ``dtype`` (docs/compressed-tensors.md, "Decoding"); torch's float8 conversion alone was 5 s of a 1.1B
        tile = {"tensor": shape, "channel": (1, shape[1]), "group": (1, scheme.group_size)}.get(
            scheme.strategy, scheme.block)
        grid = (-(-shape[0] // max(1, tile[0])), -(-shape[1] // max(1, tile[1])))
        return plugin.dequantize_fp8(weight, factors.reshape(grid), tile, dtype)
    out = torch.empty(shape, dtype=dtype)
    for rows in row_chunks(shape, scheme.block[0] or 1):
        values, unsigned = _codes(layout, weight, rows, dtype)
        if scheme.strategy == "group":  # a view per group: the scales broadcast, nothing is expanded
            grouped = values.view(values.shape[0], -1, scheme.group_size) if values.is_contiguous() else (
                values.reshape(values.shape[0], -1, scheme.group_size))
            shift = offsets[rows] + unsigned if offsets is not None else None
            if shift is not None:
                grouped -= shift.unsqueeze(-1)
            elif unsigned:
                grouped -= unsigned
            grouped *= factors[rows].unsqueeze(-1)
            out[rows] = grouped.view(values.shape[0], -1) if grouped.is_contiguous() else grouped.reshape(
                values.shape[0], -1)
            continue
        if unsigned:
            values = values - unsigned
        if offsets is not None:
            values -= _expand(offsets, rows, scheme, shape[1])
        values *= _expand(factors, rows, scheme, shape[1])
        out[rows] = values
    return out


#: The magnitudes of fp4 e2m1 codes 0-7; bit 3 is the sign.
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


#: For each byte 0..255, the fp32 values of its low and high nibble side by side, read as one int64: one gather
#: then writes both values of a byte, where indexing the 16-value table per nibble (two int64 index tensors and a
#: stacked copy) cost most of the decode (docs/compressed-tensors.md, "Speed and memory"). The values, hence
#: the bits, are :data:`E2M1`'s.
_BYTES = torch.arange(256)
_E2M1_PAIRS = torch.stack([E2M1[_BYTES & 0xF], E2M1[_BYTES >> 4]], 1).view(torch.int64).reshape(256)


def dequantize_nvfp4(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """An NVFP4 weight as the library decompresses it, in bf16: two fp4 codes per byte (low nibble first),
    each group of 16 times ``fp32(scale) / global_scale`` (one fp32 division, then one fp32 product), the
    result rounded to bf16."""
    rows, cols = packed.shape[0], packed.shape[1] * 2
    out = torch.empty((rows, cols), dtype=torch.bfloat16)
    factors = scale.to(torch.bfloat16).to(torch.float32) / global_scale.to(torch.float32)
    parts = list(row_chunks((rows, cols)))
    first = parts[0].stop - parts[0].start if parts else 0
    values = torch.empty(first * cols, dtype=torch.float32)  # one scratch for every chunk (the first is the largest)
    for part in parts:
        codes = packed[part].reshape(-1)
        chunk = values[:codes.numel() * 2]
        torch.index_select(_E2M1_PAIRS, 0, codes.to(torch.int32), out=chunk.view(torch.int64))
        grouped = chunk.view(-1, cols // 16, 16)
        grouped *= factors[part].unsqueeze(-1)
        out[part] = grouped.view(-1, cols)
    return out


def _reduce(dense: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Minima and maxima per scale, in the weight's dtype (llm-compressor's min-max observer)."""
    if scheme.strategy == "tensor":
        return dense.amin().reshape(1), dense.amax().reshape(1)
    if scheme.strategy == "channel":
        return dense.amin(dim=1, keepdim=True), dense.amax(dim=1, keepdim=True)
    if scheme.strategy == "group":
        grouped = dense.reshape(dense.shape[0], dense.shape[1] // scheme.group_size, scheme.group_size)
        return grouped.amin(dim=-1), grouped.amax(dim=-1)
    height, width = scheme.block
    rows, cols = dense.shape
    padded = torch.nn.functional.pad(dense, (0, -cols % width, 0, -rows % height))
    blocks = padded.reshape(padded.shape[0] // height, height, padded.shape[1] // width, width)
    return blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))


def _range(scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    if scheme.kind == "float":
        return torch.tensor(-FP8_MAX), torch.tensor(FP8_MAX)
    span = 2.0 ** scheme.bits
    return torch.tensor(-span / 2), torch.tensor(span / 2 - 1)


def qparams(dense: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) as ``calculate_qparams`` makes them from the weight's minima and maxima, in the
    weight's dtype; the zero point as int8 (float schemes: zeros of the scale's dtype)."""
    low, high = _reduce(dense, scheme)
    low, high = torch.min(low, torch.zeros_like(low)), torch.max(high, torch.zeros_like(high))
    q_min, q_max = _range(scheme)
    span = q_max - q_min
    if scheme.symmetric:
        scale = torch.max(low.abs(), high.abs()) / (span.to(high.dtype) / 2)
        zero = torch.zeros(scale.shape, dtype=low.dtype)
    else:
        scale = (high - low) / span.to(high.dtype)
        zero = torch.clamp(q_min - (low / scale), q_min, q_max)
    eps = torch.finfo(scale.dtype).eps
    scale = torch.where(scale == 0, torch.tensor(eps, dtype=scale.dtype), scale)
    if scheme.kind == "float":
        return scale, torch.clamp(zero, -FP8_MAX, FP8_MAX).to(FP8)
    return scale, torch.round(torch.clamp(zero, -128, 127)).to(torch.int8)


def quantize(dense: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """The stored values (fp8 or int8 codes, ``[rows, cols]``) as the library's ``quantize`` makes them:
    ``x / scale + zp`` in the weight's dtype, clamped, rounded (fp8: a cast; int: ``round``)."""
    q_min, q_max = _range(scheme)
    out = torch.empty(dense.shape, dtype=FP8 if scheme.kind == "float" else torch.int8)
    for rows in row_chunks((dense.shape[0], dense.shape[1]), scheme.block[0] or 1):
        part = dense[rows]
        scaled = part / _expand(scale, rows, scheme, dense.shape[1])
        scaled += _expand(zero, rows, scheme, dense.shape[1]).to(part.dtype)
        clamped = torch.clamp(scaled, q_min, q_max)
        rounded = clamped.to(FP8) if scheme.kind == "float" else torch.round(clamped)
        out[rows] = rounded.to(part.dtype).to(out.dtype)
    return out


def nvfp4_qparams(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 group scales already on the fp8 grid, fp32 global scale ``[1]``) as llm-compressor makes them with
    the library's NVFP4 preset: ``generate_gparam`` from the weight's minimum and maximum, then
    ``calculate_qparams`` per group of 16 with that global scale and fp8 scales (a zero scale becomes 0.125)."""
    low, high = dense.amin(), dense.amax()
    top = torch.max(torch.min(low, torch.zeros_like(low)).abs(), torch.max(high, torch.zeros_like(high)).abs())
    top = torch.clamp(top, min=torch.finfo(top.dtype).tiny)
    glob = torch.nan_to_num(FP8_MAX * 6.0 / top, nan=1.0, posinf=1.0, neginf=1.0).to(torch.float32).reshape([1])
    grouped = dense.reshape(dense.shape[0], dense.shape[1] // 16, 16)
    low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
    low, high = torch.min(low, torch.zeros_like(low)), torch.max(high, torch.zeros_like(high))
    span = torch.tensor(6.0) - torch.tensor(-6.0)
    scale = glob * (torch.max(low.abs(), high.abs()) / (span.to(high.dtype) / 2))
    scale = torch.clamp(scale, -FP8_MAX, FP8_MAX).to(FP8).to(scale.dtype)
    return torch.where(scale == 0, torch.tensor(0.125, dtype=scale.dtype), scale), glob


def _round_fp4(x: torch.Tensor) -> torch.Tensor:
    """The library's CPU ``cast_to_fp4``: the nearest fp4 e2m1 value by its thresholds (ties as it breaks them)."""
    sign = torch.sign(x)
    x = torch.abs(x)
    x[(x >= 0.0) & (x <= 0.25)] = 0.0
    x[(x > 0.25) & (x < 0.75)] = 0.5
    x[(x >= 0.75) & (x <= 1.25)] = 1.0
    x[(x > 1.25) & (x < 1.75)] = 1.5
    x[(x >= 1.75) & (x <= 2.5)] = 2.0
    x[(x > 2.5) & (x < 3.5)] = 3.0
    x[(x >= 3.5) & (x <= 5.0)] = 4.0
    x[x > 5.0] = 6.0
    return x * sign


def quantize_nvfp4(dense: torch.Tensor, scale: torch.Tensor, glob: torch.Tensor) -> torch.Tensor:
    """``weight_packed`` as the library's compressor makes it on the CPU: ``x / (scale / global)`` in fp32,
    clamped to ±6, rounded to fp4 (:func:`_round_fp4`), through the weight's dtype, then each value's code
    (sign bit 3, magnitude index 0-7) packed two per byte, the even column low."""
    rows, cols = dense.shape
    out = torch.empty((rows, cols // 2), dtype=torch.uint8)
    factors = scale / glob
    for part in row_chunks((rows, cols)):
        grouped = dense[part].reshape(-1, cols // 16, 16)
        values = _round_fp4(torch.clamp(grouped / factors[part].unsqueeze(-1), -6.0, 6.0))
        values = values.reshape(-1, cols).to(dense.dtype)
        sign = torch.signbit(values).to(torch.uint8)
        doubled = (values * 2).to(torch.int8).abs_()
        codes = torch.zeros_like(doubled, dtype=torch.uint8)
        for index, twice in enumerate((1, 2, 3, 4, 6, 8), start=1):
            codes[doubled == twice] = index
        codes[doubled >= 12] = 7
        codes = (codes | (sign << 3)).reshape(-1, 2)
        out[part] = (codes[:, 0] | (codes[:, 1] << 4)).reshape(-1, cols // 2)
    return out
