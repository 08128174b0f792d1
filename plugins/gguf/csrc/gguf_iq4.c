/* IQ4_NL and IQ4_XS codecs for adaptools: encoding with the bytes of ggml's quantizer (the path
 * llama-quantize takes, with or without an importance matrix) and decoding with gguf-py's values.
 * docs/gguf.md, "IQ4 encoders" is the specification; plugins/gguf/iq4.py is the same encoder in numpy.
 *
 * IQ4_NL block (18 bytes, 32 values): d (float16), 16 bytes of 4-bit indices into IQ4_LEVELS; value = d * level.
 * IQ4_XS super-block (136 bytes, 256 values): d (float16), scales_h (uint16: 2 high bits of each of the 8
 * block scales), scales_l (4 bytes: their 4 low bits, two a byte), 128 bytes of indices; a block's scale is
 * d * (s - 32) for its 6-bit s. Blocks [b0, b1) (rows [r0, r1) for the weighted entry points) are processed,
 * so callers split the work over threads; every block is coded on its own.
 */
#include "gguf_iq4.h"

/* An IQ4_NL block from its scale d: d stored as float16, the indices taken again from 1 / d (float32). */
INLINE void iq4_nl_finish(const float *restrict x, float d, uint8_t *restrict y) {
    uint8_t L[32];
    const uint16_t h = f32_to_f16(d);
    memcpy(y, &h, 2);
    const float id = d != 0.0f ? 1 / d : 0.0f;
    for (int j = 0; j < 32; j++) L[j] = (uint8_t)iq4_index(id * x[j]);
    iq4_pack(L, y + 2);
}

/* One IQ4_NL block (the tails that do not fill eight lanes). */
INLINE void iq4_nl_block(const float *restrict x, const float *restrict qw, uint8_t *restrict y) {
    float w[32];
    iq4_weights(x, 32, qw, w);
    iq4_nl_finish(x, iq4_block_scale(x, w), y);
}

/* Eight consecutive IQ4_NL blocks (256 values, weights qw for them or NULL), their searches in lanes. */
INLINE void iq4_nl_blocks8(const float *restrict x, const float *restrict qw, uint8_t *restrict y) {
    float w[QK_K], d[8];
    v8f xs[32], ws[32];
    for (int b = 0; b < 8; b++) iq4_weights(x + 32 * b, 32, qw ? qw + 32 * b : NULL, w + 32 * b);
    lanes_in(x, 32, xs);
    lanes_in(w, 32, ws);
    lanes_out(iq4_block_scale8(xs, ws), d);
    for (int b = 0; b < 8; b++) iq4_nl_finish(x + 32 * b, d[b], y + 18 * b);
}

/* One IQ4_XS super-block: the 8 block scales are expressed as d * (s - 32), d = -(the scale of largest
 * magnitude) / 32 in float32 (stored as float16), s - 32 = nearest((1 / d) * scale) clamped to -32..31; each
 * block's indices are taken again from 1 / (d * (s - 32)). */
INLINE void iq4_xs_block(const float *restrict x, const float *restrict qw, uint8_t *restrict y) {
    float w[QK_K], scales[8], max_scale = 0, amax_scale = 0;
    v8f xs[32], ws[32];
    uint8_t L[32];
    iq4_weights(x, QK_K, qw, w);
    lanes_in(x, 32, xs);
    lanes_in(w, 32, ws);
    lanes_out(iq4_block_scale8(xs, ws), scales);
    for (int ib = 0; ib < 8; ib++) {
        if (fabsf(scales[ib]) > amax_scale) {
            amax_scale = fabsf(scales[ib]);
            max_scale = scales[ib];
        }
    }
    const float d = -max_scale / 32;
    const uint16_t h = f32_to_f16(d);
    memcpy(y, &h, 2);
    const float id = d != 0.0f ? 1 / d : 0.0f;
    uint16_t scales_h = 0;
    uint8_t *scales_l = y + 4, *q = y + 8;
    memset(scales_l, 0, 4);
    for (int ib = 0; ib < 8; ib++) {
        const int l = clamp(nearest_int(id * scales[ib]), -32, 31);
        const float dl = d * (float)l, idl = dl != 0.0f ? 1 / dl : 0.0f;
        for (int j = 0; j < 32; j++) L[j] = (uint8_t)iq4_index(idl * x[32 * ib + j]);
        iq4_pack(L, q + 16 * ib);
        const int s = l + 32;
        scales_l[ib / 2] |= (uint8_t)((s & 0xF) << (4 * (ib % 2)));
        scales_h |= (uint16_t)((s >> 4) << (2 * ib));
    }
    memcpy(y + 2, &scales_h, 2);
}

