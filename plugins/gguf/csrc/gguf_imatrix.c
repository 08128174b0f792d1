/* Importance-weighted block encoders for adaptools' `--imatrix FILE` (docs/gguf.md, "Importance matrices"):
 * the same bytes as ggml's quantizer when llama-quantize hands it a tensor's importance weights (one float
 * per column of the row). The searches are the reference encoder's (gguf_kquants.h) with the column's
 * importance folded into each value's weight; float32 arithmetic, each operation IEEE-rounded on its own in
 * the reference's order (no -ffast-math, no FMA contraction), so the bytes match. The per-group searches run
 * on eight groups side by side in the lanes of gguf_kquants.h (each lane the scalar code's operations, so
 * no sum is reordered); the scalar versions below fit the blocks of a row that do not fill eight lanes.
 *
 * One entry point per type encodes whole rows [r0, r1) of n_per_row values (row r's weights are
 * qw + (r / rows_per_weight) * n_per_row: a tensor of stacked experts has one weight vector per expert).
 * The older 32-value types compute their weighting's variance over the whole row, the K-quants over each
 * 256-value super-block, so rows, not blocks, are the unit. Q8_0 takes no weights in ggml: not here.
 */
#include "gguf_imatrix.h"

/* Q4_K and Q5_K share everything but the level count and the packing: 8 sub-blocks of 32, weights
 * qw * sqrt(sigma2 + x^2) with sigma2 = 2 * mean(x^2) over the super-block. */
INLINE void q45k_block(const float *x, const float *qw, int nmax, uint8_t *d_out, uint8_t *scales_out,
                       uint8_t *L) {
    const int clamp63 = nmax == 31; /* Q5_K caps the 6-bit levels at 63; Q4_K stores them as they come */
    uint8_t Ls[8], Lm[8];
    float weights[QK_K], sw[8], mins[8], scales[8];
    float sum_x2 = 0;
    for (int l = 0; l < QK_K; ++l) sum_x2 += x[l] * x[l];
    const float sigma2 = 2 * sum_x2 / QK_K;
    for (int l = 0; l < QK_K; ++l) weights[l] = qw[l] * sqrtf(sigma2 + x[l] * x[l]);
    for (int j = 0; j < 8; ++j) {
        float sumw = 0;
        for (int l = 0; l < 32; ++l) sumw += weights[32 * j + l];
        sw[j] = sumw;
    }
    qkx3_lanes(32, nmax, x, weights, L, scales, mins);
    const float d_block = qp_weighted(8, 63, scales, Ls, sw);
    const float m_block = qp_weighted(8, 63, mins, Lm, sw);
    uint8_t *sc = scales_out;
    memset(sc, 0, 12);
    for (int j = 0; j < 8; ++j) {
        const uint8_t ls = clamp63 ? (uint8_t)MINF(63, Ls[j]) : Ls[j], lm = clamp63 ? (uint8_t)MINF(63, Lm[j]) : Lm[j];
        if (j < 4) {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
            sc[j - 4] |= (uint8_t)((ls >> 4) << 6);
            sc[j - 0] |= (uint8_t)((lm >> 4) << 6);
        }
    }
    put_f16(d_out, d_block);
    put_f16(d_out + 2, m_block);
    for (int j = 0; j < 8; ++j) {
        uint8_t s, m;
        scale_min_k4(sc, j, &s, &m);
        const float d = get_f16(d_out) * s;
        if (!d) continue;
        const float dm = get_f16(d_out + 2) * m;
        for (int ii = 0; ii < 32; ++ii) {
            const int l = nearest_int((x[32 * j + ii] + dm) / d);
            L[32 * j + ii] = (uint8_t)MAXF(0, MINF(nmax, l));
        }
    }
}

