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

int adaptools_packed_abi(void) { return 2; }

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

/* The tile's columns' groups as slots in a short list of its distinct groups (`groups`, at most `most`):
 * slot[k] is column k's. Returns how many groups the tile uses, or 0 when that is more than `most`. Runs of
 * one group (the usual `k / group` index) cost one comparison a column; the list is searched only where the
 * group changes, and the search gives up after `most` distinct groups (an act-order g_idx, say). */
static int64_t tile_groups(const int64_t *index, int64_t width, int64_t most, int64_t *groups, int32_t *slot) {
    int64_t found = 0, last = -1;
    int32_t current = 0;
    for (int64_t k = 0; k < width; k++) {
        if (index[k] != last) {
            last = index[k];
            int64_t j = 0;
            while (j < found && groups[j] != last) j++;
            if (j == found) {
                if (found == most) return 0;
                groups[found++] = last;
            }
            current = (int32_t)j;
        }
        slot[k] = current;
    }
    return found;
}

/* One rounded result per (group, code) of row n: table[slot << bits | c] = to_dtype(((float)c - z) * s), the
 * very expression of the per-value path, so a lookup gives the same bits (docs/plugins.md, "Packed integer
 * codes": a row's group has only 2^bits distinct results). float32 results are kept as their bits. */
static void row_table(int64_t n, int bits, const float *scales, int64_t scale_r, int64_t scale_g, const float *zeros,
                      int64_t zero_r, int64_t zero_g, float offset, const int64_t *groups, int64_t count,
                      int out_kind, uint32_t *table) {
    const int codes = 1 << bits;
    for (int64_t j = 0; j < count; j++) {
        const float s = scales[n * scale_r + groups[j] * scale_g];
        const float z = zeros ? zeros[n * zero_r + groups[j] * zero_g] : offset;
        uint32_t *entry = table + (j << bits);
        for (int c = 0; c < codes; c++) {
            const float v = ((float)c - z) * s;
            entry[c] = out_kind == 0 ? bits_of(v) : out_kind == 1 ? f32_to_bf16(v) : f32_to_f16(v);
        }
    }
}

/* out_kind: 0 = float32, 1 = bfloat16, 2 = float16. zeros may be NULL: then every zero point is `offset`.
 * scratch: 4 * TILE int64 per thread. Scale and zero offsets are 32-bit (the caller checks the scale and zero
 * tensors span fewer than 2^31 elements), which lets the gathers vectorize.
 *
 * Two ways to a value, the same bits: where a tile's columns use few groups (TABLE_SHARE below), each row
 * rounds its 2^bits results per group once into a table and every value is a lookup by group and code
 * (measured reason: per-value conversion and gathers were most of the time; benchmarks/packed_kernel.py,
 * docs/awq.md); otherwise each value is computed, its scale and zero point gathered per column. Codes packed along rows (along == 0: AWQ, GPTQ's transposed view) are read down a
 * column of words with a stride; the tile's words are copied to a contiguous row once and reused by every
 * result row whose codes share those words (8 for 4 bits). */
