/* Inline math shared by the CPU kernels (included by each .c file; kernels/build.py hashes this header into
 * every kernel's build key, so a change here rebuilds them). */
#ifndef NEOX_RAY_CPU_MATH_H
#define NEOX_RAY_CPU_MATH_H

#include <stdint.h>
#include <string.h>

/* A float's bit pattern and back (memcpy: the type pun C allows; compilers make it a register move). */
static inline uint32_t float_bits(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return bits;
}

static inline float bits_float(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* bfloat16 <-> float. Widening is exact; narrowing rounds to nearest even and keeps NaN a NaN, as torch does. */
static inline float bf16_to_float(uint16_t x) { return bits_float(((uint32_t)x) << 16); }

static inline uint16_t float_to_bf16(float f) {
    uint32_t bits = float_bits(f);
    if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu)) return (uint16_t)((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* exp(x) for x <= 0 within 2 ulp, 0 below -87.3 (past float's normal range); exp(0) is exactly 1. A
 * polynomial the compiler vectorises: libm's expf is a scalar call per element. NaN gives 0. */
static inline float exp_nonpositive(float x) {
    const float clamped = x > -87.33654f ? x : -87.33654f;
    const float n = __builtin_rintf(clamped * 1.44269504088896341f);
    float r = clamped - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t exponent = (int32_t)n + 127;
    const float scale = bits_float((uint32_t)(exponent > 0 ? exponent : 0) << 23);
    return x > -87.33654f ? p * scale : 0.0f;
}

#ifdef __AVX512F__
#include <immintrin.h>

/* 16 floats from 16 float32 / bfloat16 / int8 values (all exact). */
static inline __m512 load16_f32(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16_bf16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline __m512 load16_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

/* exp_nonpositive() above, 16 lanes at a time: the same polynomial with fused multiply-adds (so a result
 * can differ from the scalar one in the last bit). */
static inline __m512 exp_nonpositive16(__m512 x) {
    const __m512 low = _mm512_set1_ps(-87.33654f);
    const __mmask16 in_range = _mm512_cmp_ps_mask(x, low, _CMP_GT_OQ);
    const __m512 clamped = _mm512_max_ps(x, low);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), clamped);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    __m512i exponent = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    exponent = _mm512_max_epi32(exponent, _mm512_setzero_si512());
    const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(exponent, 23));
    return _mm512_maskz_mul_ps(in_range, p, scale);
}
#endif

#endif
