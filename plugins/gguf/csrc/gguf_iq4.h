/* What the IQ4_NL and IQ4_XS codecs (gguf_iq4.c) share: the 16-entry non-linear level table and the search
 * for one 32-value block's scale. docs/gguf.md, "IQ4 encoders" says what the bytes rely on; the numpy
 * fallback plugins/gguf/iq4.py performs the same operations in the same order. Everything is float32, each
 * operation IEEE-rounded on its own (no -ffast-math, no FMA contraction), so the bytes are ggml's.
 */
#ifndef GGUF_IQ4_H
#define GGUF_IQ4_H

#include "gguf_kquants.h"

/* The levels a 4-bit index stands for (ggml's kvalues_iq4nl), ascending, first and last not symmetric. */
static const float IQ4_LEVELS[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
/* How many candidate scales each side of the first guess the search tries (ggml's ntry for these types). */
#define IQ4_TRIES 7

/* The index of the level nearest v, a tie going to the upper one; at or past either end, that end. A NaN
 * gives 15, as the reference's bisection does (every comparison false walks it to the top). Written as a
 * count, which is the bisection's answer for a sorted table and needs no branch. */
INLINE int iq4_index(float v) {
    if (v <= IQ4_LEVELS[0]) return 0;
    if (v >= IQ4_LEVELS[15]) return 15;
    int lo = 0; /* the last k in 1..14 with !(v < level[k]) */
    for (int k = 1; k < 15; k++) lo += !(v < IQ4_LEVELS[k]);
    return v - IQ4_LEVELS[lo] < IQ4_LEVELS[lo + 1] - v ? lo : lo + 1;
}

/* The weighted least-squares scale of 32 values x with weights w: from -max / -127 (max: the first value of
 * largest magnitude), then the 15 scales (t - 127) / max for t = -7..7, keeping the one whose sum of
 * w * level * x squared over sum w * level^2 is largest. 0 for a block whose magnitudes are all below
 * GROUP_MAX_EPS. */
INLINE float iq4_block_scale(const float *restrict x, const float *restrict w) {
    float amax = 0, max = 0;
    for (int j = 0; j < 32; j++) {
        const float a = fabsf(x[j]);
        if (a > amax) {
            amax = a;
            max = x[j];
        }
    }
    if (amax < GROUP_MAX_EPS) return 0;
    float id = 1 / (-max / IQ4_LEVELS[0]);
    float sumqx = 0, sumq2 = 0;
    for (int j = 0; j < 32; j++) {
        const float q = IQ4_LEVELS[iq4_index(id * x[j])];
        sumqx += w[j] * q * x[j];
        sumq2 += w[j] * q * q;
    }
    float d = sumq2 > 0 ? sumqx / sumq2 : 0.0f, best = d * sumqx;
    for (int t = -IQ4_TRIES; t <= IQ4_TRIES; t++) {
        id = (float)(t - 127) / max;
        sumqx = sumq2 = 0;
        for (int j = 0; j < 32; j++) {
            const float q = IQ4_LEVELS[iq4_index(id * x[j])];
            sumqx += w[j] * q * x[j];
            sumq2 += w[j] * q * q;
        }
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    return d;
}

/* The level nearest v in every lane: iq4_index's answer as the level itself (the search needs only that),
 * the two neighbours picked from the table held in two registers (a permute, no memory lookup). */
INLINE v8f iq4_level8(v8f v) {
    const v8f low = {-127, -104, -83, -65, -49, -35, -22, -10}, high = {1, 13, 25, 38, 53, 69, 89, 113};
    v8i lo = splati(0); /* the count of iq4_index, then both neighbours picked from the table's two halves */
    for (int k = 1; k < 15; k++) lo -= ~(v < IQ4_LEVELS[k]);
    const v8f below = __builtin_shuffle(low, high, lo), above = __builtin_shuffle(low, high, lo + 1);
    v8f q = sel(v - below < above - v, below, above);
    q = sel(v >= IQ4_LEVELS[15], splat(IQ4_LEVELS[15]), q);
    return sel(v <= IQ4_LEVELS[0], splat(IQ4_LEVELS[0]), q);
}

/* iq4_block_scale on 8 blocks side by side (x, w: [32] vectors of the 8 blocks' j-th values), each lane
 * performing the scalar code's operations in its order, conditions as selects. */
INLINE v8f iq4_block_scale8(const v8f *restrict x, const v8f *restrict w) {
    v8f amax = splat(0.0f), max = splat(0.0f);
    for (int j = 0; j < 32; j++) { /* the first element of largest magnitude */
        const v8f a = vabs(x[j]);
        max = sel(a > amax, x[j], max);
        amax = sel(a > amax, a, amax);
    }
    v8f id = splat(1.0f) / (-max / IQ4_LEVELS[0]);
    v8f sumqx = splat(0.0f), sumq2 = splat(0.0f);
    for (int j = 0; j < 32; j++) {
        const v8f q = iq4_level8(id * x[j]);
        sumqx += w[j] * q * x[j];
        sumq2 += w[j] * q * q;
    }
    v8f d = sel(sumq2 > 0.0f, sumqx / sumq2, splat(0.0f));
    v8f best = d * sumqx;
    for (int t = -IQ4_TRIES; t <= IQ4_TRIES; t++) {
        id = splat((float)(t - 127)) / max;
        sumqx = sumq2 = splat(0.0f);
        for (int j = 0; j < 32; j++) {
            const v8f q = iq4_level8(id * x[j]);
            sumqx += w[j] * q * x[j];
            sumq2 += w[j] * q * q;
        }
        const v8i take = (sumq2 > 0.0f) & (sumqx * sumqx > best * sumq2);
        d = sel(take, sumqx / sumq2, d);
        best = sel(take, d * sumqx, best);
    }
    return sel(amax < GROUP_MAX_EPS, splat(0.0f), d);
}

/* Each value's weight in its block's fit: x^2 without an importance matrix, else qw * sqrt(sigma2 + x^2) with
 * sigma2 = sum(x^2) * (2 / n) over the n values coded together (32 for IQ4_NL, 256 for IQ4_XS). */
INLINE void iq4_weights(const float *restrict x, int n, const float *restrict qw, float *restrict w) {
    if (!qw) {
        for (int j = 0; j < n; j++) w[j] = x[j] * x[j];
        return;
    }
    float sigma2 = 0;
    for (int j = 0; j < n; j++) sigma2 += x[j] * x[j];
    sigma2 *= 2.0f / (float)n;
    for (int j = 0; j < n; j++) w[j] = qw[j] * sqrtf(sigma2 + x[j] * x[j]);
}

/* 32 indices L -> 16 bytes: value j in the low nibble of byte j, value 16 + j in its high nibble */
INLINE void iq4_pack(const uint8_t *restrict L, uint8_t *restrict q) {
    for (int j = 0; j < 16; j++) q[j] = (uint8_t)(L[j] | (L[16 + j] << 4));
}

#endif
