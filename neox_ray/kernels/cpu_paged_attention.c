/* Paged decode attention on CPU: every decoding sequence, every head, in one call.
 *
 * Each sequence has one new query token; its keys and values sit in a paged cache
 * (num_slots = num_blocks * block_size rows of heads * head_dim) at the slots its block table names.
 * Decode attention reads the whole context once and does almost no arithmetic per byte, so it is
 * memory-bound: this kernel streams each cached row (all heads of one position, contiguous) exactly
 * once for the scores and once for the values, in place, with no gather and no per-sequence dispatch.
 * Work items are (sequence, group of heads), shared over the OpenMP threads torch already runs.
 *
 * Built at first use by neox_ray/kernels/cpu_paged_attention.py (gcc -O3 -march=native -fopenmp) and
 * called through ctypes; that module owns the argument checks. Scores are accumulated in float32.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_math.h"

static inline float bf16_to_float(uint16_t x) {
    uint32_t bits = ((uint32_t)x) << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {  /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu)) return (uint16_t)((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

#define DEFINE_DECODE_ATTENTION(NAME, T, LOAD, STORE)                                                       \
int NAME(const T* query, int64_t query_row_stride, const T* key_cache, const T* value_cache,                \
         const int64_t* block_tables, int64_t block_table_stride, const int64_t* context_lens,              \
         int64_t num_seqs, int64_t num_heads, int64_t head_dim, int64_t block_size, float scale,            \
         T* out, int64_t out_row_stride, int64_t head_groups, int num_threads) {                            \
    int64_t max_len = 0;                                                                                    \
    for (int64_t s = 0; s < num_seqs; ++s) max_len = context_lens[s] > max_len ? context_lens[s] : max_len;\
    const int64_t heads_per_group = (num_heads + head_groups - 1) / head_groups;                            \
    const int64_t slot_stride = num_heads * head_dim;                                                       \
    int failed = 0;                                                                                         \
    _Pragma("omp parallel num_threads(num_threads)")                                                        \
    {                                                                                                       \
        float* scores = (float*)malloc(sizeof(float) * (size_t)(heads_per_group * (max_len > 0 ? max_len : 1))); \
        float* acc = (float*)malloc(sizeof(float) * (size_t)(heads_per_group * head_dim));                  \
        float* q = (float*)malloc(sizeof(float) * (size_t)(heads_per_group * head_dim));                    \
        if (!scores || !acc || !q) {                                                                        \
            _Pragma("omp atomic write") failed = 1;                                                         \
        }                                                                                                   \
        _Pragma("omp for schedule(dynamic, 1)")                                                             \
        for (int64_t item = 0; item < num_seqs * head_groups; ++item) {                                     \
            if (!scores || !acc || !q) continue;                                                            \
            const int64_t s = item / head_groups;                                                           \
            const int64_t h0 = (item % head_groups) * heads_per_group;                                      \
            const int64_t h1 = h0 + heads_per_group < num_heads ? h0 + heads_per_group : num_heads;         \
            const int64_t nh = h1 - h0;                                                                     \
            if (nh <= 0) continue;                                                                          \
            const int64_t len = context_lens[s];                                                            \
            const int64_t* table = block_tables + s * block_table_stride;                                   \
            const T* q_row = query + s * query_row_stride + h0 * head_dim;                                  \
            for (int64_t i = 0; i < nh * head_dim; ++i) q[i] = LOAD(q_row[i]) * scale;                      \
            for (int64_t p = 0; p < len; ++p) {                                                             \
                const int64_t slot = table[p / block_size] * block_size + p % block_size;                   \
                const T* k_row = key_cache + slot * slot_stride + h0 * head_dim;                            \
                for (int64_t h = 0; h < nh; ++h) {                                                          \
                    const T* k = k_row + h * head_dim;                                                      \
                    const float* qh = q + h * head_dim;                                                     \
                    float dot = 0.0f;                                                                       \
                    _Pragma("omp simd reduction(+:dot)")                                                    \
                    for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * LOAD(k[d]);                       \
                    scores[h * len + p] = dot;                                                              \
                }                                                                                           \
            }                                                                                               \
            for (int64_t h = 0; h < nh; ++h) {                                                              \
                float* row = scores + h * len;                                                              \
                float m = -INFINITY;                                                                        \
                _Pragma("omp simd reduction(max:m)")                                                        \
                for (int64_t p = 0; p < len; ++p) m = row[p] > m ? row[p] : m;                              \
                float total = 0.0f;                                                                         \
                _Pragma("omp simd reduction(+:total)")                                                      \
                for (int64_t p = 0; p < len; ++p) { row[p] = exp_nonpositive(row[p] - m); total += row[p]; } \
                const float inv = 1.0f / total;                                                             \
                for (int64_t p = 0; p < len; ++p) row[p] *= inv;                                            \
            }                                                                                               \
            memset(acc, 0, sizeof(float) * (size_t)(nh * head_dim));                                       \
            for (int64_t p = 0; p < len; ++p) {                                                             \
                const int64_t slot = table[p / block_size] * block_size + p % block_size;                   \
                const T* v_row = value_cache + slot * slot_stride + h0 * head_dim;                          \
                for (int64_t h = 0; h < nh; ++h) {                                                          \
                    const float w = scores[h * len + p];                                                    \
                    const T* v = v_row + h * head_dim;                                                      \
                    float* a = acc + h * head_dim;                                                          \
                    _Pragma("omp simd")                                                                     \
                    for (int64_t d = 0; d < head_dim; ++d) a[d] += w * LOAD(v[d]);                          \
                }                                                                                           \
            }                                                                                               \
            T* o = out + s * out_row_stride + h0 * head_dim;                                                \
            for (int64_t i = 0; i < nh * head_dim; ++i) o[i] = STORE(acc[i]);                               \
        }                                                                                                   \
        free(scores);                                                                                       \
        free(acc);                                                                                          \
        free(q);                                                                                            \
    }                                                                                                       \
    return failed ? -1 : 0;                                                                                 \
}

#define LOAD_F32(x) (x)
#define STORE_F32(x) (x)
DEFINE_DECODE_ATTENTION(decode_attention_f32, float, LOAD_F32, STORE_F32)
DEFINE_DECODE_ATTENTION(decode_attention_bf16, uint16_t, bf16_to_float, float_to_bf16)
