/* Importance-weighted block encoders for adaptools' `--imatrix FILE` (docs/gguf.md, "Importance matrices"):
 * the same bytes as ggml's quantizer when llama-quantize hands it a tensor's importance weights (one float
 * per column of the row). The searches are the reference encoder's (gguf_kquants.h) with the column's
 * importance folded into each value's weight; everything is scalar float32 arithmetic, each operation
 * IEEE-rounded on its own in the reference's order (no -ffast-math, no FMA contraction), so the bytes match.
 *
 * One entry point per type encodes whole rows [r0, r1) of n_per_row values (row r's weights are
 * qw + (r / rows_per_weight) * n_per_row: a tensor of stacked experts has one weight vector per expert).
 * The older 32-value types compute their weighting's variance over the whole row, the K-quants over each
 * 256-value super-block, so rows, not blocks, are the unit. Q8_0 takes no weights in ggml: not here.
 */
#include "adaptools_kernel.h"

#define QK_K 256
#define GROUP_MAX_EPS 1e-15f
#define MAXF(a, b) ((a) > (b) ? (a) : (b))
#define MINF(a, b) ((a) < (b) ? (a) : (b))

/* the low mantissa bits of v + 1.5 * 2^23: round half to even for |v| < 2^22 (docs/gguf.md) */
static inline int nearest_int(float v) {
    return (int)(bits_of(v + 12582912.0f) & 0x007fffffu) - 0x00400000;
}

static inline void put_f16(uint8_t *dst, float f) {
    const uint16_t h = f32_to_f16(f);
    memcpy(dst, &h, 2);
}

static inline float get_f16(const uint8_t *src) {
    uint16_t h;
    memcpy(&h, src, 2);
    return f16_to_f32(h);
}

/* Symmetric grid -nmax..nmax-1 with weights qw: the scale from -nmax / max, then 18 neighbours, the best
 * weighted least-squares fit kept. L gets levels + nmax. */
static float qx_weighted(int n, int nmax, const float *x, int8_t *L, const float *qw) {
    float max = 0.0f, amax = 0.0f;
    for (int i = 0; i < n; ++i) {
        const float ax = fabsf(x[i]);
        if (ax > amax) { amax = ax; max = x[i]; }
    }
    if (amax < GROUP_MAX_EPS) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.0f;
    }
    float iscale = -nmax / max;
    float sumlx = 0.0f, suml2 = 0.0f;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = MAXF(-nmax, MINF(nmax - 1, l));
        L[i] = (int8_t)(l + nmax);
        const float w = qw[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    float scale = suml2 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        iscale = -(nmax + 0.1f * is) / max;
        sumlx = suml2 = 0.0f;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * x[i]);
            l = MAXF(-nmax, MINF(nmax - 1, l));
            const float w = qw[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; ++i) {
                const int l = nearest_int(iscale * x[i]);
                L[i] = (int8_t)(nmax + MAXF(-nmax, MINF(nmax - 1, l)));
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

/* Asymmetric grid 0..nmax with weights w: nstep + 1 candidate scales, weighted least squares for scale and
 * min together (the min kept <= 0). *the_min gets the min negated, as stored. */
static float qkx3_weighted(int n, int nmax, const float *x, const float *w, uint8_t *L, float *the_min,
                           uint8_t *Laux, float rmin, float rdelta, int nstep) {
    float min = x[0], max = x[0];
    float sum_w = w[0], sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (min > 0) min = 0;
    if (max <= min) {
        memset(L, 0, (size_t)n);
        *the_min = -min;
        return 0.0f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best = 0.0f;
    for (int i = 0; i < n; ++i) {
        const int l = nearest_int(iscale * (x[i] - min));
        L[i] = (uint8_t)MAXF(0, MINF(nmax, l));
        const float diff = scale * L[i] + min - x[i];
        best += w[i] * (diff * diff);
    }
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * (x[i] - min));
            l = MAXF(0, MINF(nmax, l));
            Laux[i] = (uint8_t)l;
            sum_l += w[i] * l;
            sum_l2 += w[i] * l * l;
            sum_xl += w[i] * l * x[i];
        }
        const float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float cur = 0;
            for (int i = 0; i < n; ++i) {
                const float diff = this_scale * Laux[i] + this_min - x[i];
                cur += w[i] * (diff * diff);
            }
            if (cur < best) {
                memcpy(L, Laux, (size_t)n);
                best = cur;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

/* The super-block's sub-block scales (or mins) on a positive grid 0..nmax, weighted by each sub-block's
 * total weight: 8 candidate scales around nmax / max, then 5 passes moving one level at a time. */
static float qp_weighted(int n, int nmax, const float *x, uint8_t *L, const float *qw) {
    float max = 0;
    for (int i = 0; i < n; ++i) max = MAXF(max, x[i]);
    if (max < GROUP_MAX_EPS) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.0f;
    }
    float iscale = nmax / max;
    for (int i = 0; i < n; ++i) L[i] = (uint8_t)nearest_int(iscale * x[i]);
    const float scale = 1 / iscale;
    float best_mse = 0;
    for (int i = 0; i < n; ++i) {
        const float diff = x[i] - scale * L[i];
        best_mse += qw[i] * diff * diff;
    }
    for (int is = -4; is <= 4; ++is) {
        if (is == 0) continue;
        const float iscale_is = (0.1f * is + nmax) / max;
        const float scale_is = 1 / iscale_is;
        float mse = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale_is * x[i]);
            l = MINF(nmax, l);
            const float diff = x[i] - scale_is * l;
            mse += qw[i] * diff * diff;
        }
        if (mse < best_mse) {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = MINF(nmax, l);
        L[i] = (uint8_t)l;
        sumlx += qw[i] * x[i] * l;
        suml2 += qw[i] * l * l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int changed = 0;
        for (int i = 0; i < n; ++i) {
            const float w = qw[i];
            float slx = sumlx - w * x[i] * L[i];
            float sl2 = suml2 - w * L[i] * L[i];
            if (slx > 0 && sl2 > 0) {
                int new_l = nearest_int(x[i] * sl2 / slx);
                new_l = MINF(nmax, new_l);
                if (new_l != L[i]) {
                    slx += w * x[i] * new_l;
                    sl2 += w * new_l * new_l;
                    if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (uint8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        ++changed;
                    }
                }
            }
        }
        if (!changed) break;
    }
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

static inline void scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4));
    }
}

