/* What the K-quant codecs share (gguf_kquants.c, gguf_kquants_low.c): ggml's nearest_int, and the three
 * per-group searches of ggml's reference quantizer (make_qkx2_quants, make_qx_quants, make_q3_quants) as
 * plugins/gguf/kquants.py performs them, on eight groups at once. Everything here is inlined into the
 * kernels (no vector crosses a call). docs/gguf.md, "K-quant encoders" and "The native codec".
 */
#ifndef GGUF_KQUANTS_H
#define GGUF_KQUANTS_H

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

/* make_qx_quants (rmse_type 1) on 8 groups of N values (x, w: [N] vectors): a symmetric grid of -nmax..nmax-1
 * with weights w, 18 candidate scales around -nmax / max. Out: each group's scale and its levels + nmax.
 * The reference's unweighted path is this one with w = x*x (kquants.make_qx_quants, in lanes); with an
 * importance matrix w is the column's weighting (gguf_imatrix.h, qx_lanes). One search for both: the
 * products are the same, ((x*x)*x)*l and (x*x)*l*l, so the bytes are (docs/gguf.md, "Importance matrices"). */
INLINE void qx_search(const int N, const v8f *restrict x, const v8f *restrict w, const int nmax,
                      v8f *restrict scale_out, v8i *restrict L) {
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
            const v8f l = tof(clampv(nearest(iscale * x[i]), -nmax, nmax - 1));
            sumlx += w[i] * x[i] * l;
            suml2 += w[i] * l * l;
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

/* make_q3_quants (with its refinement) on 8 groups of N values: a symmetric grid of -nmax..nmax-1 from
 * -nmax / max, then each level moved one at a time where that improves the x*x-weighted fit, 5 passes (a
 * pass that changes nothing would change nothing again, so every group runs all 5). Out: each group's
 * scale and its levels + nmax. kquants.make_q3_quants, in lanes. */
INLINE void q3_search(const int N, const v8f *restrict x, const int nmax, v8f *restrict scale_out,
                      v8i *restrict L) {
    v8f amax = splat(0.0f), mx = splat(0.0f), sumlx = splat(0.0f), suml2 = splat(0.0f);
    for (int i = 0; i < N; i++) { /* the first element of largest magnitude */
        const v8f a = vabs(x[i]);
        mx = sel(a > amax, x[i], mx);
        amax = sel(a > amax, a, amax);
    }
    const v8f iscale = splat((float)(-nmax)) / mx;
    for (int i = 0; i < N; i++) {
        L[i] = clampv(nearest(iscale * x[i]), -nmax, nmax - 1);
        const v8f w = x[i] * x[i], l = tof(L[i]);
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    for (int pass = 0; pass < 5; pass++)
        for (int i = 0; i < N; i++) {
            const v8f w = x[i] * x[i], li = tof(L[i]);
            const v8f slx = sumlx - w * x[i] * li, sl2 = suml2 - w * li * li;
            const v8i nl = clampv(nearest(x[i] * sl2 / slx), -nmax, nmax - 1);
            const v8f nf = tof(nl);
            const v8f slx_new = slx + w * x[i] * nf, sl2_new = sl2 + w * nf * nf;
            const v8i take = (slx > 0.0f) & (nl != L[i]) & (sl2_new > 0.0f) &
                             (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new);
            L[i] = seli(take, nl, L[i]);
            sumlx = sel(take, slx_new, sumlx);
            suml2 = sel(take, sl2_new, suml2);
        }
    const v8i zero = amax < GROUP_MAX_EPS; /* all zero */
    *scale_out = sel(zero | ~(suml2 > 0.0f), splat(0.0f), sumlx / suml2);
    for (int i = 0; i < N; i++) L[i] = seli(zero, splati(0), L[i] + nmax);
}

/* 8 groups of `size` values from x (group g at x[g * size]) -> [size] vectors of their i-th values */
INLINE void lanes_in(const float *restrict x, int size, v8f *restrict out) {
    for (int i = 0; i < size; i++)
        for (int g = 0; g < 8; g++) out[i][g] = x[g * size + i];
}

INLINE void lanes_out(const v8f v, float *restrict out) {
    for (int g = 0; g < 8; g++) out[g] = v[g];
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

#endif
