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
#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

int adaptools_gguf_abi(void) { return 1; }

int adaptools_gguf_isa(void) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") ? 2 : 1;
#else
    return 1;
#endif
}

static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float float_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t f32_to_f16(float f) { /* round to nearest even, as numpy's astype(float16) */
    const float scale_to_inf = 0x1.0p+112f, scale_to_zero = 0x1.0p-110f;
    float base = (fabsf(f) * scale_to_inf) * scale_to_zero;
    const uint32_t w = bits_of(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = float_of((bias >> 1) + 0x07800000u) + base;
    const uint32_t b = bits_of(base);
    const uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

static inline float f16_to_f32(uint16_t h) { /* exact */
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normalized = float_of((two_w >> 4) + (UINT32_C(0xE0) << 23)) * 0x1.0p-112f;
    const float denormalized = float_of((two_w >> 17) | (UINT32_C(126) << 23)) - 0.5f;
    return float_of(sign | (two_w < (UINT32_C(1) << 27) ? bits_of(denormalized) : bits_of(normalized)));
}

MULTIVERSION
void adaptools_q8_0_encode(const float *x, int64_t b0, int64_t b1, uint8_t *out) {
    for (int64_t b = b0; b < b1; b++) {
        const float *v = x + b * 32;
        uint8_t *block = out + b * 34;
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
}

MULTIVERSION
void adaptools_q8_0_decode(const uint8_t *data, int64_t b0, int64_t b1, float *out) {
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *block = data + b * 34;
        uint16_t h;
        memcpy(&h, block, 2);
        const float d = f16_to_f32(h);
        float *dst = out + b * 32;
        for (int i = 0; i < 32; i++) dst[i] = (float)(int8_t)block[2 + i] * d;
    }
}
