/* GGUF's older 32-value block types for adaptools: Q4_0, Q4_1, Q5_0 and Q5_1 encoding and decoding with the
 * bytes and values of gguf-py's numpy code (its quantize_blocks / dequantize_blocks), which codec.py uses
 * when this library is missing; docs/gguf.md, "The native codec". No -ffast-math, no FMA contraction.
 *
 * gguf-py per 32 values, all in float32:
 *   Q4_0/Q5_0: max = the first value of largest magnitude; d = max / -8 (-16); id = d ? 1 / d : 0;
 *              code = uint8(trunc(x * id + 8.5 (16.5))), at most 15 (31).
 *   Q4_1/Q5_1: d = (max - min) / 15 (31); id = d ? 1 / d : 0; code = uint8(trunc((x - min) * id + 0.5)),
 *              at most 15 (31); min stored as float16 too.
 * numpy's float -> uint8 goes through int32 on x86-64: the low byte of the truncated value, and 0 where it
 * is NaN or outside int32 (what the instruction gives: 0x80000000); to_u8 does the same. NaN propagates
 * through numpy's max and min (and argmax picks the first NaN), so it does here. Blocks [b0, b1).
 */
#include "adaptools_kernel.h"

/* numpy's float32 -> uint8 (astype) on x86-64 */
static inline uint8_t to_u8(float t) {
    return (uint8_t)(fabsf(t) < 2147483648.0f ? (uint32_t)(int32_t)t : 0x80000000u);
}

/* the first value of largest magnitude, or the first NaN (numpy's argmax of |x|) */
static inline float absmax_value(const float *v) {
    float best = -1.0f, value = 0.0f;
    for (int i = 0; i < 32; i++) {
        const float a = fabsf(v[i]);
        if (a != a) return v[i];
        if (a > best) {
            best = a;
            value = v[i];
        }
    }
    return value;
}

/* numpy's max and min: NaN if there is one */
static inline void max_min(const float *v, float *mx, float *mn) {
    float hi = v[0], lo = v[0];
    int nan = 0;
    for (int i = 0; i < 32; i++) {
        nan |= v[i] != v[i];
        hi = v[i] > hi ? v[i] : hi;
        lo = v[i] < lo ? v[i] : lo;
    }
    *mx = nan ? NAN : hi;
    *mn = nan ? NAN : lo;
}

/* the 32 codes of a symmetric block (offset: 8.5 or 16.5) or an asymmetric one (min subtracted, 0.5) */
static inline void codes(const float *v, float id, float min, int asym, float offset, uint8_t top, uint8_t *q) {
    for (int i = 0; i < 32; i++) {
        const float y = asym ? (v[i] - min) * id : v[i] * id;
        const uint8_t c = to_u8(truncf(y + offset));
        q[i] = c < top ? c : top;
    }
}

static inline void put16(uint8_t *dst, float f) {
    const uint16_t h = f32_to_f16(f);
    memcpy(dst, &h, 2);
}

static inline float get16(const uint8_t *src) {
    uint16_t h;
    memcpy(&h, src, 2);
    return f16_to_f32(h);
}

/* low nibbles: values 0-15 in the low half of each byte, 16-31 in the high half */
static inline void pack_nibbles(const uint8_t *q, uint8_t *qs) {
    for (int i = 0; i < 16; i++) qs[i] = (uint8_t)((q[i] & 0xF) | (q[i + 16] << 4));
}

/* the fifth bits, bit i of a little-endian uint32 for value i */
static inline void pack_high(const uint8_t *q, uint8_t *qh) {
    for (int k = 0; k < 4; k++) {
        uint8_t byte = 0;
        for (int i = 0; i < 8; i++) byte |= (uint8_t)((q[8 * k + i] >> 4) << i);
        qh[k] = byte;
    }
}

static inline int nibble(const uint8_t *qs, int i) { return i < 16 ? qs[i] & 0xF : qs[i - 16] >> 4; }

