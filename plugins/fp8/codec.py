"""Fine-grained FP8 arithmetic: a 2-D weight stored as float8_e4m3fn values, one float32 ``scale_inv`` per
tile of ``block = (rows, cols)`` elements (docs/fp8.md).

- :func:`dequantize` is transformers 5.25's ``Fp8Dequantize._dequantize_one``: each value times its tile's
  ``scale_inv`` in fp32, then one cast to the model's dtype. It also reads partial tiles (sizes that are not
  multiples of the block), which transformers refuses, by the same rule over the elements the tile holds.
- :func:`quantize` is transformers 5.25's ``Fp8Quantize._quantize_one``, byte for byte: per tile the
  largest ``|w|`` in fp32, ``scale = 448 / amax`` as torch computes it, ``fp8(clamp(w · scale, ±448))``,
  ``scale_inv = 1 / scale``; an all-zero tile gets scale 1. Partial tiles follow the same rule (transformers
  leaves such weights unquantized).

Both work one row of tiles at a time, so a weight's fp32 temporaries stay at ``block[0]`` rows.
"""

from __future__ import annotations

import torch

from adaptools.plugin import InputError

FP8 = torch.float8_e4m3fn
#: The largest float8_e4m3fn value (transformers' ``_FP8_MAX``, a Python float).
FP8_MAX = 448.0


def grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The scale grid of a ``[rows, cols]`` weight: tiles per column and per row, partial ones counted."""
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def _scale_tiles(values: torch.Tensor, per_tile: torch.Tensor, width: int) -> None:
    """Multiply, in place, each tile column of ``values`` (``[rows, cols]`` fp32, one row of tiles) by its
    entry of ``per_tile``; the last tile may be narrower than ``width``."""
    full, rest = divmod(values.shape[1], width)
    if full:
        values[:, : full * width].view(values.shape[0], full, width).mul_(per_tile[:full, None])
    if rest:
        values[:, full * width:].mul_(per_tile[full])


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               dtype: torch.dtype) -> torch.Tensor:
    """The dense ``dtype`` value of an FP8 weight: ``fp32(w) · scale_inv[tile]`` rounded once to ``dtype``.

    The caller has checked that ``scale_inv`` has the grid's shape (:func:`grid`)."""
    rows, height = weight.shape[0], block[0]
    out = torch.empty(tuple(weight.shape), dtype=dtype)
    for i in range(scale_inv.shape[0]):
        span = slice(i * height, min(rows, (i + 1) * height))
        values = weight[span].to(torch.float32)
        _scale_tiles(values, scale_inv[i], block[1])
        out[span] = values
    return out


def quantize(weight: torch.Tensor, block: tuple[int, int],
             where: str = "<weight>") -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 ``scale_inv`` ``[grid]``) of a 2-D float weight, byte-identical to
    transformers' ``Fp8Quantize._quantize_one`` on whole tiles and the same rule on partial ones.

    Refuses NaN/Inf values and a tile whose largest ``|w|`` is so small (below about 1.3e-36) that
    ``448 / amax`` overflows: transformers would store a zero ``scale_inv`` and NaN values there."""
    if weight.dim() != 2:
        raise InputError(f"an FP8 weight must be 2-D, this one is {list(weight.shape)}", tensor=where)
    rows, cols = weight.shape
    tiles = grid((rows, cols), block)
    out = torch.empty((rows, cols), dtype=FP8)
    scale_inv = torch.empty(tiles, dtype=torch.float32)
    for i in range(tiles[0]):
        span = slice(i * block[0], min(rows, (i + 1) * block[0]))
        values = weight[span].to(torch.float32, copy=True)
        columns = values.abs().amax(dim=0)
        padded = torch.nn.functional.pad(columns, (0, tiles[1] * block[1] - cols))  # |w| >= 0: zeros change no max
        amax = padded.view(tiles[1], block[1]).amax(dim=1)
        if not bool(torch.isfinite(amax).all()):
            raise InputError("holds NaN or Inf values, which FP8 cannot store", tensor=where,
                             hint="merge into a 16-bit output instead")
        # transformers' expressions exactly: ``448.0 / t`` is torch's reciprocal(t) * 448 (two roundings)
        safe = torch.where(amax > 0, amax, torch.ones_like(amax))
        scales = torch.where(amax > 0, FP8_MAX / safe, torch.ones_like(safe))
        if not bool(torch.isfinite(scales).all()):
            raise InputError(f"a tile's largest |value| is {float(amax.min()):g}: 448 / amax overflows float32, "
                             "and FP8 would store NaN there", tensor=where, hint="merge into a 16-bit output instead")
        scale_inv[i] = (1.0 / scales).to(torch.float32)
        _scale_tiles(values, scales, block[1])
        out[span] = values.clamp_(-FP8_MAX, FP8_MAX)
    return out, scale_inv