/* Q4_K, 144 bytes: d, dmin (float16), 12 bytes of 6-bit scales and mins, 128 bytes of 4-bit levels */
INLINE void q4_k_row(const float *x, const float *qw, int64_t n, uint8_t *y) {
    uint8_t L[QK_K];
    for (int64_t i = 0; i < n / QK_K; ++i, x += QK_K, qw += QK_K, y += 144) {
        q45k_block(x, qw, 15, y, y + 4, L);
        uint8_t *q = y + 16;
        for (int j = 0; j < QK_K; j += 64, q += 32)
            for (int l = 0; l < 32; ++l) q[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
    }
}

/* Q5_K, 176 bytes: d, dmin, 12 bytes of scales and mins, 32 bytes of fifth bits, 128 bytes of low nibbles */
INLINE void q5_k_row(const float *x, const float *qw, int64_t n, uint8_t *y) {
    uint8_t L[QK_K];
    for (int64_t i = 0; i < n / QK_K; ++i, x += QK_K, qw += QK_K, y += 176) {
        q45k_block(x, qw, 31, y, y + 4, L);
        uint8_t *qh = y + 16, *ql = y + 48;
        memset(qh, 0, 32);
        uint8_t m1 = 1, m2 = 2;
        for (int n0 = 0; n0 < QK_K; n0 += 64, ql += 32) {
            for (int j = 0; j < 32; ++j) {
                int l1 = L[n0 + j], l2 = L[n0 + j + 32];
                if (l1 > 15) { l1 -= 16; qh[j] |= m1; }
                if (l2 > 15) { l2 -= 16; qh[j] |= m2; }
                ql[j] = (uint8_t)(l1 | (l2 << 4));
            }
            m1 <<= 2;
            m2 <<= 2;
        }
    }
}

/* Q6_K, 210 bytes: 128 bytes of low nibbles, 64 of high pairs, 16 int8 scales, d. The importance weights
 * go to the sub-block search as they are (no sigma2 term). */
INLINE void q6_k_row(const float *x, const float *qw, int64_t n, uint8_t *y) {
    int8_t L[QK_K];
    float scales[16];
    for (int64_t i = 0; i < n / QK_K; ++i, x += QK_K, qw += QK_K, y += 210) {
        float max_scale = 0, max_abs_scale = 0;
        qx_lanes(16, 32, x, qw, L, scales);
        qx_lanes(16, 32, x + 128, qw + 128, L + 128, scales + 8);
        for (int ib = 0; ib < 16; ++ib) {
            const float scale = scales[ib];
            const float abs_scale = fabsf(scale);
            if (abs_scale > max_abs_scale) {
                max_abs_scale = abs_scale;
                max_scale = scale;
            }
        }
        if (max_abs_scale < GROUP_MAX_EPS) {
            memset(y, 0, 210);
            continue;
        }
        const float iscale = -128.f / max_scale;
        put_f16(y + 208, 1 / iscale);
        int8_t *sc = (int8_t *)(y + 192);
        for (int ib = 0; ib < 16; ++ib) sc[ib] = (int8_t)MINF(127, nearest_int(iscale * scales[ib]));
        for (int j = 0; j < 16; ++j) {
            const float d = get_f16(y + 208) * sc[j];
            if (!d) continue;
            for (int ii = 0; ii < 16; ++ii) {
                const int l = nearest_int(x[16 * j + ii] / d);
                L[16 * j + ii] = (int8_t)(MAXF(-32, MINF(31, l)) + 32);
            }
        }
        uint8_t *ql = y, *qh = y + 128;
        for (int j = 0; j < QK_K; j += 128, ql += 64, qh += 32) {
            for (int l = 0; l < 32; ++l) {
                const uint8_t q1 = L[j + l] & 0xF, q2 = L[j + l + 32] & 0xF;
                const uint8_t q3 = L[j + l + 64] & 0xF, q4 = L[j + l + 96] & 0xF;
                ql[l] = (uint8_t)(q1 | (q3 << 4));
                ql[l + 32] = (uint8_t)(q2 | (q4 << 4));
                qh[l] = (uint8_t)((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) |
                                  ((L[j + l + 96] >> 4) << 6));
            }
        }
    }
}

/* Q3_K, 110 bytes: 32 bytes of third bits, 64 of 2-bit levels, 12 of 6-bit scales, d. 16 sub-blocks of 16,
 * weights qw * sqrt(sigma2 + x^2) with sigma2 = 2 * mean(x^2). */
INLINE void q3_k_row(const float *x, const float *qw, int64_t n, uint8_t *y) {
    int8_t L[QK_K], Ls[16];
    float scales[16], weight[QK_K], sw[16];
    for (int64_t i = 0; i < n / QK_K; ++i, x += QK_K, qw += QK_K, y += 110) {
        float sumx2 = 0;
        for (int j = 0; j < QK_K; ++j) sumx2 += x[j] * x[j];
        const float sigma2 = 2 * sumx2 / QK_K;
        for (int l = 0; l < QK_K; ++l) weight[l] = qw[l] * sqrtf(sigma2 + x[l] * x[l]);
        for (int j = 0; j < 16; ++j) {
            float sumw = 0;
            for (int l = 0; l < 16; ++l) sumw += weight[16 * j + l];
            sw[j] = sumw;
        }
        qx_lanes(16, 4, x, weight, L, scales);
        qx_lanes(16, 4, x + 128, weight + 128, L + 128, scales + 8);
        uint8_t *hmask = y, *qs = y + 32, *sc = y + 96;
        memset(sc, 0, 12);
        const float d_block = qx_weighted(16, 32, scales, Ls, sw);
        for (int j = 0; j < 16; ++j) {
            int l = Ls[j];
            if (j < 8) sc[j] = (uint8_t)(l & 0xF);
            else sc[j - 8] |= (uint8_t)((l & 0xF) << 4);
            l >>= 4;
            sc[j % 4 + 8] |= (uint8_t)(l << (2 * (j / 4)));
        }
        put_f16(y + 108, d_block);
        for (int j = 0; j < 16; ++j) {
            int8_t s = (int8_t)(j < 8 ? sc[j] & 0xF : sc[j - 8] >> 4);
            s = (int8_t)((s | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
            const float d = get_f16(y + 108) * s;
            if (!d) continue;
            for (int ii = 0; ii < 16; ++ii) {
                const int l = nearest_int(x[16 * j + ii] / d);
                L[16 * j + ii] = (int8_t)(MAXF(-4, MINF(3, l)) + 4);
            }
        }
        memset(hmask, 0, 32);
        int m = 0;
        uint8_t hm = 1;
        for (int j = 0; j < QK_K; ++j) {
            if (L[j] > 3) {
                hmask[m] |= hm;
                L[j] -= 4;
            }
            if (++m == QK_K / 8) {
                m = 0;
                hm <<= 1;
            }
        }
        for (int j = 0; j < QK_K; j += 128)
            for (int l = 0; l < 32; ++l)
                qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
    }
}

/* Q2_K, 84 bytes: 16 bytes of 4-bit scale and min pairs, 64 of 2-bit levels, d, dmin. 16 sub-blocks of 16,
 * weights qw * sqrt(sigma2 + x^2) with sigma2 = mean(x^2) (no factor 2 here). */
INLINE void q2_k_row(const float *x, const float *qw, int64_t n, uint8_t *y) {
    uint8_t L[QK_K], Ls[16], Lm[16];
    float mins[16], scales[16], sw[16], weight[QK_K];
    for (int64_t i = 0; i < n / QK_K; ++i, x += QK_K, qw += QK_K, y += 84) {
        memset(sw, 0, sizeof sw);
        float sumx2 = 0;
        for (int j = 0; j < QK_K; ++j) sumx2 += x[j] * x[j];
        const float sigma2 = sumx2 / QK_K;
        for (int l = 0; l < QK_K; ++l) weight[l] = qw[l] * sqrtf(sigma2 + x[l] * x[l]);
        for (int j = 0; j < 16; ++j)
            for (int l = 0; l < 16; ++l) sw[j] += weight[16 * j + l];
        for (int half = 0; half < 2; ++half) /* groups 0-7, then 8-15 */
            qkx3_lanes(16, 3, x + 128 * half, weight + 128 * half, L + 128 * half, scales + 8 * half,
                       mins + 8 * half);
        const float dm0 = qp_weighted(16, 15, scales, Ls, sw);
        const float mm0 = qp_weighted(16, 15, mins, Lm, sw);
        put_f16(y + 80, dm0);
        put_f16(y + 82, mm0);
        const float dm = get_f16(y + 80), mm = get_f16(y + 82);
        uint8_t *sc = y, *qs = y + 16;
        for (int j = 0; j < 16; ++j) sc[j] = (uint8_t)(Ls[j] | (Lm[j] << 4));
        for (int j = 0; j < 16; ++j) {
            const float d = dm * (sc[j] & 0xF);
            if (!d) continue;
            const float m = mm * (sc[j] >> 4);
            for (int ii = 0; ii < 16; ++ii) {
                const int l = nearest_int((x[16 * j + ii] + m) / d);
                L[16 * j + ii] = (uint8_t)MAXF(0, MINF(3, l));
            }
        }
        for (int j = 0; j < QK_K; j += 128)
            for (int l = 0; l < 32; ++l)
                qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
    }
}

/* the row's variance term of the 32-value types: mean(x^2) over the whole row */
static float row_sigma2(const float *x, int64_t n) {
    float sum_x2 = 0;
    for (int64_t j = 0; j < n; ++j) sum_x2 += x[j] * x[j];
    return sum_x2 / n;
}

/* Block ib of a row of the symmetric 32-value types: its levels, its scale stored as float16 at d_out. The
 * blocks are fit 8 side by side where 8 are left (at ib % 8 == 0, into Lb and ds), else one at a time. */
INLINE const int8_t *symmetric_block(const float *x, const float *qw, int64_t n, int64_t ib, float sigma2, int nmax,
                                     float *weight, int8_t *Lb, float *ds, uint8_t *d_out) {
    const float *xb = x + 32 * ib, *w = qw + 32 * ib;
    const int lane = (int)(ib % 8);
    if (n / 32 - (ib - lane) >= 8) {
        if (lane == 0) {
            for (int j = 0; j < 256; ++j) weight[j] = w[j] * sqrtf(sigma2 + xb[j] * xb[j]);
            qx_lanes(32, nmax, xb, weight, Lb, ds);
        }
        put_f16(d_out, ds[lane]);
        return Lb + 32 * lane;
    }
    for (int j = 0; j < 32; ++j) weight[j] = w[j] * sqrtf(sigma2 + xb[j] * xb[j]);
    put_f16(d_out, qx_weighted(32, nmax, xb, Lb, weight));
    return Lb;
}

/* Q4_0 (18 bytes: d, 16 bytes of nibbles) and Q5_0 (22: d, 4 bytes of fifth bits, 16 of nibbles) */
INLINE void q4_0_row(const float *x, const float *qw, int64_t n, uint8_t *y) {
    float weight[256], ds[8];
    int8_t Lb[256];
    const float sigma2 = row_sigma2(x, n);
    for (int64_t ib = 0; ib < n / 32; ++ib, y += 18) {
        const int8_t *L = symmetric_block(x, qw, n, ib, sigma2, 8, weight, Lb, ds, &y[0]);
        for (int j = 0; j < 16; ++j) y[2 + j] = (uint8_t)(L[j] | (L[j + 16] << 4));
    }
}

INLINE void q5_0_row(const float *x, const float *qw, int64_t n, uint8_t *y) {
    float weight[256], ds[8];
    int8_t Lb[256];
    const float sigma2 = row_sigma2(x, n);
    for (int64_t ib = 0; ib < n / 32; ++ib, y += 22) {
        const int8_t *L = symmetric_block(x, qw, n, ib, sigma2, 16, weight, Lb, ds, &y[0]);
        uint32_t qh = 0;
        for (int j = 0; j < 16; ++j) {
            const uint8_t a = (uint8_t)L[j], b = (uint8_t)L[j + 16];
            y[6 + j] = (uint8_t)((a & 0x0F) | ((b & 0x0F) << 4));
            qh |= ((a & 0x10u) >> 4) << j;
            qh |= ((b & 0x10u) >> 4) << (j + 16);
        }
        memcpy(y + 2, &qh, 4);
    }
}

/* Q4_1 (20 bytes: d, m, 16 of nibbles) and Q5_1 (24: d, m, 4 of fifth bits, 16 of nibbles) */
INLINE void q41_51_row(const float *x, const float *qw, int64_t n, uint8_t *y, int five) {
    float weight[256], ds[8], ms[8];
    uint8_t Lb[256], Laux[32];
    const float sigma2 = row_sigma2(x, n);
    const int size = five ? 24 : 20, nmax = five ? 31 : 15;
    for (int64_t ib = 0; ib < n / 32; ++ib, y += size) {
        const float *xb = x + 32 * ib, *w = qw + 32 * ib;
        const int lane = (int)(ib % 8);
        if (lane == 0) { /* the next 8 blocks side by side where there are 8 left, else one at a time */
            const int batch = n / 32 - ib >= 8;
            for (int j = 0; j < (batch ? 256 : 32); ++j) weight[j] = w[j] * sqrtf(sigma2 + xb[j] * xb[j]);
            if (batch) qkx3_lanes(32, nmax, xb, weight, Lb, ds, ms);
        }
        const uint8_t *L;
        float min, d;
        if (n / 32 - (ib - lane) >= 8) {
            L = Lb + 32 * lane;
            d = ds[lane];
            min = ms[lane];
        } else {
            for (int j = 0; j < 32; ++j) weight[j] = w[j] * sqrtf(sigma2 + xb[j] * xb[j]);
            d = qkx3_weighted(32, nmax, xb, weight, Lb, &min, Laux, -0.9f, 0.05f, 36);
            L = Lb;
        }
        put_f16(y, d);
        put_f16(y + 2, -min);
        uint8_t *qs = y + (five ? 8 : 4);
        uint32_t qh = 0;
        for (int j = 0; j < 16; ++j) {
            qs[j] = (uint8_t)((L[j] & 0x0F) | ((L[j + 16] & 0x0F) << 4));
            qh |= ((L[j] & 0x10u) >> 4) << j;
            qh |= ((L[j + 16] & 0x10u) >> 4) << (j + 16);
        }
        if (five) memcpy(y + 4, &qh, 4);
    }
}

INLINE void q4_1_row(const float *x, const float *qw, int64_t n, uint8_t *y) { q41_51_row(x, qw, n, y, 0); }
INLINE void q5_1_row(const float *x, const float *qw, int64_t n, uint8_t *y) { q41_51_row(x, qw, n, y, 1); }

/* each entry point built for AVX2 and the baseline, the row code (and the lane searches) inlined into it */
#define WEIGHTED(name, block, size)                                                                         \
    MULTIVERSION                                                                                            \
    void adaptools_##name##_encode_weighted(const float *x, int64_t r0, int64_t r1, int64_t n_per_row,     \
                                            const float *qw, int64_t rows_per_weight, uint8_t *out) {      \
        const int64_t row_bytes = n_per_row / block * size;                                                 \
        for (int64_t r = r0; r < r1; ++r)                                                                   \
            name##_row(x + r * n_per_row, qw + (r / rows_per_weight) * n_per_row, n_per_row,              \
                       out + r * row_bytes);                                                                \
    }

WEIGHTED(q2_k, 256, 84)
WEIGHTED(q3_k, 256, 110)
WEIGHTED(q4_k, 256, 144)
WEIGHTED(q5_k, 256, 176)
WEIGHTED(q6_k, 256, 210)
WEIGHTED(q4_0, 32, 18)
WEIGHTED(q4_1, 32, 20)
WEIGHTED(q5_0, 32, 22)
WEIGHTED(q5_1, 32, 24)
