/* Packed-integer dequantization for adaptools (docs/plugins.md, "Packed integer codes"): small unsigned codes
 * packed into 32-bit words, each code minus a zero point, times a scale, both chosen per column by an index:
 *
 *     out[n][k] = to_dtype(((float)code(n, k) - zero[n][index[k]]) * scale[n][index[k]])
 *
 * in float32, each IEEE operation rounded on its own, then one rounding to the output dtype: the same bits as
 * the torch expression `((codes.float() - zeros) * scales).to(dtype)`. Nothing here knows a file format; the
 * caller says how its codes are laid out (a word stream along the result's rows or columns, the bit field each
 * code of a word sits in, the words' strides) and passes its zero points already unpacked.
 *
 * Loaded with ctypes (no Python API); adaptools/packed.py wraps it and each caller keeps a torch path with the
 * same bits for builds without a compiler. Must NOT be compiled with -ffast-math or FMA contraction.
 *
 * Layout. The result is `rows` x `cols`, row-major. The words form a 2-D array addressed as
 * words[i * stride_r + j * stride_c]:
 *   along == 1 (codes packed along the result's columns): i is the result row n, j the word of that row's
 *       stream of codes;
 *   along == 0 (packed along the result's rows): i is the word of a column's stream, j the result column k.
 * Code p of a stream lies at bit field fields[p % per] of word p / per when `bits` divides 32 (per = 32 / bits;
 * fields is the identity for a plain little-end-first stream), else (3 bits) at bits p * bits onwards of the
 * stream, possibly continuing in the next word.
 * The work covers result rows [n0, n1), so callers split it over threads.
 */
#include "adaptools_kernel.h"

int adaptools_packed_abi(void) { return 1; }

int adaptools_packed_isa(void) { return adaptools_isa(); }

/* Columns handled at a time: the per-column offsets (and, for codes packed along rows, the words of a tile)
 * stay in cache while every row of the range is produced. */
#define TILE 512

/* Word index and shift of stream code p. */
static inline void locate(int64_t p, int bits, int per, const uint8_t *fields, int64_t *word, int *shift) {
    if (per) {
        *word = p / per;
        *shift = bits * fields[p % per];
    } else {
        *word = (p * bits) >> 5;
        *shift = (int)((p * bits) & 31);
    }
}

/* The code whose low bit is bit `shift` of word `w0`, continuing into `w1` when it crosses the word's end. */
static inline uint32_t extract(uint32_t w0, uint32_t w1, int shift, uint32_t mask) {
    const uint64_t both = (uint64_t)w0 | ((uint64_t)w1 << 32);
    return (uint32_t)(both >> shift) & mask;
}

/* out_kind: 0 = float32, 1 = bfloat16, 2 = float16. zeros may be NULL: then every zero point is `offset`.
 * scratch: 4 * TILE int64 per thread. Scale and zero offsets are 32-bit (the caller checks the scale and zero
 * tensors span fewer than 2^31 elements), which lets the gathers vectorize. */
MULTIVERSION
void adaptools_packed_dequantize(const uint32_t *words, int64_t stride_r, int64_t stride_c, int along, int bits,
                                 const uint8_t *fields, const float *scales, int64_t scale_r, int64_t scale_g,
                                 const float *zeros, int64_t zero_r, int64_t zero_g, float offset,
                                 const int64_t *index, int64_t rows, int64_t cols, int out_kind, void *out,
                                 int64_t *scratch, int64_t n0, int64_t n1) {
    const uint32_t mask = (uint32_t)((UINT64_C(1) << bits) - 1);
    const int per = 32 % bits == 0 ? 32 / bits : 0;
    int64_t *wofs = scratch + 2 * TILE, *wnext = scratch + 3 * TILE;
    int32_t *soff = (int32_t *)scratch, *zoff = (int32_t *)(scratch + TILE);
    float codes[TILE], values[TILE];
    for (int64_t k0 = 0; k0 < cols; k0 += TILE) {
        const int64_t width = cols - k0 < TILE ? cols - k0 : TILE;
        for (int64_t k = 0; k < width; k++) {
            soff[k] = (int32_t)(index[k0 + k] * scale_g);
            zoff[k] = (int32_t)(index[k0 + k] * zero_g);
        }
        if (along == 1 && !per) { /* where each column's code sits in a row's stream: word offsets, shift in the top bits */
            for (int64_t k = 0; k < width; k++) {
                int64_t w;
                int shift;
                locate(k0 + k, bits, per, fields, &w, &shift);
                wofs[k] = w * stride_c;
                wnext[k] = ((shift + bits > 32 ? w + 1 : w) * stride_c) * 32 + shift;
            }
        }
        for (int64_t n = n0; n < n1; n++) {
            if (along == 1 && per) { /* whole codes in each word: a word at a time (k0 is a multiple of per) */
                const uint32_t *row = words + n * stride_r + (k0 / per) * stride_c;
                int shifts[32];
                for (int m = 0; m < per; m++) shifts[m] = bits * fields[m];
                const int64_t whole = width / per;
                for (int64_t j = 0; j < whole; j++) {
                    const uint32_t w = row[j * stride_c];
                    for (int m = 0; m < per; m++) codes[j * per + m] = (float)((w >> shifts[m]) & mask);
                }
                for (int64_t k = whole * per; k < width; k++)
                    codes[k] = (float)((row[whole * stride_c] >> shifts[k - whole * per]) & mask);
            } else if (along == 1) {
                const uint32_t *row = words + n * stride_r;
                for (int64_t k = 0; k < width; k++) {
                    const int shift = (int)(wnext[k] & 31);
                    codes[k] = (float)extract(row[wofs[k]], row[wnext[k] >> 5], shift, mask);
                }
            } else {
                int64_t w;
                int shift;
                locate(n, bits, per, fields, &w, &shift);
                const uint32_t *first = words + w * stride_r + k0 * stride_c;
                if (shift + bits > 32) {
                    const uint32_t *second = first + stride_r;
                    for (int64_t k = 0; k < width; k++)
                        codes[k] = (float)extract(first[k * stride_c], second[k * stride_c], shift, mask);
                } else {
                    for (int64_t k = 0; k < width; k++) codes[k] = (float)((first[k * stride_c] >> shift) & mask);
                }
            }
            const float *s = scales + n * scale_r;
            if (zeros) {
                const float *z = zeros + n * zero_r;
                for (int64_t k = 0; k < width; k++) values[k] = (codes[k] - z[zoff[k]]) * s[soff[k]];
            } else {
                for (int64_t k = 0; k < width; k++) values[k] = (codes[k] - offset) * s[soff[k]];
            }
            if (out_kind == 0) {
                memcpy((float *)out + n * cols + k0, values, (size_t)width * sizeof(float));
            } else if (out_kind == 1) {
                uint16_t *dst = (uint16_t *)out + n * cols + k0;
                for (int64_t k = 0; k < width; k++) dst[k] = f32_to_bf16(values[k]);
            } else {
                uint16_t *dst = (uint16_t *)out + n * cols + k0;
                for (int64_t k = 0; k < width; k++) dst[k] = f32_to_f16(values[k]);
            }
        }
    }
}
