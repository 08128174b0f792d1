"""Fine-grained FP8 arithmetic: a 2-D weight stored as float8_e4m3fn values, one float32 ``scale_inv`` per
tile of ``block = (rows, cols)`` elements (docs/fp8.md).

- :func:`dequantize` is transformers 5.25's ``Fp8Dequantize._dequantize_one``, bit for bit: each value times
  its tile's ``scale_inv`` in fp32, then one cast to the model's dtype. It also reads partial tiles (sizes that are not
  multiples of the block), which transformers refuses, by the same rule over the elements the tile holds.
- :func:`quantize` is transformers 5.25's ``Fp8Quantize._quantize_one``, byte for byte: per tile the
  largest ``|w|`` in fp32, ``scale = 448 / amax`` as torch computes it, ``fp8(clamp(w · scale, ±448))``,
  ``scale_inv = 1 / scale``; an all-zero tile gets scale 1. Partial tiles follow the same rule (transformers
  leaves such weights unquantized).

Both work a few rows of tiles at a time, so a weight's fp32 temporaries stay near 16 MB.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from adaptools import plugin
from adaptools.plugin import InputError

from . import native

FP8 = torch.float8_e4m3fn
#: The largest float8_e4m3fn value (transformers' ``_FP8_MAX``, a Python float).
FP8_MAX = 448.0


def grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The scale grid of a ``[rows, cols]`` weight: tiles per column and per row, partial ones counted."""
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


#: Elements handled at a time (whole rows of tiles): fp32 temporaries of 16 MB, and few enough Python steps.
CHUNK = 1 << 22


