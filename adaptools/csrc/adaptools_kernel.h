/* What adaptools' native kernels share (docs/plugins.md, "Native kernels"): exact float conversions with
 * torch's and numpy's rounding, the build-twice-pick-at-load attribute, and the instruction-set report.
 * Shipped with the package (adaptools/csrc), so a third-party plugin's kernel can include it too.
 *
 * Compile kernels without -ffast-math and without FMA contraction: these conversions and every product
 * are exact only when each IEEE operation is rounded on its own.
 */
#ifndef ADAPTOOLS_KERNEL_H
#define ADAPTOOLS_KERNEL_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* With GCC on x86-64 Linux, each kernel is built for AVX2 and for the baseline and one is picked at load
 * (ifunc): the wheel stays portable and AVX2 machines get 8-wide loops. Same arithmetic, same bits. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#define ADAPTOOLS_ISA_X86 1
#else
#define MULTIVERSION
#endif

/* 2 when the AVX2 build runs, 1 for the baseline (what `adaptools plugins` reports). */
static inline int adaptools_isa(void) {
#ifdef ADAPTOOLS_ISA_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") ? 2 : 1;
#else
    return 1;
#endif
}

static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float float_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* float32 -> bfloat16 bits, rounding to nearest even (torch); NaN stays NaN */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = bits_of(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* float32 -> float16 bits, rounding to nearest even, overflow to infinity (torch and numpy alike) */
static inline uint16_t f32_to_f16(float f) {
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

/* float16 bits -> float32, exactly (subnormals included) */
static inline float f16_to_f32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normalized = float_of((two_w >> 4) + (UINT32_C(0xE0) << 23)) * 0x1.0p-112f;
    const float denormalized = float_of((two_w >> 17) | (UINT32_C(126) << 23)) - 0.5f;
    return float_of(sign | (two_w < (UINT32_C(1) << 27) ? bits_of(denormalized) : bits_of(normalized)));
}

/* bfloat16 bits -> float32, exactly */
static inline float bf16_to_f32(uint16_t h) { return float_of((uint32_t)h << 16); }

#endif
