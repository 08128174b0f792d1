/* GGUF K-quant codecs for adaptools: Q4_K, Q5_K and Q6_K encoding with the bytes of ggml's reference quantizer
 * (the path llama.cpp's quantizer takes without an importance matrix) and decoding with gguf-py's values.
 * A C port of plugins/gguf/kquants.py, operation for operation: the numpy code is the specification and
 * docs/gguf.md ("K-quant encoders", "The native codec") says what the bytes rely on. Same rules as
 * gguf_kernels.c: no -ffast-math, no FMA contraction, every float32 operation rounded on its own.
 *
 * The searches (gguf_kquants.h) work on eight groups of a super-block side by side, element-major (the
 * numpy code's layout): each group's sums are still accumulated one element at a time in the reference's
 * order, in its own vector lane, so vectorizing reorders no sum. Blocks [b0, b1) are processed, so callers
 * split the work over threads. Q2_K and Q3_K are in gguf_kquants_low.c.
 */
#include "gguf_kquants.h"

/* --- Q4_K and Q5_K: d, dmin (float16) and 12 bytes of 6-bit scales and mins, then the levels: Q4_K 128
 * bytes of nibbles (144 bytes in all), Q5_K 32 bytes of high bits and 128 of nibbles (176) ------------------ */

/* The head (d, dmin, scales: 16 bytes at y) of a Q4_K (nmax 15) or Q5_K (nmax 31) block and its levels L */
INLINE void qkx_block(const float *restrict x, uint8_t *restrict y, const int nmax, const float rmin,
                      const int nstep, uint8_t *restrict L) {
    v8f xs[32], ws[32], vscale, vmin;
    v8i Lg[32];
    float scales[8], mins[8];
    uint8_t ls[8], lm[8];
    lanes_in(x, 32, xs);
    v8f sum_x2 = splat(0.0f);
    for (int i = 0; i < 32; i++) sum_x2 += xs[i] * xs[i];
    v8f av_x = sum_x2 / 32.0f;
    for (int g = 0; g < 8; g++) av_x[g] = sqrtf(av_x[g]);
    for (int i = 0; i < 32; i++) ws[i] = av_x + vabs(xs[i]);
    qkx2_search(32, xs, ws, nmax, rmin, 0.1f, nstep, 0, &vscale, &vmin, Lg);
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
            L[32 * g + i] = (uint8_t)(dd == 0 ? Lg[i][g] : clamp(nearest_int((x[32 * g + i] + dm) / dd), 0, nmax));
    }
}

MULTIVERSION
void adaptools_q4_k_encode(const float *x, int64_t b0, int64_t b1, uint8_t *out) {
    for (int64_t b = b0; b < b1; b++) {
        uint8_t L[QK_K], *y = out + b * 144;
        qkx_block(x + b * QK_K, y, 15, -1.0f, 20, L);
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 32; l++) y[16 + 32 * j + l] = (uint8_t)(L[64 * j + l] | (L[64 * j + 32 + l] << 4));
    }
}

MULTIVERSION
void adaptools_q5_k_encode(const float *x, int64_t b0, int64_t b1, uint8_t *out) {
    for (int64_t b = b0; b < b1; b++) {
        uint8_t L[QK_K], *y = out + b * 176;
        qkx_block(x + b * QK_K, y, 31, -0.5f, 15, L);
        uint8_t *qh = y + 16, *ql = y + 48;
        memset(qh, 0, 32);
        for (int j = 0; j < 4; j++) /* groups 2j and 2j+1: low nibbles in ql, the fifth bits in bits 2j, 2j+1 */
            for (int l = 0; l < 32; l++) {
                const uint8_t lo = L[64 * j + l], hi = L[64 * j + 32 + l];
                ql[32 * j + l] = (uint8_t)((lo & 0xF) | ((hi & 0xF) << 4));
                qh[l] |= (uint8_t)(((lo >> 4) << (2 * j)) | ((hi >> 4) << (2 * j + 1)));
            }
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

MULTIVERSION
void adaptools_q5_k_decode(const uint8_t *data, int64_t b0, int64_t b1, float *out) {
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *y = data + b * 176;
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
            const uint8_t *ql = y + 48 + 32 * (g / 2), *qh = y + 16;
            const int shift = 4 * (g % 2);
            for (int l = 0; l < 32; l++)
                dst[32 * g + l] = dd * (float)(((ql[l] >> shift) & 0xF) | (((qh[l] >> g) & 1) << 4)) - dm;
        }
    }
}

/* --- Q6_K: 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales, d (float16) = 210 bytes ---------- */

INLINE void q6_k_block(const float *restrict x, uint8_t *restrict y) {
    v8f xs[16], ws[16], vscale;
    v8i Lg[2][16];
    float scales[16];
    uint8_t L[QK_K];
    int8_t sc[16];
    for (int h = 0; h < 2; h++) { /* groups 0-7, then 8-15 */
        lanes_in(x + 128 * h, 16, xs);
        for (int i = 0; i < 16; i++) ws[i] = xs[i] * xs[i]; /* the reference's weights without an imatrix */
        qx_search(16, xs, ws, 32, &vscale, Lg[h]);
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
        /* value 128h + 32k + l: low bits in nibble k / 2 of ql byte 64h + 32(k % 2) + l, high bits at 2k of
         * qh byte 32h + l; each 16 values share a scale */
        for (int h = 0; h < 2; h++)
            for (int k = 0; k < 4; k++)
                for (int s = 0; s < 2; s++) {
                    const uint8_t *ql = y + 64 * h + 32 * (k & 1) + 16 * s, *qh = y + 128 + 32 * h + 16 * s;
                    const float ds = d * (float)(int8_t)y[192 + 8 * h + 2 * k + s];
                    float *dst = out + b * QK_K + 128 * h + 32 * k + 16 * s;
                    for (int l = 0; l < 16; l++)
                        dst[l] = ds * (float)((((ql[l] >> (4 * (k >> 1))) & 0xF) | (((qh[l] >> (2 * k)) & 3) << 4)) - 32);
                }
    }
}
