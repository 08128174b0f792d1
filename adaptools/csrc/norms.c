/* The survival report's sums in one pass (docs/merge-engine.md, "The survival report in C").
 *
 * Why C: the report's three norms, computed by torch a chunk at a time, cast every chunk of three tensors to
 * float32 and make a difference temporary per pair; for an 11.5M-value weight that is about 60 ms, four times
 * what the Q8_0 encoder itself takes, in the encoding thread that is a quantized merge's critical path. Here
 * each element of the three tensors is read once, widened exactly, and the three differences are taken in
 * float32 (as torch takes them) and squared and summed in float64.
 *
 * Built into the core's packed-kernel library (setup.py) with its own interface version, so that a library
 * from other sources is never called (adaptools/engine/quantized.py loads it).
 */
#include "adaptools_kernel.h"

/* The interface version adaptools/engine/quantized.py expects. */
int adaptools_norms_abi(void) { return 1; }

enum { KIND_F32 = 0, KIND_BF16 = 1, KIND_F16 = 2, CHUNK = 512 };

/* GCC/clang vector extensions: four float32 differences widened to float64 at once (each lane rounded on
 * its own, as the scalar code would; no reassociation within a lane, so no -ffast-math is needed). */
typedef float v4f __attribute__((vector_size(16)));
typedef double v4d __attribute__((vector_size(32)));

/* elements [start, start + n) of a tensor of `kind` (the codes of adaptools/packed.py KINDS), widened exactly
 * into `buffer`, or float32 data in place */
static const float *widen(const void *src, int kind, int64_t start, int64_t n, float *buffer) {
    if (kind == KIND_F32) return (const float *)src + start;
    const uint16_t *s = (const uint16_t *)src + start;
    if (kind == KIND_BF16) {
        for (int64_t i = 0; i < n; i++) buffer[i] = bf16_to_f32(s[i]);
    } else {
        for (int64_t i = 0; i < n; i++) buffer[i] = f16_to_f32(s[i]);
    }
    return buffer;
}

static inline v4f load4(const float *p) { v4f v; memcpy(&v, p, sizeof v); return v; }

/* sums[0..2] += the squared float32 differences (merged - base), (requantized - base), (requantized - merged)
 * over elements [start, stop), each widened, squared and summed in float64 (eight running sums per norm,
 * added at the end: a NaN or infinity anywhere makes its sum NaN or infinity, as in torch). */
MULTIVERSION void adaptools_norms_distances(const void *merged, int merged_kind, const void *base, int base_kind,
                                            const void *requantized, int requantized_kind, int64_t start,
                                            int64_t stop, double *sums) {
    float mb[CHUNK], bb[CHUNK], rb[CHUNK];
    v4d acc[3][2] = {{{0}}};
    double tail[3] = {0, 0, 0};
    for (int64_t at = start; at < stop; at += CHUNK) {
        const int64_t n = stop - at < CHUNK ? stop - at : CHUNK;
        const float *m = widen(merged, merged_kind, at, n, mb);
        const float *b = widen(base, base_kind, at, n, bb);
        const float *r = widen(requantized, requantized_kind, at, n, rb);
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            for (int h = 0; h < 2; h++) {
                const v4f mv = load4(m + i + 4 * h), bv = load4(b + i + 4 * h), rv = load4(r + i + 4 * h);
                const v4d d0 = __builtin_convertvector(mv - bv, v4d);
                const v4d d1 = __builtin_convertvector(rv - bv, v4d);
                const v4d d2 = __builtin_convertvector(rv - mv, v4d);
                acc[0][h] += d0 * d0;
                acc[1][h] += d1 * d1;
                acc[2][h] += d2 * d2;
            }
        }
        for (; i < n; i++) {
            const double d0 = (double)(m[i] - b[i]), d1 = (double)(r[i] - b[i]), d2 = (double)(r[i] - m[i]);
            tail[0] += d0 * d0;
            tail[1] += d1 * d1;
            tail[2] += d2 * d2;
        }
    }
    for (int k = 0; k < 3; k++) {
        double total = tail[k];
        for (int h = 0; h < 2; h++)
            for (int j = 0; j < 4; j++) total += acc[k][h][j];
        sums[k] += total;
    }
}

/* How many of bytes [start, stop) differ between `a` and `b` (the report's share of changed codes). */
MULTIVERSION int64_t adaptools_norms_bytes_differ(const uint8_t *a, const uint8_t *b, int64_t start, int64_t stop) {
    int64_t count = 0;
    for (int64_t at = start; at < stop; at += 4096) {
        const int64_t end = stop - at < 4096 ? stop : at + 4096;
        uint32_t part = 0; /* a 32-bit count per 4 KiB piece vectorizes; it cannot overflow */
        for (int64_t i = at; i < end; i++) part += a[i] != b[i];
        count += part;
    }
    return count;
}
