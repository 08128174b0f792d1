/* GGUF K-quant codecs for adaptools: Q4_K and Q6_K encoding with the bytes of ggml's reference quantizer
 * (the path llama.cpp's quantizer takes without an importance matrix) and decoding with gguf-py's values.
 * A C port of plugins/gguf/kquants.py, operation for operation: the numpy code is the specification and
 * docs/gguf.md ("K-quant encoders", "The native codec") says what the bytes rely on. Same rules as
 * gguf_kernels.c: no -ffast-math, no FMA contraction, every float32 operation rounded on its own.
 *
 * The searches work on a super-block's groups side by side, element-major ([value][group], the numpy
 * code's layout): each group's sums are still accumulated one element at a time in the reference's order,
 * but the innermost loops run over the 8 (Q4_K) or 16 (Q6_K) groups, which are independent, so the compiler
 * vectorizes them without reordering any sum. Conditions become selects for the same reason.
 * Blocks [b0, b1) are processed, so callers split the work over threads.
 */
#include "adaptools_kernel.h"

#define QK_K 256
#define GROUP_MAX_EPS 1e-15f
#define INLINE static inline __attribute__((always_inline))

/* Eight groups side by side: GCC's vector extensions, one AVX2 register (two SSE ones in the baseline build).
 * Each lane's operations are the scalar code's, IEEE-rounded one by one; comparisons give lane masks (-1 or
 * 0) and conditions become selects. */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

INLINE v8f splat(float f) { return (v8f){f, f, f, f, f, f, f, f}; }
INLINE v8i splati(int32_t i) { return (v8i){i, i, i, i, i, i, i, i}; }
INLINE v8f sel(v8i m, v8f a, v8f b) { return (v8f)((m & (v8i)a) | (~m & (v8i)b)); }
INLINE v8i seli(v8i m, v8i a, v8i b) { return (m & a) | (~m & b); }
INLINE v8f tof(v8i v) { return __builtin_convertvector(v, v8f); }
INLINE v8f vabs(v8f v) { return (v8f)((v8i)v & 0x7fffffff); }
INLINE v8i clampv(v8i v, int32_t lo, int32_t hi) {
    v = seli(v < lo, splati(lo), v);
    return seli(v > hi, splati(hi), v);
}

/* ggml's nearest_int: the low mantissa bits of v + 1.5 * 2^23, rounding half to even for |v| < 2^22 and the
 * same (clamped later) bits as the reference for anything else, infinities and NaN included */
INLINE int32_t nearest_int(float v) {
    return (int32_t)(bits_of(v + 12582912.0f) & 0x007fffffu) - 0x00400000;
}
INLINE v8i nearest(v8f v) { return ((v8i)(v + 12582912.0f) & 0x007fffff) - 0x00400000; }

INLINE int32_t clamp(int32_t v, int32_t lo, int32_t hi) { return v < lo ? lo : v > hi ? hi : v; }

/* make_qkx2_quants on 8 groups of N values (x, w: [N] vectors of the 8 groups' i-th values): an asymmetric
 * grid of 0..nmax searched over nstep + 1 candidate scales by weighted least squares (absolute error where
 * use_mad). Out: each group's scale, its min as stored (negated), and its levels L. kquants.make_qkx2_quants,
 * in lanes. */