MULTIVERSION
void adaptools_q4_0_encode(const float *x, int64_t b0, int64_t b1, uint8_t *out) {
    for (int64_t b = b0; b < b1; b++) {
        const float *v = x + b * 32;
        uint8_t *y = out + b * 18, q[32];
        const float d = absmax_value(v) / -8.0f, id = d == 0.0f ? 0.0f : 1.0f / d;
        codes(v, id, 0.0f, 0, 8.5f, 15, q);
        put16(y, d);
        pack_nibbles(q, y + 2);
    }
}

MULTIVERSION
void adaptools_q4_0_decode(const uint8_t *data, int64_t b0, int64_t b1, float *out) {
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *y = data + b * 18;
        const float d = get16(y);
        for (int i = 0; i < 32; i++) out[b * 32 + i] = d * (float)(nibble(y + 2, i) - 8);
    }
}

MULTIVERSION
void adaptools_q4_1_encode(const float *x, int64_t b0, int64_t b1, uint8_t *out) {
    for (int64_t b = b0; b < b1; b++) {
        const float *v = x + b * 32;
        uint8_t *y = out + b * 20, q[32];
        float mx, mn;
        max_min(v, &mx, &mn);
        const float d = (mx - mn) / 15.0f, id = d == 0.0f ? 0.0f : 1.0f / d;
        codes(v, id, mn, 1, 0.5f, 15, q);
        put16(y, d);
        put16(y + 2, mn);
        pack_nibbles(q, y + 4);
    }
}

MULTIVERSION
void adaptools_q4_1_decode(const uint8_t *data, int64_t b0, int64_t b1, float *out) {
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *y = data + b * 20;
        const float d = get16(y), m = get16(y + 2);
        for (int i = 0; i < 32; i++) out[b * 32 + i] = d * (float)nibble(y + 4, i) + m;
    }
}

MULTIVERSION
void adaptools_q5_0_encode(const float *x, int64_t b0, int64_t b1, uint8_t *out) {
    for (int64_t b = b0; b < b1; b++) {
        const float *v = x + b * 32;
        uint8_t *y = out + b * 22, q[32];
        const float d = absmax_value(v) / -16.0f, id = d == 0.0f ? 0.0f : 1.0f / d;
        codes(v, id, 0.0f, 0, 16.5f, 31, q);
        put16(y, d);
        pack_high(q, y + 2);
        pack_nibbles(q, y + 6);
    }
}

MULTIVERSION
void adaptools_q5_0_decode(const uint8_t *data, int64_t b0, int64_t b1, float *out) {
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *y = data + b * 22;
        const float d = get16(y);
        for (int i = 0; i < 32; i++) {
            const int high = (y[2 + i / 8] >> (i % 8)) & 1;
            out[b * 32 + i] = d * (float)((nibble(y + 6, i) | (high << 4)) - 16);
        }
    }
}

MULTIVERSION
void adaptools_q5_1_encode(const float *x, int64_t b0, int64_t b1, uint8_t *out) {
    for (int64_t b = b0; b < b1; b++) {
        const float *v = x + b * 32;
        uint8_t *y = out + b * 24, q[32];
        float mx, mn;
        max_min(v, &mx, &mn);
        const float d = (mx - mn) / 31.0f, id = d == 0.0f ? 0.0f : 1.0f / d;
        codes(v, id, mn, 1, 0.5f, 31, q);
        put16(y, d);
        put16(y + 2, mn);
        pack_high(q, y + 4);
        pack_nibbles(q, y + 8);
    }
}

MULTIVERSION
void adaptools_q5_1_decode(const uint8_t *data, int64_t b0, int64_t b1, float *out) {
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *y = data + b * 24;
        const float d = get16(y), m = get16(y + 2);
        for (int i = 0; i < 32; i++) {
            const int high = (y[4 + i / 8] >> (i % 8)) & 1;
            out[b * 32 + i] = d * (float)(nibble(y + 8, i) | (high << 4)) + m;
        }
    }
}
