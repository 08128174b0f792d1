/* The importance-weighted searches the encoders of gguf_imatrix.c share: the reference encoder's symmetric,
 * asymmetric and positive-grid fits with per-value weights, in scalar code (one group) and in the lanes of
 * gguf_kquants.h (eight groups side by side, each lane the scalar code's operations). docs/gguf.md,
 * "Importance matrices". Included by gguf_imatrix.c only.
 */
#ifndef GGUF_IMATRIX_H
#define GGUF_IMATRIX_H

#include "gguf_kquants.h"

#define MAXF(a, b) ((a) > (b) ? (a) : (b))
#define MINF(a, b) ((a) < (b) ? (a) : (b))

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

/* The asymmetric fit on 8 groups of n values side by side (group g at x[g * n], its weights at w[g * n]):
 * the header's lane search is the same search as qkx3_weighted, operation for operation, for the 37-step
 * ladder used here (a group whose values are all equal gives levels 0 and scale 0 in both). */
INLINE void qkx3_lanes(const int n, const int nmax, const float *x, const float *w, uint8_t *L, float *scales,
                       float *mins) {
    v8f xv[32], wv[32];
    v8i Lv[32];
    v8f sc, mn;
    lanes_in(x, n, xv);
    lanes_in(w, n, wv);
    qkx2_search(n, xv, wv, nmax, -0.9f, 0.05f, 36, 0, &sc, &mn, Lv);
    lanes_out(sc, scales);
    lanes_out(mn, mins);
    for (int i = 0; i < n; ++i)
        for (int g = 0; g < 8; ++g) L[g * n + i] = (uint8_t)Lv[i][g];
}

/* The symmetric search on 8 groups of n values side by side, with weights w in place of the reference's
 * x*x: the header's qx_search (which takes its weights), the groups moved into and out of its lanes. */
INLINE void qx_lanes(const int n, const int nmax, const float *x, const float *w, int8_t *L, float *scales) {
    v8f xv[32], wv[32], scale;
    v8i Lv[32];
    lanes_in(x, n, xv);
    lanes_in(w, n, wv);
    qx_search(n, xv, wv, nmax, &scale, Lv);
    lanes_out(scale, scales);
    for (int i = 0; i < n; ++i)
        for (int g = 0; g < 8; ++g) L[g * n + i] = (int8_t)Lv[i][g];
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

#endif