INLINE void qkx2_search(const int N, const v8f *restrict x, const v8f *restrict w, const int nmax, const float rmin,
                        const float rdelta, const int nstep, const int use_mad, v8f *restrict scale_out,
                        v8f *restrict min_out, v8i *restrict L) {
    v8i Laux[32];
    v8f mn = x[0], mx = x[0], sum_w = w[0], sum_x = w[0] * x[0];
    for (int i = 1; i < N; i++) {
        mn = sel(x[i] < mn, x[i], mn);
        mx = sel(x[i] > mx, x[i], mx);
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    mn = sel(mn > 0.0f, splat(0.0f), mn);
    const v8f min0 = mn;
    v8f iscale = splat((float)nmax) / (mx - mn);
    v8f scale = splat(1.0f) / iscale, best = splat(0.0f);
    for (int i = 0; i < N; i++) {
        L[i] = clampv(nearest(iscale * (x[i] - mn)), 0, nmax);
        const v8f diff = scale * tof(L[i]) + mn - x[i];
        best += w[i] * (use_mad ? vabs(diff) : diff * diff);
    }
    for (int step = 0; step <= nstep; step++) {
        /* from the min found so far, as the reference (a better candidate moves it) */
        iscale = splat(rmin + rdelta * (float)step + (float)nmax) / (mx - mn);
        v8f sl = splat(0.0f), sl2 = splat(0.0f), sxl = splat(0.0f);
        for (int i = 0; i < N; i++) {
            Laux[i] = clampv(nearest(iscale * (x[i] - mn)), 0, nmax);
            const v8f l = tof(Laux[i]), wl = w[i] * l;
            sl += wl;
            sl2 += wl * l;
            sxl += wl * x[i];
        }
        const v8f det = sum_w * sl2 - sl * sl;
        const v8f s = (sum_w * sxl - sum_x * sl) / det, m = (sl2 * sum_x - sl * sxl) / det;
        const v8f ts = sel(m > 0.0f, sxl / sl2, s), tm = sel(m > 0.0f, splat(0.0f), m);
        v8f cur = splat(0.0f);
        for (int i = 0; i < N; i++) {
            const v8f diff = ts * tof(Laux[i]) + tm - x[i];
            cur += w[i] * (use_mad ? vabs(diff) : diff * diff);
        }
        const v8i better = (det > 0.0f) & (cur < best);
        best = sel(better, cur, best);
        scale = sel(better, ts, scale);
        mn = sel(better, tm, mn);
        for (int i = 0; i < N; i++) L[i] = seli(better, Laux[i], L[i]);
    }
    const v8i flat = mx == min0; /* every value the same: all levels 0, scale 0 */
    *scale_out = sel(flat, splat(0.0f), scale);
    *min_out = -sel(flat, min0, mn);
    for (int i = 0; i < N; i++) L[i] = seli(flat, splati(0), L[i]);
}

/* make_qx_quants (rmse_type 1) on 8 groups of N values (x: [N] vectors): a symmetric grid of -nmax..nmax-1
 * with weights x*x, 18 candidate scales around -nmax / max. Out: each group's scale and its levels + nmax.
 * kquants.make_qx_quants, in lanes. */
INLINE void qx_search(const int N, const v8f *restrict x, const int nmax, v8f *restrict scale_out,
                      v8i *restrict L) {
    v8f amax = splat(0.0f), mx = splat(0.0f), scale = splat(0.0f), best = splat(0.0f);
    for (int i = 0; i < N; i++) { /* the first element of largest magnitude */
        const v8f a = vabs(x[i]);
        mx = sel(a > amax, x[i], mx);
        amax = sel(a > amax, a, amax);
    }
    for (int step = -10; step <= 9; step++) { /* -10: the first try, -nmax / max; then the 18 neighbours */
        if (step == 0) continue;
        const v8f iscale = step == -10 ? splat((float)(-nmax)) / mx : -splat((float)nmax + 0.1f * (float)step) / mx;
        v8f sumlx = splat(0.0f), suml2 = splat(0.0f);
        for (int i = 0; i < N; i++) {
            const v8f w = x[i] * x[i], l = tof(clampv(nearest(iscale * x[i]), -nmax, nmax - 1));
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        v8i take;
        if (step == -10) {
            scale = sel(suml2 != 0.0f, sumlx / suml2, splat(0.0f));
            take = splati(-1);
        } else {
            take = (suml2 > 0.0f) & (sumlx * sumlx > best * suml2);
            scale = sel(take, sumlx / suml2, scale);
        }
        best = sel(take, scale * sumlx, best);
        for (int i = 0; i < N; i++)
            L[i] = seli(take, clampv(nearest(iscale * x[i]), -nmax, nmax - 1) + nmax, L[i]);
    }
    const v8i zero = amax < GROUP_MAX_EPS; /* all zero */
    *scale_out = sel(zero, splat(0.0f), scale);
    for (int i = 0; i < N; i++) L[i] = seli(zero, splati(0), L[i]);
}

/* 8 groups of `size` values from x (group g at x[g * size]) -> [size] vectors of their i-th values */
INLINE void lanes_in(const float *restrict x, int size, v8f *restrict out) {
    for (int i = 0; i < size; i++)
        for (int g = 0; g < 8; g++) out[i][g] = x[g * size + i];
}

INLINE void lanes_out(const v8f v, float *restrict out) {
    for (int g = 0; g < 8; g++) out[g] = v[g];
}

/* --- Q4_K: d, dmin (float16), 12 bytes of 6-bit scales and mins, 128 bytes of 4-bit levels = 144 bytes --- */

INLINE void q4_k_block(const float *restrict x, uint8_t *restrict y) {
    v8f xs[32], ws[32], vscale, vmin;
    v8i Lg[32];
    float scales[8], mins[8];
    uint8_t L[QK_K], ls[8], lm[8];
    lanes_in(x, 32, xs);
    v8f sum_x2 = splat(0.0f);
    for (int i = 0; i < 32; i++) sum_x2 += xs[i] * xs[i];
    v8f av_x = sum_x2 / 32.0f;
    for (int g = 0; g < 8; g++) av_x[g] = sqrtf(av_x[g]);
    for (int i = 0; i < 32; i++) ws[i] = av_x + vabs(xs[i]);
    qkx2_search(32, xs, ws, 15, -1.0f, 0.1f, 20, 0, &vscale, &vmin, Lg);
    lanes_out(vscale, scales);
    lanes_out(vmin, mins);
    float max_scale = 0.0f, max_min = 0.0f;
    for (int j = 0; j < 8; j++) {
        max_scale = scales[j] > max_scale ? scales[j] : max_scale;
        max_min = mins[j] > max_min ? mins[j] : max_min;
    }
    const float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
    const float inv_min = max_min > 0 ? 63.0f / max_min : 0.0f;
    uint8_t *q = y + 4;
    for (int j = 0; j < 8; j++) {
        const uint8_t s = (uint8_t)nearest_int(inv_scale * scales[j]), m = (uint8_t)nearest_int(inv_min * mins[j]);
        ls[j] = s < 63 ? s : 63;
        lm[j] = m < 63 ? m : 63;
    }
    for (int j = 0; j < 4; j++) {
        q[j] = (uint8_t)(ls[j] | ((ls[j + 4] >> 4) << 6));
        q[j + 4] = (uint8_t)(lm[j] | ((lm[j + 4] >> 4) << 6));
        q[j + 8] = (uint8_t)((ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4));
    }
    const uint16_t d = f32_to_f16(max_scale / 63.0f), dmin = f32_to_f16(max_min / 63.0f);
    memcpy(y, &d, 2);
    memcpy(y + 2, &dmin, 2);
    const float df = f16_to_f32(d), dminf = f16_to_f32(dmin);
    for (int g = 0; g < 8; g++) {
        /* the levels again from the stored scale and min (6 bits each, what the packed bytes give back);
         * a group whose stored scale is 0 keeps its search's levels */
        const float dd = df * (float)ls[g], dm = dminf * (float)lm[g];
        for (int i = 0; i < 32; i++)
            L[32 * g + i] = (uint8_t)(dd == 0 ? Lg[i][g] : clamp(nearest_int((x[32 * g + i] + dm) / dd), 0, 15));
    }
    for (int j = 0; j < 4; j++)
        for (int l = 0; l < 32; l++) y[16 + 32 * j + l] = (uint8_t)(L[64 * j + l] | (L[64 * j + 32 + l] << 4));
}

MULTIVERSION
void adaptools_q4_k_encode(const float *x, int64_t b0, int64_t b1, uint8_t *out) {
    for (int64_t b = b0; b < b1; b++) q4_k_block(x + b * QK_K, out + b * 144);
}

/* the 6-bit scale and min of group j (ggml's get_scale_min_k4) */
INLINE void scale_min_k4(const uint8_t *q, int j, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

MULTIVERSION
void adaptools_q4_k_decode(const uint8_t *data, int64_t b0, int64_t b1, float *out) {
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *y = data + b * 144;
        uint16_t h;
        memcpy(&h, y, 2);
        const float d = f16_to_f32(h);
        memcpy(&h, y + 2, 2);
        const float dmin = f16_to_f32(h);
        float *dst = out + b * QK_K;
        for (int g = 0; g < 8; g++) {
            uint8_t sc, m;
            scale_min_k4(y + 4, g, &sc, &m);
            const float dd = d * (float)sc, dm = dmin * (float)m;
            const uint8_t *qs = y + 16 + 32 * (g / 2);
            const int shift = 4 * (g % 2);
            for (int l = 0; l < 32; l++) dst[32 * g + l] = dd * (float)((qs[l] >> shift) & 0xF) - dm;
        }
    }
}

/* --- Q6_K: 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales, d (float16) = 210 bytes ---------- */

INLINE void q6_k_block(const float *restrict x, uint8_t *restrict y) {
    v8f xs[16], vscale;
    v8i Lg[2][16];
    float scales[16];
    uint8_t L[QK_K];
    int8_t sc[16];
    for (int h = 0; h < 2; h++) { /* groups 0-7, then 8-15 */
        lanes_in(x + 128 * h, 16, xs);
        qx_search(16, xs, 32, &vscale, Lg[h]);
        lanes_out(vscale, scales + 8 * h);
    }
    float max_scale = 0.0f, max_abs = 0.0f;
    for (int j = 0; j < 16; j++) {
        const float a = fabsf(scales[j]);
        max_scale = a > max_abs ? scales[j] : max_scale;
        max_abs = a > max_abs ? a : max_abs;
    }
    if (max_abs < GROUP_MAX_EPS) { /* every group all zero */
        memset(y, 0, 210);
        return;
    }
    const float iscale = -128.0f / max_scale;
    const uint16_t d = f32_to_f16(1.0f / iscale);
    for (int j = 0; j < 16; j++) {
        const int32_t s = nearest_int(iscale * scales[j]);
        sc[j] = (int8_t)(s < 127 ? s : 127); /* wraps below -128, as the reference's int8 store */
    }
    const float df = f16_to_f32(d);
    for (int g = 0; g < 16; g++) {
        const float dd = df * (float)sc[g];
        for (int i = 0; i < 16; i++)
            L[16 * g + i] = (uint8_t)(dd == 0 ? Lg[g / 8][i][g % 8] : clamp(nearest_int(x[16 * g + i] / dd), -32, 31) + 32);
    }
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 32; l++) {
            const uint8_t *v = L + 128 * h + l;
            y[64 * h + l] = (uint8_t)((v[0] & 0xF) | ((v[64] & 0xF) << 4));
            y[64 * h + 32 + l] = (uint8_t)((v[32] & 0xF) | ((v[96] & 0xF) << 4));
            y[128 + 32 * h + l] = (uint8_t)((v[0] >> 4) | ((v[32] >> 4) << 2) | ((v[64] >> 4) << 4) | ((v[96] >> 4) << 6));
        }
    memcpy(y + 192, sc, 16);
    memcpy(y + 208, &d, 2);
}

MULTIVERSION
void adaptools_q6_k_encode(const float *x, int64_t b0, int64_t b1, uint8_t *out) {
    for (int64_t b = b0; b < b1; b++) q6_k_block(x + b * QK_K, out + b * 210);
}

MULTIVERSION
void adaptools_q6_k_decode(const uint8_t *data, int64_t b0, int64_t b1, float *out) {
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *y = data + b * 210;
        uint16_t h;
        memcpy(&h, y + 208, 2);
        const float d = f16_to_f32(h);
        float *dst = out + b * QK_K;
        for (int e = 0; e < QK_K; e++) {
            const int half = e / 128, k = (e % 128) / 32, l = e % 32;
            const int lo = (y[64 * half + 32 * (k & 1) + l] >> (4 * (k >> 1))) & 0xF;
            const int hi = (y[128 + 32 * half + l] >> (2 * k)) & 3;
            dst[e] = (d * (float)(int8_t)y[192 + e / 16]) * (float)((lo | (hi << 4)) - 32);
        }
    }
}