/* Q4_K and Q5_K share everything but the level count and the packing: 8 sub-blocks of 32, weights
 * qw * sqrt(sigma2 + x^2) with sigma2 = 2 * mean(x^2) over the super-block. */
static void q45k_block(const float *x, const float *qw, int nmax, uint8_t *d_out, uint8_t *scales_out,
                       uint8_t *L) {
    const int clamp63 = nmax == 31; /* Q5_K caps the 6-bit levels at 63; Q4_K stores them as they come */
    uint8_t Laux[32], Ls[8], Lm[8];
    float weights[32], sw[8], mins[8], scales[8];
    float sum_x2 = 0;
    for (int l = 0; l < QK_K; ++l) sum_x2 += x[l] * x[l];
    const float sigma2 = 2 * sum_x2 / QK_K;
    for (int j = 0; j < 8; ++j) {
        for (int l = 0; l < 32; ++l) weights[l] = qw[32 * j + l] * sqrtf(sigma2 + x[32 * j + l] * x[32 * j + l]);
        float sumw = 0;
        for (int l = 0; l < 32; ++l) sumw += weights[l];
        sw[j] = sumw;
        scales[j] = qkx3_weighted(32, nmax, x + 32 * j, weights, L + 32 * j, &mins[j], Laux, -0.9f, 0.05f, 36);
    }
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
        scale_min_k4(j, sc, &s, &m);
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
static void q4_k_row(const float *x, const float *qw, int64_t n, uint8_t *y) {
    uint8_t L[QK_K];
    for (int64_t i = 0; i < n / QK_K; ++i, x += QK_K, qw += QK_K, y += 144) {
        q45k_block(x, qw, 15, y, y + 4, L);
        uint8_t *q = y + 16;
        for (int j = 0; j < QK_K; j += 64, q += 32)
            for (int l = 0; l < 32; ++l) q[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
    }
}

/* Q5_K, 176 bytes: d, dmin, 12 bytes of scales and mins, 32 bytes of fifth bits, 128 bytes of low nibbles */
static void q5_k_row(const float *x, const float *qw, int64_t n, uint8_t *y) {
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
static void q6_k_row(const float *x, const float *qw, int64_t n, uint8_t *y) {
    int8_t L[QK_K];
    float scales[16];
    for (int64_t i = 0; i < n / QK_K; ++i, x += QK_K, qw += QK_K, y += 210) {
        float max_scale = 0, max_abs_scale = 0;
        for (int ib = 0; ib < 16; ++ib) {
            const float scale = qx_weighted(16, 32, x + 16 * ib, L + 16 * ib, qw + 16 * ib);
            scales[ib] = scale;
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
static void q3_k_row(const float *x, const float *qw, int64_t n, uint8_t *y) {
    int8_t L[QK_K], Ls[16];
    float scales[16], weight[16], sw[16];
    for (int64_t i = 0; i < n / QK_K; ++i, x += QK_K, qw += QK_K, y += 110) {
        float sumx2 = 0;
        for (int j = 0; j < QK_K; ++j) sumx2 += x[j] * x[j];
        const float sigma2 = 2 * sumx2 / QK_K;
        for (int j = 0; j < 16; ++j) {
            for (int l = 0; l < 16; ++l) weight[l] = qw[16 * j + l] * sqrtf(sigma2 + x[16 * j + l] * x[16 * j + l]);
            float sumw = 0;
            for (int l = 0; l < 16; ++l) sumw += weight[l];
            sw[j] = sumw;
            scales[j] = qx_weighted(16, 4, x + 16 * j, L + 16 * j, weight);
        }
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
static void q2_k_row(const float *x, const float *qw, int64_t n, uint8_t *y) {
    uint8_t L[QK_K], Laux[16], Ls[16], Lm[16];
    float mins[16], scales[16], sw[16], weight[16];
    for (int64_t i = 0; i < n / QK_K; ++i, x += QK_K, qw += QK_K, y += 84) {
        memset(sw, 0, sizeof sw);
        float sumx2 = 0;
        for (int j = 0; j < QK_K; ++j) sumx2 += x[j] * x[j];
        const float sigma2 = sumx2 / QK_K;
        for (int j = 0; j < 16; ++j) {
            for (int l = 0; l < 16; ++l) weight[l] = qw[16 * j + l] * sqrtf(sigma2 + x[16 * j + l] * x[16 * j + l]);
            for (int l = 0; l < 16; ++l) sw[j] += weight[l];
            scales[j] = qkx3_weighted(16, 3, x + 16 * j, weight, L + 16 * j, &mins[j], Laux, -0.9f, 0.05f, 36);
        }
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

/* Q4_0 (18 bytes: d, 16 bytes of nibbles) and Q5_0 (22: d, 4 bytes of fifth bits, 16 of nibbles) */
static void q4_0_row(const float *x, const float *qw, int64_t n, uint8_t *y) {
    float weight[32];
    int8_t L[32];
    const float sigma2 = row_sigma2(x, n);
    for (int64_t ib = 0; ib < n / 32; ++ib, y += 18) {
        const float *xb = x + 32 * ib, *w = qw + 32 * ib;
        for (int j = 0; j < 32; ++j) weight[j] = w[j] * sqrtf(sigma2 + xb[j] * xb[j]);
        put_f16(y, qx_weighted(32, 8, xb, L, weight));
        for (int j = 0; j < 16; ++j) y[2 + j] = (uint8_t)(L[j] | (L[j + 16] << 4));
    }
}

static void q5_0_row(const float *x, const float *qw, int64_t n, uint8_t *y) {
    float weight[32];
    int8_t L[32];
    const float sigma2 = row_sigma2(x, n);
    for (int64_t ib = 0; ib < n / 32; ++ib, y += 22) {
        const float *xb = x + 32 * ib, *w = qw + 32 * ib;
        for (int j = 0; j < 32; ++j) weight[j] = w[j] * sqrtf(sigma2 + xb[j] * xb[j]);
        put_f16(y, qx_weighted(32, 16, xb, L, weight));
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
static void q41_51_row(const float *x, const float *qw, int64_t n, uint8_t *y, int five) {
    float weight[32];
    uint8_t L[32], Laux[32];
    const float sigma2 = row_sigma2(x, n);
    const int size = five ? 24 : 20;
    for (int64_t ib = 0; ib < n / 32; ++ib, y += size) {
        const float *xb = x + 32 * ib, *w = qw + 32 * ib;
        for (int j = 0; j < 32; ++j) weight[j] = w[j] * sqrtf(sigma2 + xb[j] * xb[j]);
        float min;
        const float d = qkx3_weighted(32, five ? 31 : 15, xb, weight, L, &min, Laux, -0.9f, 0.05f, 36);
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

static void q4_1_row(const float *x, const float *qw, int64_t n, uint8_t *y) { q41_51_row(x, qw, n, y, 0); }
static void q5_1_row(const float *x, const float *qw, int64_t n, uint8_t *y) { q41_51_row(x, qw, n, y, 1); }

typedef void (*row_fn)(const float *, const float *, int64_t, uint8_t *);

static void rows(row_fn f, int64_t block, int64_t size, const float *x, int64_t r0, int64_t r1, int64_t n_per_row,
                 const float *qw, int64_t rows_per_weight, uint8_t *out) {
    const int64_t row_bytes = n_per_row / block * size;
    for (int64_t r = r0; r < r1; ++r)
        f(x + r * n_per_row, qw + (r / rows_per_weight) * n_per_row, n_per_row, out + r * row_bytes);
}

#define WEIGHTED(name, block, size)                                                                         \
    void adaptools_##name##_encode_weighted(const float *x, int64_t r0, int64_t r1, int64_t n_per_row,     \
                                            const float *qw, int64_t rows_per_weight, uint8_t *out) {      \
        rows(name##_row, block, size, x, r0, r1, n_per_row, qw, rows_per_weight, out);                     \
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
