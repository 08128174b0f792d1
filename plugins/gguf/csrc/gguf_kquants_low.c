/* GGUF K-quant codecs for adaptools, the low-bit ones: Q2_K and Q3_K encoding with the bytes of ggml's
 * reference quantizer and decoding with gguf-py's values. Like gguf_kquants.c (Q4_K, Q5_K, Q6_K), a port of
 * plugins/gguf/kquants.py operation for operation, the 16 groups of 16 values of a super-block searched
 * eight at a time in vector lanes (gguf_kquants.h); docs/gguf.md, "The native codec". No -ffast-math, no
 * FMA contraction. Blocks [b0, b1) are processed, so callers split the work over threads.
 */
#include "gguf_kquants.h"

/* 2-bit levels of a super-block into 64 bytes: byte 32h + l holds values 128h + l + 32k at bits 2k */
INLINE void pack_2bit(const uint8_t *restrict L, uint8_t *restrict qs) {
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 32; l++) {
            const uint8_t *v = L + 128 * h + l;
            qs[32 * h + l] = (uint8_t)(v[0] | (v[32] << 2) | (v[64] << 4) | (v[96] << 6));
        }
}

/* --- Q2_K: 16 bytes of 4-bit scales and mins, 64 bytes of 2-bit levels, d, dmin (float16) = 84 bytes --- */

MULTIVERSION
void adaptools_q2_k_encode(const float *x, int64_t b0, int64_t b1, uint8_t *out) {
    for (int64_t b = b0; b < b1; b++) {
        const float *v = x + b * QK_K;
        uint8_t *y = out + b * 84, L[QK_K];
        v8f xs[16], ws[16], vscale, vmin;
        v8i Lg[2][16];
        float scales[16], mins[16];
        for (int h = 0; h < 2; h++) { /* groups 0-7, then 8-15; weights |x|, absolute error */
            lanes_in(v + 128 * h, 16, xs);
            for (int i = 0; i < 16; i++) ws[i] = vabs(xs[i]);
            qkx2_search(16, xs, ws, 3, -0.5f, 0.1f, 15, 1, &vscale, &vmin, Lg[h]);
            lanes_out(vscale, scales + 8 * h);
            lanes_out(vmin, mins + 8 * h);
        }
        float max_scale = 0.0f, max_min = 0.0f;
        for (int j = 0; j < 16; j++) {
            max_scale = scales[j] > max_scale ? scales[j] : max_scale;
            max_min = mins[j] > max_min ? mins[j] : max_min;
        }
        uint8_t *sc = y;
        for (int j = 0; j < 16; j++) {
            const int32_t ls = max_scale > 0 ? nearest_int(15.0f / max_scale * scales[j]) : 0;
            const int32_t lm = max_min > 0 ? nearest_int(15.0f / max_min * mins[j]) : 0;
            sc[j] = (uint8_t)(ls | (lm << 4)); /* as the reference's byte stores: wraps, high bits of ls kept */
        }
        const uint16_t d = max_scale > 0 ? f32_to_f16(max_scale / 15.0f) : 0;
        const uint16_t dmin = max_min > 0 ? f32_to_f16(max_min / 15.0f) : 0;
        memcpy(y + 80, &d, 2);
        memcpy(y + 82, &dmin, 2);
        const float df = f16_to_f32(d), dminf = f16_to_f32(dmin);
        for (int g = 0; g < 16; g++) {
            /* the levels again from the stored scale and min; a group whose stored scale is 0 keeps its
             * search's levels */
            const float dd = df * (float)(sc[g] & 0xF), dm = dminf * (float)(sc[g] >> 4);
            for (int i = 0; i < 16; i++)
                L[16 * g + i] = (uint8_t)(dd == 0 ? Lg[g / 8][i][g % 8]
                                                  : clamp(nearest_int((v[16 * g + i] + dm) / dd), 0, 3));
        }
        pack_2bit(L, y + 16);
    }
}

MULTIVERSION
void adaptools_q2_k_decode(const uint8_t *data, int64_t b0, int64_t b1, float *out) {
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *y = data + b * 84;
        uint16_t h;
        memcpy(&h, y + 80, 2);
        const float d = f16_to_f32(h);
        memcpy(&h, y + 82, 2);
        const float dmin = f16_to_f32(h);
        /* value 128h + 32k + l: bits 2k of byte 32h + l; each 16 values share a scale and min */
        for (int h = 0; h < 2; h++)
            for (int k = 0; k < 4; k++)
                for (int s = 0; s < 2; s++) {
                    const uint8_t sc = y[8 * h + 2 * k + s], *qs = y + 16 + 32 * h + 16 * s;
                    const float dd = d * (float)(sc & 0xF), dm = dmin * (float)(sc >> 4);
                    float *dst = out + b * QK_K + 128 * h + 32 * k + 16 * s;
                    for (int l = 0; l < 16; l++) dst[l] = dd * (float)((qs[l] >> (2 * k)) & 3) - dm;
                }
    }
}