MULTIVERSION
void adaptools_iq4_nl_encode(const float *x, int64_t b0, int64_t b1, uint8_t *out) {
    int64_t b = b0;
    for (; b + 8 <= b1; b += 8) iq4_nl_blocks8(x + b * 32, NULL, out + b * 18);
    for (; b < b1; b++) iq4_nl_block(x + b * 32, NULL, out + b * 18);
}

MULTIVERSION
void adaptools_iq4_xs_encode(const float *x, int64_t b0, int64_t b1, uint8_t *out) {
    for (int64_t b = b0; b < b1; b++) iq4_xs_block(x + b * QK_K, NULL, out + b * 136);
}

/* Rows [r0, r1) of n_per_row values with importance weights: row r's are qw + (r / rows_per_weight) *
 * n_per_row (one vector per expert of a stacked tensor), each block taking the columns it covers. */
MULTIVERSION
void adaptools_iq4_nl_encode_weighted(const float *x, int64_t r0, int64_t r1, int64_t n_per_row, const float *qw,
                                      int64_t rows_per_weight, uint8_t *out) {
    const int64_t blocks = n_per_row / 32;
    for (int64_t r = r0; r < r1; r++) {
        const float *xr = x + r * n_per_row, *wr = qw + (r / rows_per_weight) * n_per_row;
        uint8_t *yr = out + r * blocks * 18;
        int64_t b = 0;
        for (; b + 8 <= blocks; b += 8) iq4_nl_blocks8(xr + b * 32, wr + b * 32, yr + b * 18);
        for (; b < blocks; b++) iq4_nl_block(xr + b * 32, wr + b * 32, yr + b * 18);
    }
}

MULTIVERSION
void adaptools_iq4_xs_encode_weighted(const float *x, int64_t r0, int64_t r1, int64_t n_per_row, const float *qw,
                                      int64_t rows_per_weight, uint8_t *out) {
    const int64_t blocks = n_per_row / QK_K;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t b = 0; b < blocks; b++)
            iq4_xs_block(x + r * n_per_row + b * QK_K, qw + (r / rows_per_weight) * n_per_row + b * QK_K,
                         out + (r * blocks + b) * 136);
}

/* Decoding, as gguf-py: IQ4_NL d * level; IQ4_XS (d * (s - 32)) * level, each product in float32. */
MULTIVERSION
void adaptools_iq4_nl_decode(const uint8_t *data, int64_t b0, int64_t b1, float *out) {
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *y = data + b * 18;
        uint16_t h;
        memcpy(&h, y, 2);
        const float d = f16_to_f32(h);
        float *dst = out + b * 32;
        for (int j = 0; j < 16; j++) {
            dst[j] = d * IQ4_LEVELS[y[2 + j] & 0xF];
            dst[16 + j] = d * IQ4_LEVELS[y[2 + j] >> 4];
        }
    }
}

MULTIVERSION
void adaptools_iq4_xs_decode(const uint8_t *data, int64_t b0, int64_t b1, float *out) {
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *y = data + b * 136;
        uint16_t h, scales_h;
        memcpy(&h, y, 2);
        memcpy(&scales_h, y + 2, 2);
        const float d = f16_to_f32(h);
        for (int ib = 0; ib < 8; ib++) {
            const int s = ((y[4 + ib / 2] >> (4 * (ib % 2))) & 0xF) | (((scales_h >> (2 * ib)) & 3) << 4);
            const float dl = d * (float)(s - 32);
            const uint8_t *q = y + 8 + 16 * ib;
            float *dst = out + b * QK_K + 32 * ib;
            for (int j = 0; j < 16; j++) {
                dst[j] = dl * IQ4_LEVELS[q[j] & 0xF];
                dst[16 + j] = dl * IQ4_LEVELS[q[j] >> 4];
            }
        }
    }
}