def _tile_rows(shape: tuple[int, ...], block: tuple[int, int]) -> Iterator[tuple[slice, slice]]:
    """(rows of the weight, rows of the scale grid) for consecutive chunks of whole rows of tiles."""
    step = max(1, CHUNK // max(1, block[0] * shape[1]))
    tiles = -(-shape[0] // block[0])
    for first in range(0, tiles, step):
        last = min(tiles, first + step)
        yield slice(first * block[0], min(shape[0], last * block[0])), slice(first, last)


def _by_tile(values: torch.Tensor, height: int) -> list[tuple[torch.Tensor, slice]]:
    """``values`` (rows of tiles, the last maybe short) as ``[tiles, height, cols]`` views, each with the
    rows of the chunk's scale grid it covers."""
    whole = values.shape[0] // height
    parts = [(values[: whole * height].view(whole, height, values.shape[1]), slice(0, whole))] if whole else []
    if values.shape[0] > whole * height:
        parts.append((values[whole * height:].unsqueeze(0), slice(whole, whole + 1)))
    return parts


def _scale_tiles(values: torch.Tensor, per_tile: torch.Tensor, block: tuple[int, int]) -> None:
    """Multiply, in place, each tile of ``values`` (fp32, whole rows of tiles, the last row and column of tiles
    maybe partial) by its entry of ``per_tile`` (``[tile rows, tile columns]``)."""
    full, rest = divmod(values.shape[1], block[1])
    for part, rows in _by_tile(values, block[0]):
        scale = per_tile[rows]
        if full:
            part[..., : full * block[1]].view(part.shape[0], part.shape[1], full, block[1]).mul_(
                scale[:, None, :full, None])
        if rest:
            part[..., full * block[1]:].mul_(scale[:, None, full:])


def _tile_amax(values: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The largest ``|value|`` of each tile of ``values`` (as for :func:`_scale_tiles`): the larger of the
    largest value and minus the smallest, which is exact and needs no ``|values|`` temporary. NaN propagates."""
    full, rest = divmod(values.shape[1], block[1])
    rows = []
    for part, _ in _by_tile(values, block[0]):
        pieces = []
        if full:
            tiles = part[..., : full * block[1]].view(part.shape[0], part.shape[1], full, block[1])
            pieces.append(torch.maximum(tiles.amax(dim=(1, 3)), tiles.amin(dim=(1, 3)).neg_()))
        if rest:
            edge = part[..., full * block[1]:]
            pieces.append(torch.maximum(edge.amax(dim=(1, 2)), edge.amin(dim=(1, 2)).neg_()).unsqueeze(1))
        rows.append(torch.cat(pieces, dim=1) if pieces else part.new_zeros(part.shape[0], 0))
    return torch.cat(rows)


def widened(codes: torch.Tensor) -> torch.Tensor | None:
    """float8_e4m3fn codes as float32 values divided by 256, exactly, in 60 % of the time torch's own cast
    takes: a code's sign and 7 other bits, shifted into a float16's bit fields, spell ``value / 256`` for every
    finite code, subnormal ones included (docs/fp8.md, "Decoding (bit-identical to transformers)"). None when
    a NaN code (0x7F, 0xFF) is present, which this would read as ±1.875."""
    raw = codes.view(torch.int8)
    if bool((raw & 0x7F).eq_(0x7F).any()):
        return None
    bits = raw.to(torch.int16)  # sign-extended: the sign lands in bit 15 after the shift
    bits.bitwise_left_shift_(7).bitwise_and_(-16512)  # 0xBF80: the sign and the 7 shifted bits
    return bits.view(torch.float16).to(torch.float32)


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               dtype: torch.dtype) -> torch.Tensor:
    """The dense ``dtype`` value of an FP8 weight: ``fp32(w) · scale_inv[tile]`` rounded once to ``dtype``.

    Computed as ``(w / 256) · (scale_inv · 256)`` when both factors are exact (:func:`widened`; a scale below
    2^120): the real product, hence its rounding, is the same. The caller has checked that ``scale_inv`` has
    the grid's shape (:func:`grid`)."""
    if native.LIB is not None and plugin.packed_available() and dtype in native.KINDS and weight.dim() == 2:
        return native.dequantize(weight, scale_inv, block, dtype)
    out = torch.empty(tuple(weight.shape), dtype=dtype)
    for rows, tiles in _tile_rows(tuple(weight.shape), block):
        values, factors = widened(weight[rows]), scale_inv[tiles] * 256.0
        if values is None or not bool(torch.isfinite(factors).all()):
            values, factors = weight[rows].to(torch.float32), scale_inv[tiles]
        _scale_tiles(values, factors, block)
        out[rows] = values
    return out


def _refuse(amax: torch.Tensor, where: str) -> torch.Tensor:
    """Each tile's scale ``448 / amax`` (1 for an all-zero tile), after refusing what FP8 cannot store: NaN or
    Inf values, and a tile so small that the scale overflows."""
    if not bool(torch.isfinite(amax).all()):
        raise InputError("holds NaN or Inf values, which FP8 cannot store", tensor=where,
                         hint="merge into a 16-bit output instead")
    # transformers' expressions exactly: ``448.0 / t`` is torch's reciprocal(t) * 448 (two roundings)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    scales = torch.where(amax > 0, FP8_MAX / safe, torch.ones_like(safe))
    if not bool(torch.isfinite(scales).all()):
        raise InputError(f"a tile's largest |value| is {float(amax.min()):g}: 448 / amax overflows float32, "
                         "and FP8 would store NaN there", tensor=where, hint="merge into a 16-bit output instead")
    return scales


def quantize(weight: torch.Tensor, block: tuple[int, int],
             where: str = "<weight>") -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 ``scale_inv`` ``[grid]``) of a 2-D float weight, byte-identical to
    transformers' ``Fp8Quantize._quantize_one`` on whole tiles and the same rule on partial ones.

    Refuses NaN/Inf values and a tile whose largest ``|w|`` is so small (below about 1.3e-36) that
    ``448 / amax`` overflows: transformers would store a zero ``scale_inv`` and NaN values there."""
    if weight.dim() != 2:
        raise InputError(f"an FP8 weight must be 2-D, this one is {list(weight.shape)}", tensor=where)
    n_rows, n_cols = weight.shape
    if native.LIB is not None and weight.dtype in native.KINDS:
        codes, scale_inv, amax = native.quantize(weight, block, grid((n_rows, n_cols), block))
        _refuse(amax, where)
        return codes, scale_inv
    out = torch.empty((n_rows, n_cols), dtype=FP8)
    scale_inv = torch.empty(grid((n_rows, n_cols), block), dtype=torch.float32)
    for rows, span in _tile_rows((n_rows, n_cols), block):
        values = weight[rows].to(torch.float32, copy=True)
        amax = _tile_amax(values, block)
        scales = _refuse(amax, where)
        scale_inv[span] = (1.0 / scales).to(torch.float32)
        _scale_tiles(values, scales, block)
        out[rows] = values.clamp_(-FP8_MAX, FP8_MAX)
    return out, scale_inv
