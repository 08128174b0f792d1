"""GGUF K-quant encoders (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) giving the bytes of ggml's reference quantizer
(``quantize_row_q*_K_ref``, the path without an importance matrix) on the same float32 values.

gguf-py decodes these types but has no encoder for them. Each function here follows the reference's
float32 arithmetic operation by operation, vectorised with numpy over blocks: every sum is accumulated
element by element in the reference's order (never numpy's pairwise ``sum``), products are formed in the
same association, ``nearest_int`` is the 12582912 magic-number bit trick (round half to even, and the
same bits as the reference for out-of-range values), and no multiply-add is fused, as in ggml's x86-64
build. The facts this relies on, and what the bytes were checked against: docs/gguf.md, "K-quant encoders".
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

F32 = np.float32
QK_K = 256
#: ggml's GROUP_MAX_EPS: a group whose largest magnitude is below it is all zeros.
GROUP_MAX_EPS = F32(1e-15)
#: Super-blocks encoded at once (bounds the temporaries to a few tens of MB).
CHUNK = 2048


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: the low mantissa bits of ``v + 12582912.f`` (float32), as int32."""
    out: np.ndarray = (np.asarray(v, F32) + F32(12582912.0)).view(np.int32)
    out &= 0x007FFFFF
    out -= 0x00400000
    return out


def levels_of(iscale: np.ndarray, x: np.ndarray, mn: np.ndarray, nmax: int) -> np.ndarray:
    """``clamp(nearest_int(iscale * (x - min)), 0, nmax)``, the asymmetric grid's levels."""
    out = nearest_int(iscale * (x - mn))
    return np.clip(out, 0, nmax, out=out)


def seqsum(terms: np.ndarray, start_zero: bool = True) -> np.ndarray:
    """Sum over axis 0 one element at a time, left to right, in float32 (``float s = 0; s += t[i]``)."""
    acc: np.ndarray = terms[0] + F32(0.0) if start_zero else terms[0].copy()
    for row in terms[1:]:
        acc = acc + row
    return acc


def fp16(v: np.ndarray) -> np.ndarray:
    """float32 -> fp16 bits (round to nearest even, overflow to infinity), as uint16."""
    return np.asarray(v, F32).astype(np.float16).view(np.uint16)


def fp16_value(bits: np.ndarray) -> np.ndarray:
    return bits.view(np.float16).astype(F32)