#define TABLE_SHARE 4 /* a table is built when its entries are at most width / TABLE_SHARE */

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
    uint32_t codes[TILE], column[TILE], table[TILE / TABLE_SHARE];
    int32_t slot[TILE];
    int64_t groups[TILE / TABLE_SHARE];
    float values[TILE];
    for (int64_t k0 = 0; k0 < cols; k0 += TILE) {
        const int64_t width = cols - k0 < TILE ? cols - k0 : TILE;
        const int64_t used = tile_groups(index + k0, width, (width / TABLE_SHARE) >> bits, groups, slot);
        if (used) {
            for (int64_t k = 0; k < width; k++) slot[k] <<= bits;
        } else {
            for (int64_t k = 0; k < width; k++) {
                soff[k] = (int32_t)(index[k0 + k] * scale_g);
                zoff[k] = (int32_t)(index[k0 + k] * zero_g);
            }
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
        int64_t copied = -1; /* the word row held in `column` (along == 0) */
        for (int64_t n = n0; n < n1; n++) {
            if (used)
                row_table(n, bits, scales, scale_r, scale_g, zeros, zero_r, zero_g, offset, groups, used, out_kind,
                          table);
            if (along == 1 && per) { /* whole codes in each word: a word at a time (k0 is a multiple of per) */
                const uint32_t *row = words + n * stride_r + (k0 / per) * stride_c;
                int shifts[32];
                for (int m = 0; m < per; m++) shifts[m] = bits * fields[m];
                const int64_t whole = width / per;
                for (int64_t j = 0; j < whole; j++) {
                    const uint32_t w = row[j * stride_c];
                    for (int m = 0; m < per; m++) codes[j * per + m] = (w >> shifts[m]) & mask;
                }
                for (int64_t k = whole * per; k < width; k++)
                    codes[k] = (row[whole * stride_c] >> shifts[k - whole * per]) & mask;
            } else if (along == 1) {
                const uint32_t *row = words + n * stride_r;
                for (int64_t k = 0; k < width; k++) {
                    const int shift = (int)(wnext[k] & 31);
                    codes[k] = extract(row[wofs[k]], row[wnext[k] >> 5], shift, mask);
                }
            } else {
                int64_t w;
                int shift;
                locate(n, bits, per, fields, &w, &shift);
                const uint32_t *first = words + w * stride_r + k0 * stride_c;
                if (shift + bits > 32) {
                    const uint32_t *second = first + stride_r;
                    for (int64_t k = 0; k < width; k++)
                        codes[k] = extract(first[k * stride_c], second[k * stride_c], shift, mask);
                } else {
                    if (w != copied) {
                        for (int64_t k = 0; k < width; k++) column[k] = first[k * stride_c];
                        copied = w;
                    }
                    if (used && out_kind != 0) { /* the common AWQ / GPTQ case in one loop: extract and look up */
                        uint16_t *dst = (uint16_t *)out + n * cols + k0;
                        for (int64_t k = 0; k < width; k++)
                            dst[k] = (uint16_t)table[slot[k] + ((column[k] >> shift) & mask)];
                        continue;
                    }
                    for (int64_t k = 0; k < width; k++) codes[k] = (column[k] >> shift) & mask;
                }
            }
            if (used) {
                if (out_kind == 0) {
                    uint32_t *dst = (uint32_t *)out + n * cols + k0;
                    for (int64_t k = 0; k < width; k++) dst[k] = table[slot[k] + codes[k]];
                } else {
                    uint16_t *dst = (uint16_t *)out + n * cols + k0;
                    for (int64_t k = 0; k < width; k++) dst[k] = (uint16_t)table[slot[k] + codes[k]];
                }
                continue;
            }
            const float *s = scales + n * scale_r;
            if (zeros) {
                const float *z = zeros + n * zero_r;
                for (int64_t k = 0; k < width; k++) values[k] = ((float)codes[k] - z[zoff[k]]) * s[soff[k]];
            } else {
                for (int64_t k = 0; k < width; k++) values[k] = ((float)codes[k] - offset) * s[soff[k]];
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

/* float8_e4m3fn codes times a float32 scale per tile (docs/plugins.md, "FP8 codes"):
 *
 *     out[r][c] = to_dtype(lut[code(r, c)] * scale[r / brow][c / bcol])
 *
 * the product in float32, then one rounding to the output dtype: the bits of the torch expression
 * `(codes.float() * scales).to(dtype)`. `lut` holds the 256 codes' float32 values as torch converts them (NaN
 * for 0x7F and 0xFF). A 16-bit scale widened to float32 gives torch's 16-bit product too: its significand times
 * the code's 4 bits is exact in float32, so the only rounding is the final one (docs/plugins.md). Tiles are
 * `brow` x `bcol` (the last row and column of tiles may be partial); the grid is row-major with `gcols` tiles a
 * row. The work covers the rows of tiles [t0, t1). Measured reason for C: torch converts float8 to 16 bits
 * at about 5 ns a value on one core, 5 s for a 1.1B model (benchmarks/ct_bases.py). */
MULTIVERSION
void adaptools_packed_fp8(const uint8_t *codes, const float *scale, const float *lut, int64_t rows, int64_t cols,
                          int64_t brow, int64_t bcol, int64_t gcols, int out_kind, void *out, int64_t t0, int64_t t1) {
    for (int64_t r = t0 * brow; r < rows && r < t1 * brow; r++) {
        const uint8_t *src = codes + r * cols;
        const float *scales = scale + (r / brow) * gcols;
        for (int64_t c0 = 0; c0 < cols; c0 += bcol) {
            const int64_t c1 = c0 + bcol < cols ? c0 + bcol : cols;
            const float s = scales[c0 / bcol];
            if (out_kind == 0) {
                float *dst = (float *)out + r * cols;
                for (int64_t c = c0; c < c1; c++) dst[c] = lut[src[c]] * s;
            } else if (out_kind == 1) {
                uint16_t *dst = (uint16_t *)out + r * cols;
                for (int64_t c = c0; c < c1; c++) dst[c] = f32_to_bf16(lut[src[c]] * s);
            } else {
                uint16_t *dst = (uint16_t *)out + r * cols;
                for (int64_t c = c0; c < c1; c++) dst[c] = f32_to_f16(lut[src[c]] * s);
            }
        }
    }
}

/* The merge's last step on a block of rows (docs/merge-engine.md, "Blocks of rows"):
 *
 *     out[i] = to_dtype(float32(base[i]) + delta[i])
 *
 * one float32 addition, then one rounding to the output dtype: the bits of torch's
 * `base.float().add_(delta)` then `out.copy_(...)`. base_kind and out_kind: 0 = float32, 1 = bfloat16,
 * 2 = float16. Returns how many results are not finite; the caller then computes the block again in torch,
 * so that NaN payloads, which this kernel does not promise to match, are torch's own. Measured reason for
 * C: the torch steps are four passes over each block (widen, add, round, the finite sum), this is one. */
/* bfloat16 rounding without f32_to_bf16's NaN branch, so that the loops below vectorize: a NaN may come out as
 * anything here, and is counted from the float32 sum instead (the caller then redoes the block in torch). */
static inline uint16_t bf16_finite(float f) {
    const uint32_t u = bits_of(f);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float widen(const void *base, int kind, int64_t i) {
    if (kind == 0) return ((const float *)base)[i];
    if (kind == 1) return bf16_to_f32(((const uint16_t *)base)[i]);
    return f16_to_f32(((const uint16_t *)base)[i]);
}

#define NONFINITE(u) ((uint32_t)(((u) & 0x7f800000u) == 0x7f800000u))

/* One loop per pair of kinds, each simple enough for the compiler to vectorize. */

MULTIVERSION
int64_t adaptools_packed_add(const void *base, int base_kind, const float *delta, void *out, int out_kind, int64_t n) {
    uint32_t bad = 0;
    int64_t total = 0;
    const uint16_t *b16 = (const uint16_t *)base;
    const float *b32 = (const float *)base;
    uint16_t *o16 = (uint16_t *)out;
    float *o32 = (float *)out;
    /* counts are summed per chunk in 32 bits (vectorizes), then added to a 64-bit total */
    for (int64_t start = 0; start < n; start += 1 << 20) {
        const int64_t stop = n - start < (1 << 20) ? n : start + (1 << 20);
        bad = 0;
        if (base_kind == 1 && out_kind == 1) {
            for (int64_t i = start; i < stop; i++) {
                const float v = bf16_to_f32(b16[i]) + delta[i];
                const uint16_t h = bf16_finite(v);
                o16[i] = h;
                bad += NONFINITE(bits_of(v)) | NONFINITE((uint32_t)h << 16);
            }
        } else if (out_kind == 1) {
            for (int64_t i = start; i < stop; i++) {
                const float v = widen(base, base_kind, i) + delta[i];
                const uint16_t h = bf16_finite(v);
                o16[i] = h;
                bad += NONFINITE(bits_of(v)) | NONFINITE((uint32_t)h << 16);
            }
        } else if (base_kind == 2 && out_kind == 2) {
            for (int64_t i = start; i < stop; i++) {
                const float v = f16_to_f32(b16[i]) + delta[i];
                const uint16_t h = f32_to_f16(v);
                o16[i] = h;
                bad += NONFINITE(bits_of(v)) | (uint32_t)((h & 0x7c00u) == 0x7c00u);
            }
        } else if (out_kind == 2) {
            for (int64_t i = start; i < stop; i++) {
                const float v = widen(base, base_kind, i) + delta[i];
                const uint16_t h = f32_to_f16(v);
                o16[i] = h;
                bad += NONFINITE(bits_of(v)) | (uint32_t)((h & 0x7c00u) == 0x7c00u);
            }
        } else if (base_kind == 0) {
            for (int64_t i = start; i < stop; i++) {
                const float v = b32[i] + delta[i];
                o32[i] = v;
                bad += NONFINITE(bits_of(v));
            }
        } else {
            for (int64_t i = start; i < stop; i++) {
                const float v = widen(base, base_kind, i) + delta[i];
                o32[i] = v;
                bad += NONFINITE(bits_of(v));
            }
        }
        total += bad;
    }
    return total;
}
