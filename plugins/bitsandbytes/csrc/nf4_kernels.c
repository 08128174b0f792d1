/* 4-bit (NF4/FP4) block quantization kernels for adaptools, byte-identical to bitsandbytes 0.50.2 on CPU.
 *
 * Loaded with ctypes (no Python API); the Python side (adaptools_plugins/nf4.py) falls back to an
 * equivalent pure-torch path when this library is missing. Must NOT be compiled with -ffast-math:
 * exactness needs IEEE division, reciprocal and subnormals (absmax is clamped to the subnormal 1e-38f).
 *
 * quantize: the input (float32, or bfloat16 bits widened exactly) has n elements in flat row-major order,
 * cut into blocks of `bs` elements that ignore row boundaries. For block b: absmax[b] = max |x|; full
 * blocks scale by x * (1/absmax), the trailing partial block by x / absmax (bitsandbytes' torch backend
 * does exactly this); clamp to [-1,1]; the code index is the number of the 15 sorted midpoints strictly
 * below the value (ties go lower); `order` maps it to the stored nibble (identity for NF4); element 2k
 * goes to the high nibble of byte k. Blocks [b0, b1) are processed, so callers split work over threads.
 */
#include <stdint.h>
#include <string.h>
#include <math.h>

/* With GCC on x86-64, build each kernel twice, for AVX2 and for the baseline, and pick one at load time
 * (ifunc): the wheel stays portable and AVX2 machines get 8-wide compares. Same arithmetic either way, so
 * the same bytes. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch/c10 does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* in_kind: 0 = float32, 1 = bfloat16 */
MULTIVERSION
void adaptools_quantize_4bit(const void *input, int in_kind, int64_t n, int64_t bs, int64_t b0, int64_t b1,
                             const float *mid, const uint8_t *order, float *absmax, uint8_t *packed) {
    const int64_t full_blocks = n / bs;
    const float floor_ = 1e-38f;
    float md[15];
    for (int j = 0; j < 15; j++) md[j] = mid[j];
    float xb[4096 + 2];
    float scaled[4096 + 2];
    int32_t idx[4096 + 2]; /* int32, not uint8: the compares vectorize at full width */
    for (int64_t b = b0; b < b1; b++) {
        const int64_t start = b * bs;
        const int64_t len = (start + bs > n) ? n - start : bs;
        if (in_kind == 1) {
            const uint16_t *src = (const uint16_t *)input + start;
            for (int64_t i = 0; i < len; i++) xb[i] = bf16_to_f32(src[i]);
        } else {
            memcpy(xb, (const float *)input + start, (size_t)len * sizeof(float));
        }
        float am = 0.0f;
        for (int64_t i = 0; i < len; i++) {
            float a = fabsf(xb[i]);
            am = a > am ? a : am;
        }
        absmax[b] = am;
        const float denom = am < floor_ ? floor_ : am;
        if (b < full_blocks) {
            const float inv = 1.0f / denom;
            for (int64_t i = 0; i < len; i++) scaled[i] = xb[i] * inv;
        } else {
            for (int64_t i = 0; i < len; i++) scaled[i] = xb[i] / denom;
        }
        int64_t m = len;
        if (m & 1) scaled[m++] = 0.0f; /* odd n: pad with 0.0 */
        for (int64_t i = 0; i < m; i++) {
            float v = scaled[i];
            v = v < -1.0f ? -1.0f : v;
            scaled[i] = v > 1.0f ? 1.0f : v;
        }
        for (int64_t i = 0; i < m; i++) { /* per element, the 15 midpoints held in registers */
            const float v = scaled[i];
            int32_t c = 0;
            for (int j = 0; j < 15; j++) c += (md[j] < v);
            idx[i] = c;
        }
        uint8_t *out = packed + start / 2;
        for (int64_t i = 0; i < m; i += 2) out[i / 2] = (uint8_t)((order[idx[i]] << 4) | order[idx[i + 1]]);
    }
}

/* Blocks [b0, b1): out[i] = code[nibble(i)] * absmax[i / bs] in float32, stored as float32 (out_kind 0)
 * or rounded to bfloat16 (out_kind 1). n is the element count; bs is even. The 16 products of a block
 * are computed once into a table; each element is then one lookup (the same products, the same rounding). */
MULTIVERSION
void adaptools_dequantize_4bit(const uint8_t *packed, const float *absmax, const float *code, int64_t n, int64_t bs,
                               int64_t b0, int64_t b1, int out_kind, void *out) {
    float t32[16];
    uint16_t t16[16];
    for (int64_t b = b0; b < b1; b++) {
        const int64_t start = b * bs;
        const int64_t len = (start + bs > n) ? n - start : bs;
        const float s = absmax[b];
        for (int j = 0; j < 16; j++) {
            t32[j] = code[j] * s;
            t16[j] = f32_to_bf16(t32[j]);
        }
        const uint8_t *src = packed + start / 2;
        const int64_t pairs = len / 2;
        if (out_kind == 1) {
            uint16_t *dst = (uint16_t *)out + start;
            for (int64_t k = 0; k < pairs; k++) {
                dst[2 * k] = t16[src[k] >> 4];
                dst[2 * k + 1] = t16[src[k] & 0x0F];
            }
            if (len & 1) dst[len - 1] = t16[src[pairs] >> 4];
        } else {
            float *dst = (float *)out + start;
            for (int64_t k = 0; k < pairs; k++) {
                dst[2 * k] = t32[src[k] >> 4];
                dst[2 * k + 1] = t32[src[k] & 0x0F];
            }
            if (len & 1) dst[len - 1] = t32[src[pairs] >> 4];
        }
    }
}

/* The interface version the Python side expects (adaptools_plugins/nf4.py NATIVE_ABI): a library built
 * from other sources is refused at load, not called with the wrong arguments. */
int adaptools_nf4_abi(void) { return 2; }

/* Which clone the loader picked: 2 for AVX2, 0 for the baseline (for `adaptools plugins`). */
int adaptools_nf4_isa(void) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") ? 2 : 0;
#else
    return 0;
#endif
}
