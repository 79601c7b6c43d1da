/* Dynamic per-tensor activation quantization for the int8 GEMM (see cpu_quantize.py): uint8 values over the
 * tensor's [min, max] (widened to include 0, so 0 is exact), in two passes over the data (parallel when large):
 * min/max, then quantize. Rounding is round-half-to-even like torch.round. float32 or bfloat16 input. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_math.h"


static inline float f32_load(const float *x, int64_t i) { return x[i]; }
static inline float bf16_load(const uint16_t *x, int64_t i) { return bf16_to_float(x[i]); }

/* Below this many elements one thread does it: a parallel region's fork and barrier cost more than the
 * work (decode-sized activations), and on a busy machine a barrier waits for a descheduled thread. The
 * loops below are written out twice on purpose: an `if(...)` clause on one `omp parallel` pragma instead
 * measured 40 us vs 16 us for a 48 x 512 activation (the serialized region is not free). */
#define PARALLEL_MIN_ELEMENTS 131072

#ifdef __AVX512F__
#include <immintrin.h>
/* 16 values widened to float: the explicit AVX-512 loops below run ~4x faster than what the compiler makes of
 * the portable ones (the float -> uint8 narrowing and the bf16 widening do not vectorise well there). */
static inline __m512 f32_load16(const float *x, int64_t i) { return load16_f32(x + i); }
static inline __m512 bf16_load16(const uint16_t *x, int64_t i) { return load16_bf16(x + i); }
#define RANGE16(LOAD16, x, begin, end, low, high)                                                      \
    do {                                                                                               \
        __m512 low16 = _mm512_setzero_ps(), high16 = _mm512_setzero_ps();                              \
        int64_t i = begin;                                                                             \
        for (; i + 16 <= end; i += 16) {                                                               \
            const __m512 v = LOAD16(x, i);                                                             \
            low16 = _mm512_min_ps(low16, v);                                                           \
            high16 = _mm512_max_ps(high16, v);                                                         \
        }                                                                                              \
        low = _mm512_reduce_min_ps(low16);                                                             \
        high = _mm512_reduce_max_ps(high16);                                                           \
        begin = i;                                                                                     \
    } while (0)
#define STORE16(LOAD16, x, begin, end, out, inverse, shift)                                            \
    do {                                                                                               \
        const __m512 inverse16 = _mm512_set1_ps(inverse), shift16 = _mm512_set1_ps(shift);             \
        const __m512 zero = _mm512_setzero_ps(), top = _mm512_set1_ps(255.0f);                         \
        int64_t i = begin;                                                                             \
        for (; i + 16 <= end; i += 16) {                                                               \
            __m512 q = _mm512_add_ps(_mm512_mul_ps(LOAD16(x, i), inverse16), shift16); /* as torch: no fma */ \
            q = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);                \
            q = _mm512_min_ps(_mm512_max_ps(q, zero), top);                                            \
            _mm_storeu_si128((__m128i *)(out + i), _mm512_cvtusepi32_epi8(_mm512_cvtps_epu32(q)));     \
        }                                                                                              \
        begin = i;                                                                                     \
    } while (0)
#else
#define RANGE16(LOAD16, x, begin, end, low, high) ((void)0)
#define STORE16(LOAD16, x, begin, end, out, inverse, shift) ((void)0)
#endif

/* scale_out / zero_point_out receive the parameters: x ~= (q - zero_point) * scale. */
#define DEFINE_QUANTIZE(NAME, TYPE, LOAD)                                                              \
    static void NAME##_range(const TYPE *x, int64_t n, float *low_out, float *high_out, int threads) {  \
        float low = 0.0f, high = 0.0f;                                                                 \
        if (n < PARALLEL_MIN_ELEMENTS || threads < 2) {                                                \
            int64_t begin = 0;                                                                         \
            RANGE16(LOAD##16, x, begin, n, low, high);                                                 \
            _Pragma("omp simd reduction(min:low) reduction(max:high)")                                 \
            for (int64_t i = begin; i < n; i++) {                                                      \
                float v = LOAD(x, i);                                                                  \
                low = v < low ? v : low;                                                               \
                high = v > high ? v : high;                                                            \
            }                                                                                          \
        } else {                                                                                       \
            _Pragma("omp parallel for simd num_threads(threads) reduction(min:low) reduction(max:high)") \
            for (int64_t i = 0; i < n; i++) {                                                          \
                float v = LOAD(x, i);                                                                  \
                low = v < low ? v : low;                                                               \
                high = v > high ? v : high;                                                            \
            }                                                                                          \
        }                                                                                              \
        *low_out = low;                                                                                \
        *high_out = high;                                                                              \
    }                                                                                                  \
    static void NAME##_store(const TYPE *x, int64_t begin, int64_t end, uint8_t *out, float inverse,  \
                             float shift) {                                                            \
        STORE16(LOAD##16, x, begin, end, out, inverse, shift);                                         \
        _Pragma("omp simd")                                                                            \
        for (int64_t i = begin; i < end; i++) {                                                        \
            float q = nearbyintf(LOAD(x, i) * inverse + shift);                                        \
            q = q < 0.0f ? 0.0f : (q > 255.0f ? 255.0f : q);                                          \
            out[i] = (uint8_t)q;                                                                       \
        }                                                                                              \
    }                                                                                                  \
    void NAME(const TYPE *x, int64_t n, uint8_t *out, double *scale_out, int64_t *zero_point_out,      \
              int threads) {                                                                           \
        float low, high;                                                                               \
        NAME##_range(x, n, &low, &high, threads);                                                      \
        double scale = ((double)high - (double)low) / 255.0;                                           \
        if (scale == 0.0) scale = 1.0;                                                                 \
        double zero_point = nearbyint(-(double)low / scale);                                           \
        float inverse = (float)(1.0 / scale), shift = (float)zero_point;                               \
        if (n < PARALLEL_MIN_ELEMENTS || threads < 2) {                                                \
            NAME##_store(x, 0, n, out, inverse, shift);                                                \
        } else {                                                                                       \
            int64_t chunk = 65536;                                                                     \
            _Pragma("omp parallel for num_threads(threads) schedule(static)")                          \
            for (int64_t begin = 0; begin < n; begin += chunk)                                         \
                NAME##_store(x, begin, begin + chunk < n ? begin + chunk : n, out, inverse, shift);    \
        }                                                                                              \
        *scale_out = scale;                                                                            \
        *zero_point_out = (int64_t)zero_point;                                                         \
    }

DEFINE_QUANTIZE(quantize_u8_f32, float, f32_load)
DEFINE_QUANTIZE(quantize_u8_bf16, uint16_t, bf16_load)
