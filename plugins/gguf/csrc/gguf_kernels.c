/* GGUF block codecs for adaptools: Q8_0 encoding and decoding with the same bytes and values as gguf-py's
 * numpy code (and ggml's quantize_row_q8_0_ref), which spends most of a GGUF merge's time (docs/gguf.md,
 * "The native codec"). Loaded with ctypes (no Python API); codec.py falls back to gguf-py when this library
 * is missing. Must NOT be compiled with -ffast-math or FMA contraction: each product is rounded on its own.
 *
 * A Q8_0 block is 34 bytes: the scale d as float16, then 32 int8 codes. Encoding, per 32 values:
 *   d = max|x| / 127 (float32);  id = d ? 1 / d : 0;  q = roundf(x * id) (halves away from zero);
 *   stored d = float16(d), rounded to nearest even. Decoding: float32(d) * q in float32.
 * Blocks [b0, b1) are processed, so callers split the work over threads.
 */
#include "adaptools_kernel.h"

/* 2: the K-quant codecs of gguf_kquants*.c joined the library; 3: Q4_0, Q4_1, Q5_0, Q5_1 (gguf_legacy.c);
 * 4: the importance-weighted encoders (gguf_imatrix.c); 5: IQ4_NL and IQ4_XS (gguf_iq4.c);
 * 6: adaptools_q8_0_encode_decoded */
int adaptools_gguf_abi(void) { return 6; }

int adaptools_gguf_isa(void) { return adaptools_isa(); }

/* one block: 32 values -> 34 bytes */
static inline __attribute__((always_inline)) void q8_0_block(const float *v, uint8_t *block) {
    /* |x| as bits orders as the value does and a NaN's bits exceed infinity's: an integer max that
     * vectorizes, NaN when there is one (numpy's max propagates it too) */
    uint32_t m = 0;
    for (int i = 0; i < 32; i++) {
        const uint32_t a = bits_of(v[i]) & 0x7fffffffu;
        m = a > m ? a : m;
    }
    const float d = float_of(m) / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const uint16_t h = f32_to_f16(d);
    memcpy(block, &h, 2);
    for (int i = 0; i < 32; i++) {
        /* roundf (halves away from zero) as truncation plus a step where the dropped part is at least a
         * half (exact: y - trunc(y) is), in selects that vectorize. A NaN (or, never for finite input, an
         * out-of-range) code has no defined int8; the engine refuses non-finite weights before they are
         * written, so 0 stands in. */
        const float y = v[i] * id, t = truncf(y);
        const float step = fabsf(y - t) >= 0.5f ? 1.0f : 0.0f;
        const float q = t + copysignf(step, y);
        const int ok = (q == q) & (fabsf(q) <= 127.0f);
        block[2 + i] = (uint8_t)(int8_t)(ok ? (int32_t)q : 0);
    }
}

/* one block's 34 bytes -> its 32 values */
static inline __attribute__((always_inline)) void q8_0_unblock(const uint8_t *block, float *dst) {
    uint16_t h;
    memcpy(&h, block, 2);
    const float d = f16_to_f32(h);
    for (int i = 0; i < 32; i++) dst[i] = (float)(int8_t)block[2 + i] * d;
}

MULTIVERSION
void adaptools_q8_0_encode(const float *x, int64_t b0, int64_t b1, uint8_t *out) {
    for (int64_t b = b0; b < b1; b++) q8_0_block(x + b * 32, out + b * 34);
}

/* Encoding and, from the bytes just written, the decoded values in the same pass (the merge decodes what it
 * writes to check it; docs/gguf.md, "Where a merge's time goes"): adaptools_q8_0_encode's bytes and
 * adaptools_q8_0_decode's values, block by block while the block is in registers and cache. */
MULTIVERSION
void adaptools_q8_0_encode_decoded(const float *x, int64_t b0, int64_t b1, uint8_t *out, float *values) {
    for (int64_t b = b0; b < b1; b++) {
        q8_0_block(x + b * 32, out + b * 34);
        q8_0_unblock(out + b * 34, values + b * 32);
    }
}

MULTIVERSION
void adaptools_q8_0_decode(const uint8_t *data, int64_t b0, int64_t b1, float *out) {
    for (int64_t b = b0; b < b1; b++) q8_0_unblock(data + b * 34, out + b * 32);
}