def running_max(values: np.ndarray, key: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Over the last axis, from 0, keeping a value where ``key > best`` (the first of equal keys):
    (best key, its value)."""
    key = values if key is None else key
    best = np.zeros(values.shape[:-1], F32)
    value = np.zeros(values.shape[:-1], F32)
    for j in range(values.shape[-1]):
        take = key[..., j] > best
        best = np.where(take, key[..., j], best)
        value = np.where(take, values[..., j], value)
    return best, value


def first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Over axis 0: the largest magnitude and the first element having it (the reference's ``ax > amax``)."""
    ax = np.abs(x)
    idx = np.argmax(ax, axis=0)
    cols = np.arange(x.shape[1])
    return ax[idx, cols], x[idx, cols]


# --- the reference's per-group searches, on element-major arrays [n, groups] --------------------------------


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale, min as stored (negated), levels) of each group: an asymmetric grid searched over ``nstep + 1``
    scales by weighted least squares."""
    mn = x.min(axis=0)
    mx = x.max(axis=0)
    sum_w = seqsum(w, start_zero=False)
    sum_x = seqsum(w * x, start_zero=False)
    mn = np.where(mn > 0, F32(0.0), mn)
    flat = mx == mn
    fnmax = F32(nmax)
    iscale = fnmax / (mx - mn)
    scale = F32(1.0) / iscale
    levels = levels_of(iscale, x, mn, nmax)
    # the levels are not kept per step: the (iscale, min) that made the best ones are, and the levels made
    # again from them at the end (the same operations on the same values)
    best_iscale, best_from = iscale, mn

    def error(sc: np.ndarray, m: np.ndarray, lf: np.ndarray) -> np.ndarray:
        diff = sc * lf + m - x
        return seqsum(w * (np.abs(diff) if use_mad else diff * diff))

    best = error(scale, mn, levels.astype(F32))
    for step in range(nstep + 1):
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + fnmax) / (mx - mn)  # the min found so far
        lf = levels_of(iscale, x, mn, nmax).astype(F32)
        wl = w * lf
        sum_l, sum_l2, sum_xl = seqsum(wl), seqsum(wl * lf), seqsum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        pos = this_min > 0
        this_min = np.where(pos, F32(0.0), this_min)
        this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
        cur = error(this_scale, this_min, lf)
        better = (det > 0) & (cur < best)
        best_iscale = np.where(better, iscale, best_iscale)
        best_from = np.where(better, mn, best_from)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    levels = np.where(flat, 0, levels_of(best_iscale, x, best_from, nmax))
    scale = np.where(flat, F32(0.0), scale)
    return scale, -mn, levels


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, levels + nmax) of each group: a symmetric grid, weights x*x (``rmse_type`` 1), 18 more scales
    tried around ``-nmax / max``."""
    amax, mx = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    w = x * x
    wx = w * x
    lo, hi = -nmax, nmax - 1

    def grid(iscale: np.ndarray) -> np.ndarray:
        lev = nearest_int(iscale * x)
        return np.clip(lev, lo, hi, out=lev)

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lf = grid(iscale).astype(F32)
        return seqsum(wx * lf), seqsum(w * lf * lf)

    best_iscale = F32(-nmax) / mx  # the levels are made again from the best scale's iscale at the end
    sumlx, suml2 = trial(best_iscale)
    scale = np.where(suml2 != 0, sumlx / suml2, F32(0.0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F32(nmax) + F32(0.1) * F32(step)) / mx
        sumlx, suml2 = trial(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_iscale = np.where(better, iscale, best_iscale)
        scale = np.where(better, sumlx / suml2, scale)
        best = np.where(better, scale * sumlx, best)
    return np.where(zero, F32(0.0), scale), np.where(zero, 0, grid(best_iscale) + nmax)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, levels + nmax) of each group: a symmetric grid refined one element at a time (5 passes at
    most; a pass that changes nothing would change nothing again, so every group runs all 5)."""
    amax, mx = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    lo, hi = -nmax, nmax - 1
    levels = np.clip(nearest_int((F32(-nmax) / mx) * x), lo, hi)
    w = x * x
    wx = w * x
    lf = levels.astype(F32)
    sumlx, suml2 = seqsum(wx * lf), seqsum(w * lf * lf)
    for _ in range(5):
        for i in range(x.shape[0]):
            li = levels[i].astype(F32)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new = np.clip(nearest_int(x[i] * sl2 / slx), lo, hi)
            nf = new.astype(F32)
            slx = slx + wx[i] * nf
            sl2 = sl2 + w[i] * nf * nf
            take = ((sumlx - wx[i] * li) > 0) & (new != levels[i]) & (sl2 > 0) & \
                (slx * slx * suml2 > sumlx * sumlx * sl2)
            levels[i] = np.where(take, new, levels[i])
            sumlx = np.where(take, slx, sumlx)
            suml2 = np.where(take, sl2, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0.0))
    return np.where(zero, F32(0.0), scale), np.where(zero, 0, levels + nmax)


# --- helpers shared by the super-block layouts --------------------------------------------------------------


def groups(x: np.ndarray, size: int) -> np.ndarray:
    """[blocks, 256] -> element-major [size, blocks * 256 / size] (group g of block b is column b*n + g)."""
    return np.ascontiguousarray(x.reshape(-1, size).T)


def ungroup(levels: np.ndarray, nb: int) -> np.ndarray:
    """Inverse of :func:`groups` for the levels: [nb, 256] int32."""
    return np.ascontiguousarray(levels.T).reshape(nb, QK_K)


def requantize(x: np.ndarray, levels: np.ndarray, d: np.ndarray, dm: np.ndarray | None, size: int,
               lo: int, hi: int) -> np.ndarray:
    """The reference's last pass: each group's levels again from its stored (rounded) scale ``d`` and min
    ``dm`` ([nb, groups]); a group whose ``d`` is 0 keeps the levels of its search."""
    nb = x.shape[0]
    xg = x.reshape(nb, -1, size)
    num = xg if dm is None else xg + dm[..., None]
    with np.errstate(all="ignore"):
        new = np.clip(nearest_int(num / d[..., None]), lo, hi)
    keep = (d == 0)[..., None]
    return np.where(keep, levels.reshape(nb, -1, size), new).reshape(nb, QK_K)


def pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: 8 six-bit scales and 8 six-bit mins ([nb, 8] uint8) in 12 bytes."""
    q = np.zeros((ls.shape[0], 12), np.uint8)
    q[:, 0:4] = ls[:, 0:4]
    q[:, 4:8] = lm[:, 0:4]
    q[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    q[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    q[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return q


def unpack_scale_min_k4(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference's ``get_scale_min_k4`` for all 8 groups: (scales, mins) as [nb, 8] uint8."""
    sc = np.concatenate([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def pack_2bit(levels: np.ndarray) -> np.ndarray:
    """Levels 0..3 of [nb, 256] as 64 bytes a block: byte 32h + l holds elements 128h + l + 32k at bits 2k."""
    v = levels.astype(np.uint8).reshape(-1, 2, 4, 32)
    return (v[:, :, 0] | (v[:, :, 1] << 2) | (v[:, :, 2] << 4) | (v[:, :, 3] << 6)).reshape(-1, 64)


def u16_bytes(bits: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(bits.astype("<u2")).view(np.uint8).reshape(-1, 2)


# --- the five types, [nb, 256] float32 -> [nb, type_size] uint8 ---------------------------------------------


def _qkx_blocks(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K up to the levels: (the d, dmin and scales bytes [nb, 16], levels [nb, 256])."""
    nb = x.shape[0]
    xs = groups(x, 32)
    av_x = np.sqrt(seqsum(xs * xs) / F32(32.0))
    scales, mins, levels = make_qkx2_quants(xs, av_x + np.abs(xs), nmax, rmin, 0.1, nstep, False)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale, _ = running_max(scales)
    max_min, _ = running_max(mins)
    inv_scale = np.where(max_scale > 0, F32(63.0) / max_scale, F32(0.0))
    inv_min = np.where(max_min > 0, F32(63.0) / max_min, F32(0.0))
    ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    packed = pack_scale_min_k4(ls, lm)
    d, dmin = fp16(max_scale / F32(63.0)), fp16(max_min / F32(63.0))
    sc, m = unpack_scale_min_k4(packed)
    dd = fp16_value(d)[:, None] * sc.astype(F32)
    dm = fp16_value(dmin)[:, None] * m.astype(F32)
    levels = requantize(x, ungroup(levels, nb), dd, dm, 32, 0, nmax)
    return np.concatenate([u16_bytes(d), u16_bytes(dmin), packed], axis=1), levels


def q4_k(x: np.ndarray) -> np.ndarray:
    head, levels = _qkx_blocks(x, 15, -1.0, 20)
    v = levels.astype(np.uint8).reshape(-1, 4, 2, 32)
    return np.concatenate([head, (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(-1, 128)], axis=1)


def q5_k(x: np.ndarray) -> np.ndarray:
    head, levels = _qkx_blocks(x, 31, -0.5, 15)
    v = levels.astype(np.uint8).reshape(-1, 4, 2, 32)
    high = (v >> 4) & 1
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, :, None]
    qh = np.bitwise_or.reduce((high[:, :, 0] << shifts) | (high[:, :, 1] << (shifts + 1)), axis=1)
    ql = ((v[:, :, 0] & 0xF) | ((v[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    return np.concatenate([head, qh, ql], axis=1)


def q6_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    scales, levels = make_qx_quants(groups(x, 16), 32)
    scales = scales.reshape(nb, 16)
    max_abs, max_scale = running_max(scales, np.abs(scales))
    zero = max_abs < GROUP_MAX_EPS
    with np.errstate(all="ignore"):
        iscale = F32(-128.0) / max_scale
        d = fp16(F32(1.0) / iscale)
    sc = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)
    dd = fp16_value(d)[:, None] * sc.astype(F32)
    levels = requantize(x, ungroup(levels, nb), dd, None, 16, -32, 31)
    levels = np.where(dd.repeat(16, axis=1) == 0, levels, levels + 32).astype(np.uint8).reshape(-1, 2, 4, 32)
    ql = np.concatenate([(levels[:, :, 0] & 0xF) | ((levels[:, :, 2] & 0xF) << 4),
                         (levels[:, :, 1] & 0xF) | ((levels[:, :, 3] & 0xF) << 4)], axis=2).reshape(-1, 128)
    h = levels >> 4
    qh = (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).reshape(-1, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), u16_bytes(d)], axis=1)
    out[zero] = 0
    return out


def q3_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    scales, levels = make_q3_quants(groups(x, 16), 4)
    scales = scales.reshape(nb, 16)
    _, max_scale = running_max(scales, np.abs(scales))
    has = max_scale != 0
    with np.errstate(all="ignore"):
        iscale = F32(-32.0) / max_scale
        d = np.where(has, fp16(F32(1.0) / iscale), np.uint16(0))
    l6 = (np.clip(nearest_int(iscale[:, None] * scales).astype(np.int8), -32, 31) + 32).astype(np.uint8)
    l6 = np.where(has[:, None], l6, np.uint8(0))
    packed = np.zeros((nb, 12), np.uint8)
    packed[:, 0:8] = (l6[:, 0:8] & 0xF) | ((l6[:, 8:16] & 0xF) << 4)
    hi2 = (l6 >> 4).reshape(nb, 4, 4)  # [nb, j // 4, j % 4]
    packed[:, 8:12] = hi2[:, 0] | (hi2[:, 1] << 2) | (hi2[:, 2] << 4) | (hi2[:, 3] << 6)
    sc = l6.astype(np.int32) - 32  # what the reference reads back from the packed bytes
    dd = fp16_value(d)[:, None] * sc.astype(F32)
    levels = requantize(x, ungroup(levels, nb), dd, None, 16, -4, 3)
    levels = np.where(dd.repeat(16, axis=1) == 0, levels, levels + 4)
    high = (levels > 3).reshape(nb, 8, 32).astype(np.uint8)
    hmask = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
    low = np.where(levels > 3, levels - 4, levels)
    return np.concatenate([hmask, pack_2bit(low), packed, u16_bytes(d)], axis=1)


def q2_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    xs = groups(x, 16)
    scales, mins, levels = make_qkx2_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
    max_scale, _ = running_max(scales)
    max_min, _ = running_max(mins)
    with np.errstate(all="ignore"):
        ls = np.where(max_scale[:, None] > 0, nearest_int((F32(15.0) / max_scale)[:, None] * scales), 0)
        lm = np.where(max_min[:, None] > 0, nearest_int((F32(15.0) / max_min)[:, None] * mins), 0)
    d = np.where(max_scale > 0, fp16(max_scale / F32(15.0)), np.uint16(0))
    dmin = np.where(max_min > 0, fp16(max_min / F32(15.0)), np.uint16(0))
    packed = ((ls & 0xFF) | ((lm << 4) & 0xFF)).astype(np.uint8)
    dd = fp16_value(d)[:, None] * (packed & 0xF).astype(F32)
    dm = fp16_value(dmin)[:, None] * (packed >> 4).astype(F32)
    levels = requantize(x, ungroup(levels, nb), dd, dm, 16, 0, 3)
    return np.concatenate([packed, pack_2bit(levels), u16_bytes(d), u16_bytes(dmin)], axis=1)


ENCODERS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], int]] = {
    "Q2_K": (q2_k, 84), "Q3_K": (q3_k, 110), "Q4_K": (q4_k, 144), "Q5_K": (q5_k, 176), "Q6_K": (q6_k, 210),
}


def quantize(values: np.ndarray, name: str) -> np.ndarray:
    """float32 values whose last dimension is a whole number of 256-value super-blocks -> uint8 rows of
    ``name``'s blocks (the shape gguf-py's ``quants.quantize`` gives other block types)."""
    encoder, type_size = ENCODERS[name]
    values = np.ascontiguousarray(values, dtype=F32)
    if values.ndim == 0 or values.shape[-1] % QK_K:
        raise ValueError(f"{name} needs rows of whole {QK_K}-value blocks, not {values.shape[-1:]}")
    flat = values.reshape(-1, QK_K)
    out = np.empty((flat.shape[0], type_size), np.uint8)
    with np.errstate(all="ignore"):  # the reference's own inf/nan intermediates (later masked, as it does)
        for start in range(0, flat.shape[0], CHUNK):
            out[start:start + CHUNK] = encoder(flat[start:start + CHUNK])
    return out.reshape(*values.shape[:-1], values.shape[-1] // QK_K * type_size)