/* --- Q3_K: 32 bytes of high bits, 64 of 2-bit low levels, 12 of 6-bit scales, d (float16) = 110 bytes --- */

MULTIVERSION
void adaptools_q3_k_encode(const float *x, int64_t b0, int64_t b1, uint8_t *out) {
    for (int64_t b = b0; b < b1; b++) {
        const float *v = x + b * QK_K;
        uint8_t *y = out + b * 110, L[QK_K];
        v8f xs[16], vscale;
        v8i Lg[2][16];
        float scales[16];
        for (int h = 0; h < 2; h++) {
            lanes_in(v + 128 * h, 16, xs);
            q3_search(16, xs, 4, &vscale, Lg[h]);
            lanes_out(vscale, scales + 8 * h);
        }
        float max_scale = 0.0f, amax = 0.0f;
        for (int j = 0; j < 16; j++) {
            const float a = fabsf(scales[j]);
            max_scale = a > amax ? scales[j] : max_scale;
            amax = a > amax ? a : amax;
        }
        int32_t l6[16]; /* the 6-bit scales, offset by 32 */
        uint16_t d = 0;
        const float iscale = -32.0f / max_scale;
        for (int j = 0; j < 16; j++) { /* through int8, as the reference's store; all 0 without a scale */
            const int32_t l = (int8_t)nearest_int(iscale * scales[j]);
            l6[j] = max_scale != 0 ? clamp(l, -32, 31) + 32 : 0;
        }
        if (max_scale != 0) d = f32_to_f16(1.0f / iscale);
        uint8_t *packed = y + 96;
        for (int j = 0; j < 8; j++) packed[j] = (uint8_t)((l6[j] & 0xF) | ((l6[j + 8] & 0xF) << 4));
        for (int j = 0; j < 4; j++)
            packed[8 + j] = (uint8_t)((l6[j] >> 4) | ((l6[j + 4] >> 4) << 2) | ((l6[j + 8] >> 4) << 4) |
                                      ((l6[j + 12] >> 4) << 6));
        memcpy(y + 108, &d, 2);
        const float df = f16_to_f32(d);
        for (int g = 0; g < 16; g++) {
            const float dd = df * (float)(l6[g] - 32);
            for (int i = 0; i < 16; i++)
                L[16 * g + i] = (uint8_t)(dd == 0 ? Lg[g / 8][i][g % 8]
                                                  : clamp(nearest_int(v[16 * g + i] / dd), -4, 3) + 4);
        }
        uint8_t *hmask = y, low[QK_K];
        memset(hmask, 0, 32);
        for (int e = 0; e < QK_K; e++) { /* the third bit of value e in bit e / 32 of byte e % 32 */
            hmask[e % 32] |= (uint8_t)((L[e] > 3) << (e / 32));
            low[e] = L[e] > 3 ? (uint8_t)(L[e] - 4) : L[e];
        }
        pack_2bit(low, y + 32);
    }
}

MULTIVERSION
void adaptools_q3_k_decode(const uint8_t *data, int64_t b0, int64_t b1, float *out) {
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *y = data + b * 110, *packed = y + 96;
        uint16_t h;
        memcpy(&h, y + 108, 2);
        const float d = f16_to_f32(h);
        /* value 128h + 32k + l: low bits 2k of byte 32 + 32h + l, high bit 4h + k of byte l (its absence
         * subtracts 4); each 16 values (group j) share a 6-bit scale */
        for (int h = 0; h < 2; h++)
            for (int k = 0; k < 4; k++)
                for (int s = 0; s < 2; s++) {
                    const int j = 8 * h + 2 * k + s, lo = j < 8 ? packed[j] & 0xF : packed[j - 8] >> 4;
                    const int sc = (lo | (((packed[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
                    const float ds = d * (float)sc;
                    const uint8_t *qs = y + 32 + 32 * h + 16 * s, *hm = y + 16 * s;
                    float *dst = out + b * QK_K + 128 * h + 32 * k + 16 * s;
                    for (int l = 0; l < 16; l++)
                        dst[l] = ds * (float)(((qs[l] >> (2 * k)) & 3) - (((hm[l] >> (4 * h + k)) & 1) ? 0 : 4));
                }
    }
}
