/* Fine-grained FP8 (float8_e4m3fn values, one float32 scale per tile) kernels for adaptools, giving the same
 * bits as the torch expressions in adaptools_plugins/fp8/codec.py (transformers' dequantizer and quantizer;
 * docs/fp8.md, "The native kernel"), about ten times faster: one pass over the codes instead of five.
 *
 * Loaded with ctypes (no Python API); codec.py falls back to the torch expressions when this library is
 * missing. Must NOT be compiled with -ffast-math or FMA contraction: exactness needs each IEEE product and
 * division rounded on its own, and subnormals kept.
 *
 * A weight is `rows` x `cols`, row-major; tiles are `brow` x `bcol` (the last row and column of tiles may be
 * partial); the scale grid is row-major with `gcols` tiles per row. Both kernels process the rows of tiles
 * [t0, t1), so callers split the work over threads.
 */
#include "adaptools_kernel.h"

int adaptools_fp8_abi(void) { return 3; }

int adaptools_fp8_isa(void) { return adaptools_isa(); }

static inline uint8_t e4m3fn_of_clamped(float f) {
    /* e4m3fn(clamp(f, -448, 448)), rounding to nearest even as torch (c10) does, in integer selects only so
     * that the loop vectorizes: |f| above 448 (infinity included) becomes 448 and a NaN stays NaN (0x7F);
     * below 2^-6, the smallest normal, a multiple of the subnormal step 2^-9 is found by adding 2^14; else
     * the mantissa is rounded by a bias of 0x7FFFF plus its lowest kept bit. */
    const uint32_t fp8_max = UINT32_C(1087) << 20, denorm_mask = UINT32_C(141) << 23, max448 = 0x43E00000u;
    const uint32_t w = bits_of(f), sign = w & 0x80000000u;
    uint32_t u = w ^ sign;
    const uint32_t over = 0u - (uint32_t)((u > max448) & (u <= 0x7f800000u)); /* all ones where clamped */
    u = (u & ~over) | (max448 & over);
    const uint32_t sub = bits_of(float_of(u) + float_of(denorm_mask)) - denorm_mask;
    const uint32_t normal = (u + ((uint32_t)(7 - 127) << 23) + 0x7FFFFu + ((u >> 20) & 1u)) >> 20;
    const uint32_t small = 0u - (uint32_t)(u < (UINT32_C(121) << 23));
    const uint32_t nan = 0u - (uint32_t)(u >= fp8_max);
    const uint32_t result = (((sub & small) | (normal & ~small)) & ~nan) | (0x7fu & nan);
    return (uint8_t)(result | (sign >> 24));
}

/* Dequantization is adaptools' shared kernel (adaptools/csrc/packed_kernels.c, adaptools_packed_fp8). */

/* One row of the input as float32 (exact widening). */
static void widen_row(const void *input, int in_kind, int64_t offset, int64_t n, float *row) {
    if (in_kind == 1) {
        const uint16_t *src = (const uint16_t *)input + offset;
        for (int64_t i = 0; i < n; i++) row[i] = float_of((uint32_t)src[i] << 16);
    } else if (in_kind == 2) {
        const uint16_t *src = (const uint16_t *)input + offset;
        for (int64_t i = 0; i < n; i++) row[i] = f16_to_f32(src[i]);
    } else {
        memcpy(row, (const float *)input + offset, (size_t)n * sizeof(float));
    }
}

/* in_kind: 0 = float32, 1 = bfloat16, 2 = float16. Per tile: amax = the largest |x| (NaN if any x is NaN,
 * written to `amax` for the caller to refuse), scale = (1 / amax) * 448 in float32 (torch's 448.0 / t), 1 for
 * an all-zero tile; scale_inv = 1 / scale; each code = e4m3fn(clamp(x * scale, -448, 448)). `row` is scratch
 * space for one row of `cols` floats per thread. A row of tiles is read twice: once for the amax, once to
 * encode, one input row at a time. */
MULTIVERSION
void adaptools_fp8_quantize(const void *input, int in_kind, int64_t rows, int64_t cols, int64_t brow,
                            int64_t bcol, int64_t gcols, uint8_t *codes, float *scale_inv, float *amax,
                            float *row, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
        const int64_t r0 = t * brow, r1 = r0 + brow < rows ? r0 + brow : rows;
        float *m = amax + t * gcols, *inv = scale_inv + t * gcols;
        for (int64_t g = 0; g < gcols; g++) m[g] = 0.0f;
        for (int64_t r = r0; r < r1; r++) {
            widen_row(input, in_kind, r * cols, cols, row);
            for (int64_t g = 0; g < gcols; g++) {
                const int64_t c0 = g * bcol, c1 = c0 + bcol < cols ? c0 + bcol : cols;
                /* |x| as bits orders as the value does, and any NaN's bits exceed infinity's: an integer
                 * max (which vectorizes) is the largest |x|, or a NaN when there is one */
                uint32_t best = bits_of(m[g]);
                const uint32_t *bits = (const uint32_t *)row;
                for (int64_t c = c0; c < c1; c++) {
                    const uint32_t a = bits[c] & 0x7fffffffu;
                    best = a > best ? a : best;
                }
                m[g] = float_of(best);
            }
        }
        for (int64_t g = 0; g < gcols; g++) {
            const float scale = m[g] > 0.0f ? (1.0f / m[g]) * 448.0f : 1.0f;
            inv[g] = 1.0f / scale;
        }
        for (int64_t r = r0; r < r1; r++) {
            widen_row(input, in_kind, r * cols, cols, row);
            uint8_t *dst = codes + r * cols;
            for (int64_t g = 0; g < gcols; g++) {
                const int64_t c0 = g * bcol, c1 = c0 + bcol < cols ? c0 + bcol : cols;
                const float scale = m[g] > 0.0f ? (1.0f / m[g]) * 448.0f : 1.0f;
                for (int64_t c = c0; c < c1; c++) dst[c] = e4m3fn_of_clamped(row[c] * scale);
            }
        }
    }
}
