"""IQ4_NL and IQ4_XS encoders in numpy: the bytes of ggml's quantizer without an importance matrix, the
fallback for where the native kernel (csrc/gguf_iq4.c, the same operations in C) is not built.

Each block's scale is a weighted least-squares fit of its values to 16 fixed non-linear levels, searched
over 16 candidate scales; IQ4_XS then stores the 8 block scales of a 256-value super-block as 6-bit
multiples of one float16 scale. Vectorised over blocks; every sum is accumulated element by element in the
reference's order, in float32, products in its association (kquants.py's conventions). What the bytes rely
on: docs/gguf.md, "IQ4 encoders".
"""

from __future__ import annotations

import numpy as np

from .kquants import CHUNK, GROUP_MAX_EPS, QK_K, fp16, nearest_int

F32 = np.float32
#: The 16 levels an index stands for (ggml's kvalues_iq4nl), ascending.
LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], F32)
#: Candidate scales each side of the first guess (ggml's ntry for these types).
TRIES = 7
#: bytes per block: IQ4_NL (32 values), IQ4_XS (256 values)
SIZES = {"IQ4_NL": (32, 18), "IQ4_XS": (QK_K, 136)}


def index(v: np.ndarray) -> np.ndarray:
    """The index of the level nearest each value, a tie to the upper one, either end at or past it, 15 for
    NaN: the answer of the reference's bisection, as a count of the inner levels not above the value."""
    lo = np.zeros(v.shape, np.int32)
    for level in LEVELS[1:15]:
        lo += ~(v < level)
    out = np.where(v - LEVELS[lo] < LEVELS[lo + 1] - v, lo, lo + 1)
    out[v >= LEVELS[15]] = 15
    out[v <= LEVELS[0]] = 0
    return out


def _fit(x: np.ndarray, w: np.ndarray, iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sums of w * level * x and w * level^2 over each block's 32 values at ``iscale``, left to right."""
    q = LEVELS[index(iscale[:, None] * x)]
    sumqx = np.zeros(x.shape[0], F32)
    sumq2 = np.zeros(x.shape[0], F32)
    for j in range(x.shape[1]):
        wq = w[:, j] * q[:, j]
        sumqx = sumqx + wq * x[:, j]
        sumq2 = sumq2 + wq * q[:, j]
    return sumqx, sumq2


def block_scales(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """[blocks, 32] values and weights -> each block's scale (csrc/gguf_iq4.h, iq4_block_scale)."""
    amax, mx = _first_absmax(x)
    sumqx, sumq2 = _fit(x, w, F32(1) / (-mx / LEVELS[0]))
    d = np.where(sumq2 > 0, sumqx / sumq2, F32(0)).astype(F32)
    best = d * sumqx
    for t in range(-TRIES, TRIES + 1):
        sumqx, sumq2 = _fit(x, w, F32(t - 127) / mx)
        take = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = np.where(take, sumqx / sumq2, d).astype(F32)
        best = np.where(take, d * sumqx, best).astype(F32)
    out: np.ndarray = np.where(amax < GROUP_MAX_EPS, F32(0), d).astype(F32)
    return out


def _first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's largest magnitude and the first value that has it (a strict ``>`` scan from 0)."""
    amax = np.zeros(x.shape[0], F32)
    mx = np.zeros(x.shape[0], F32)
    for j in range(x.shape[1]):
        a = np.abs(x[:, j])
        up = a > amax
        amax = np.where(up, a, amax)
        mx = np.where(up, x[:, j], mx)
    return amax, mx


def pack(L: np.ndarray) -> np.ndarray:
    """[blocks, 32] indices -> [blocks, 16] bytes: value j low nibble of byte j, value 16 + j its high one."""
    out: np.ndarray = (L[:, :16] | (L[:, 16:] << 4)).astype(np.uint8)
    return out


def iq4_nl(x: np.ndarray) -> np.ndarray:
    """[blocks, 32] -> [blocks, 18]: d as float16, the indices from 1 / d (d itself, not the float16)."""
    d = block_scales(x, x * x)
    out = np.empty((x.shape[0], 18), np.uint8)
    out[:, :2] = fp16(d).reshape(-1, 1).view(np.uint8)
    inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
    out[:, 2:] = pack(index(inv[:, None] * x))
    return out


def iq4_xs(x: np.ndarray) -> np.ndarray:
    """[super-blocks, 256] -> [super-blocks, 136]: d = -(the block scale of largest magnitude) / 32, each block
    scale as s = nearest(scale / d) + 32 in 6 bits, the indices from 1 / (d * (s - 32))."""
    n = x.shape[0]
    blocks = x.reshape(-1, 32)
    scales = block_scales(blocks, blocks * blocks).reshape(n, 8)
    _, max_scale = _first_absmax(scales)
    d = -max_scale / F32(32)
    inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
    s = np.clip(nearest_int(inv[:, None] * scales), -32, 31)
    dl = (d[:, None] * s.astype(F32)).reshape(-1)
    idl = np.where(dl != 0, F32(1) / dl, F32(0)).astype(F32)
    out = np.empty((n, 136), np.uint8)
    out[:, :2] = fp16(d).reshape(-1, 1).view(np.uint8)
    s = (s + 32).astype(np.uint16)
    high = np.zeros(n, np.uint16)
    for ib in range(8):
        high |= (s[:, ib] >> 4) << (2 * ib)
    out[:, 2:4] = high.reshape(-1, 1).view(np.uint8)
    low = (s & 0xF).astype(np.uint8)
    out[:, 4:8] = low[:, 0::2] | (low[:, 1::2] << 4)
    out[:, 8:] = pack(index(idl[:, None] * blocks)).reshape(n, 128)
    return out


ENCODERS = {"IQ4_NL": iq4_nl, "IQ4_XS": iq4_xs}


def quantize(values: np.ndarray, name: str) -> np.ndarray:
    """float32 values whose last dimension is whole ``name`` blocks -> uint8 rows of its blocks."""
    block, size = SIZES[name]
    values = np.ascontiguousarray(values, dtype=F32)
    if values.ndim == 0 or values.shape[-1] % block:
        raise ValueError(f"{name} needs rows of whole {block}-value blocks, not {values.shape[-1:]}")
    flat = values.reshape(-1, block)
    out = np.empty((flat.shape[0], size), np.uint8)
    step = CHUNK * QK_K // block
    with np.errstate(all="ignore"):  # the reference's own inf/nan intermediates (1 / 0 on zero blocks and such)
        for start in range(0, flat.shape[0], step):
            out[start:start + step] = ENCODERS[name](flat[start:start + step])
    return out.reshape(*values.shape[:-1], values.shape[-1] // block * size)
