/* Paged decode attention on CPU: every decoding sequence, every head, in one call.
 *
 * Each sequence has one new query token; its keys and values sit in a paged cache
 * (num_slots = num_blocks * block_size rows of heads * head_dim) at the slots its block table names.
 * Decode attention reads the whole context once and does almost no arithmetic per byte, so it is
 * memory-bound: the kernel reads every cached key and value row once, in place, with no gather and no
 * per-sequence dispatch. Per (sequence, head) it keeps an online softmax (running max, running sum and a
 * float32 accumulator rescaled when the max grows) over tiles of up to 16 positions inside a cache block,
 * so keys and values of a tile are read together in one pass and no score buffer is written; while a head
 * works on a tile, its rows of the tile 16 positions ahead are prefetched into L2, and a tile's 16 scores are
 * summed across lanes together (on the 2-core Zen 4 box, 48 sequences of 80-224 positions, 8 heads of 64, 12
 * cold caches: 1.50 -> 1.31 ms a layer for float32, 1.10 -> 0.85 bfloat16, 0.78 -> 0.52 int8, against a
 * burst of L1 prefetches a tile ahead and one horizontal sum per position). With AVX-512 each head size Pythia uses (16..256, multiples of
 * 16) gets a copy unrolled so a head's accumulator stays in registers; other sizes and CPUs run the portable
 * loop (same arithmetic, one position at a time). Work items are (sequence, group of heads), shared over the
 * OpenMP threads torch already runs. Also here: store_kv, the per-layer write of new keys/values to their slots.
 *
 * int8 caches (kv_cache_dtype="int8"): each (slot, head) row is int8 values with one float32 scale, written by
 * store_kv_int8_*; the decode kernels for them read half the bytes of a bfloat16 cache (a quarter of float32)
 * and fold the scales into the scores and the softmax weights, so no row is dequantized into a buffer.
 *
 * Built at first use by neox_ray/kernels/cpu_paged_attention.py (gcc -O3 -march=native -fopenmp) and
 * called through ctypes; that module owns the argument checks. Scores are accumulated in float32.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_math.h"

/* Positions are visited block by block (no division per position) in tiles of at most TILE positions. Each
 * (sequence, head) keeps an online softmax (running max, running sum, float32 accumulator, rescaled when the
 * max grows), so one pass reads every cached key and value row once, keys and values of a tile together. */
#define TILE 16
#ifndef PREFETCH_POSITIONS
#define PREFETCH_POSITIONS 16
#endif

#ifdef __AVX512F__
#include <immintrin.h>

/* Sums each of the 16 vectors d[0..15] across its lanes: lane i of the result is the sum of d[i]. A transpose
 * tree (unpack, then 128-bit lane shuffles): 45 instructions for 16 sums instead of a 16-instruction
 * horizontal reduction each, and no serial chain through a score vector. */
static inline __attribute__((always_inline)) __m512 sum16_across(const __m512* d) {
    __m512 a[8], b[4];
    for (int j = 0; j < 8; ++j)
        a[j] = _mm512_add_ps(_mm512_unpacklo_ps(d[2 * j], d[2 * j + 1]), _mm512_unpackhi_ps(d[2 * j], d[2 * j + 1]));
    for (int k = 0; k < 4; ++k) {
        const __m512d x = _mm512_castps_pd(a[2 * k]), y = _mm512_castps_pd(a[2 * k + 1]);
        b[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    const __m512 c0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x88), _mm512_shuffle_f32x4(b[0], b[1], 0xDD));
    const __m512 c1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x88), _mm512_shuffle_f32x4(b[2], b[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c0, c1, 0x88), _mm512_shuffle_f32x4(c0, c1, 0xDD));
}

/* One sequence, heads [0, nh) of q / out (q already scaled, float32), over its whole context. Tiles are
 * visited in order and, inside a tile, head after head. While a head works on a tile it prefetches that head's
 * rows of the tile PREFETCH_POSITIONS ahead (into L2: a float32 tile of K and V for 8 heads of 64 is 64 KiB,
 * twice L1), so the prefetches spread over the tile's arithmetic instead of leaving in one burst. A tile's 16
 * scores come from 16 dot-product vectors summed across lanes together (sum16_across). Each head keeps its
 * online-softmax state (max, sum, accumulator) in `state` between tiles. CHUNKS = head_dim / 16 (a constant
 * after inlining, so the loops unroll and a head's accumulator lives in registers within a tile). */
#define DEFINE_SEQUENCE_AVX512(NAME, T, LOAD16, SCALED)                                                     \
static inline __attribute__((always_inline)) void NAME(                                                     \
        const float* q, const T* key_cache, const T* value_cache, const float* key_scales,                 \
        const float* value_scales, const int64_t* table, int64_t len, int64_t block_size,                  \
        int64_t slot_stride, int64_t num_heads, int64_t head_offset, int64_t nh, const int chunks,         \
        float* state, float* out) {                                                                        \
    const int64_t head_dim = 16 * chunks;                                                                   \
    const int64_t first_head = head_offset / head_dim;                                                      \
    float* running_max = state;                                                                             \
    float* running_sum = state + nh;                                                                        \
    float* accumulators = state + 2 * nh;                                                                   \
    for (int64_t h = 0; h < nh; ++h) { running_max[h] = -INFINITY; running_sum[h] = 0.0f; }                 \
    memset(accumulators, 0, sizeof(float) * (size_t)(nh * head_dim));                                      \
    const int64_t head_bytes = head_dim * (int64_t)sizeof(T);                                               \
    int64_t ahead_slots[TILE];                                                                              \
    for (int64_t first = 0; first < len; first += block_size) {                                             \
        const int64_t base = table[first / block_size] * block_size;                                        \
        const int64_t in_block = len - first < block_size ? len - first : block_size;                       \
        for (int64_t t0 = 0; t0 < in_block; t0 += TILE) {                                                   \
            const int n = (int)(in_block - t0 < TILE ? in_block - t0 : TILE);                               \
            const int64_t ahead = first + t0 + PREFETCH_POSITIONS;                                          \
            int num_ahead = 0;                                                                              \
            for (int64_t p = ahead; p < ahead + n && p < len; ++p)                                          \
                ahead_slots[num_ahead++] = table[p / block_size] * block_size + p % block_size;             \
            const __mmask16 valid = (__mmask16)((1u << n) - 1u);                                            \
            for (int64_t h = 0; h < nh; ++h) {                                                              \
                const int64_t head_start = head_offset + h * head_dim;                                      \
                for (int i = 0; i < num_ahead; ++i) {                                                       \
                    const char* k_next = (const char*)(key_cache + ahead_slots[i] * slot_stride + head_start); \
                    const char* v_next = (const char*)(value_cache + ahead_slots[i] * slot_stride + head_start); \
                    for (int64_t byte = 0; byte < head_bytes; byte += 64) {                                 \
                        _mm_prefetch(k_next + byte, _MM_HINT_T1);                                           \
                        _mm_prefetch(v_next + byte, _MM_HINT_T1);                                           \
                    }                                                                                       \
                    if (SCALED && h == 0) {                                                                 \
                        _mm_prefetch((const char*)(key_scales + ahead_slots[i] * num_heads + first_head), _MM_HINT_T1); \
                        _mm_prefetch((const char*)(value_scales + ahead_slots[i] * num_heads + first_head), _MM_HINT_T1); \
                    }                                                                                       \
                }                                                                                           \
                const T* k = key_cache + (base + t0) * slot_stride + head_start;                            \
                const T* v = value_cache + (base + t0) * slot_stride + head_start;                          \
                const float* qh = q + h * head_dim;                                                         \
                float* acc_h = accumulators + h * head_dim;                                                 \
                const int64_t scale_row = (base + t0) * num_heads + first_head + h;                         \
                __m512 qv[16], acc[16], dots[TILE];                                                         \
                for (int c = 0; c < chunks; ++c) qv[c] = _mm512_loadu_ps(qh + 16 * c);                      \
                for (int i = 0; i < TILE; ++i) {                                                            \
                    if (i < n) {                                                                            \
                        __m512 dot = _mm512_mul_ps(qv[0], LOAD16(k + i * slot_stride));                    \
                        for (int c = 1; c < chunks; ++c)                                                    \
                            dot = _mm512_fmadd_ps(qv[c], LOAD16(k + i * slot_stride + 16 * c), dot);        \
                        dots[i] = dot;                                                                      \
                    } else {                                                                                \
                        dots[i] = _mm512_setzero_ps();                                                      \
                    }                                                                                       \
                }                                                                                           \
                __m512 s = sum16_across(dots);                                                              \
                if (SCALED) { /* an int8 key row is its scale times its values: scale its score */          \
                    float row_scales[TILE];                                                                 \
                    for (int i = 0; i < n; ++i) row_scales[i] = key_scales[scale_row + i * num_heads];      \
                    s = _mm512_mul_ps(s, _mm512_maskz_loadu_ps(valid, row_scales));                         \
                }                                                                                           \
                s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid, s);                                \
                const float tile_max = _mm512_reduce_max_ps(s);                                             \
                float m = running_max[h], total = running_sum[h];                                           \
                for (int c = 0; c < chunks; ++c) acc[c] = _mm512_loadu_ps(acc_h + 16 * c);                  \
                if (tile_max > m) {                                                                         \
                    const float correction = exp_nonpositive(m - tile_max);                                 \
                    const __m512 cv = _mm512_set1_ps(correction);                                           \
                    for (int c = 0; c < chunks; ++c) acc[c] = _mm512_mul_ps(acc[c], cv);                    \
                    total *= correction;                                                                    \
                    m = tile_max;                                                                           \
                }                                                                                           \
                __m512 w = _mm512_maskz_mov_ps(valid, exp_nonpositive16(_mm512_sub_ps(s, _mm512_set1_ps(m)))); \
                total += _mm512_reduce_add_ps(w);                                                           \
                if (SCALED) { /* an int8 value row is its scale times its values: fold the scale into w */  \
                    float row_scales[TILE];                                                                 \
                    for (int i = 0; i < n; ++i) row_scales[i] = value_scales[scale_row + i * num_heads];    \
                    w = _mm512_mul_ps(w, _mm512_maskz_loadu_ps(valid, row_scales));                         \
                }                                                                                           \
                for (int i = 0; i < n; ++i) {                                                               \
                    const __m512 wi = _mm512_permutexvar_ps(_mm512_set1_epi32(i), w);                       \
                    for (int c = 0; c < chunks; ++c)                                                        \
                        acc[c] = _mm512_fmadd_ps(wi, LOAD16(v + i * slot_stride + 16 * c), acc[c]);         \
                }                                                                                           \
                for (int c = 0; c < chunks; ++c) _mm512_storeu_ps(acc_h + 16 * c, acc[c]);                  \
                running_max[h] = m;                                                                         \
                running_sum[h] = total;                                                                     \
            }                                                                                               \
        }                                                                                                   \
    }                                                                                                       \
    for (int64_t h = 0; h < nh; ++h) {                                                                      \
        const __m512 inv = _mm512_set1_ps(1.0f / running_sum[h]);                                           \
        for (int c = 0; c < chunks; ++c)                                                                    \
            _mm512_storeu_ps(out + h * head_dim + 16 * c,                                                   \
                             _mm512_mul_ps(_mm512_loadu_ps(accumulators + h * head_dim + 16 * c), inv));    \
    }                                                                                                       \
}

DEFINE_SEQUENCE_AVX512(sequence_avx512_f32, float, load16_f32, 0)
DEFINE_SEQUENCE_AVX512(sequence_avx512_bf16, uint16_t, load16_bf16, 0)
DEFINE_SEQUENCE_AVX512(sequence_avx512_i8, int8_t, load16_i8, 1)

/* Dispatches to a copy unrolled for the head size; 0 when there is none (the portable loop runs then). */
#define SEQUENCE_ARGS(CHUNKS) q, key_cache, value_cache, key_scales, value_scales, table, len, block_size, \
                              slot_stride, num_heads, head_offset, nh, CHUNKS, state, out
#define DEFINE_SEQUENCE_DISPATCH(NAME, T, BODY)                                                             \
static int NAME(const float* q, const T* key_cache, const T* value_cache, const float* key_scales,          \
                const float* value_scales, const int64_t* table, int64_t len, int64_t block_size,          \
                int64_t slot_stride, int64_t num_heads, int64_t head_offset, int64_t nh, int64_t head_dim,  \
                float* state, float* out) {                                                                 \
    switch (head_dim) {                                                                                     \
    case 16: BODY(SEQUENCE_ARGS(1)); return 1;                                                              \
    case 32: BODY(SEQUENCE_ARGS(2)); return 1;                                                              \
    case 64: BODY(SEQUENCE_ARGS(4)); return 1;                                                              \
    case 80: BODY(SEQUENCE_ARGS(5)); return 1;                                                              \
    case 96: BODY(SEQUENCE_ARGS(6)); return 1;                                                              \
    case 128: BODY(SEQUENCE_ARGS(8)); return 1;                                                             \
    case 256: BODY(SEQUENCE_ARGS(16)); return 1;                                                            \
    default: return 0;                                                                                      \
    }                                                                                                       \
}

DEFINE_SEQUENCE_DISPATCH(sequence_fast_f32, float, sequence_avx512_f32)
DEFINE_SEQUENCE_DISPATCH(sequence_fast_bf16, uint16_t, sequence_avx512_bf16)
DEFINE_SEQUENCE_DISPATCH(sequence_fast_i8, int8_t, sequence_avx512_i8)
#else
#define sequence_fast_f32(...) 0
#define sequence_fast_bf16(...) 0
#define sequence_fast_i8(...) 0
#endif

/* The portable loop (any head size, any CPU): the same online softmax, one position at a time. SCALED
 * (int8 caches): a row's values are its int8 values times its (slot, head) scale. */
#define DEFINE_HEAD_PORTABLE(NAME, T, LOAD, SCALED)                                                         \
static void NAME(const float* q, const T* key_cache, const T* value_cache, const float* key_scales,         \
                 const float* value_scales, const int64_t* table, int64_t len, int64_t block_size,         \
                 int64_t slot_stride, int64_t num_heads, int64_t head_offset, int64_t head_dim, float* acc) { \
    float running_max = -INFINITY, running_sum = 0.0f;                                                      \
    const int64_t head = head_offset / head_dim;                                                            \
    for (int64_t d = 0; d < head_dim; ++d) acc[d] = 0.0f;                                                   \
    for (int64_t first = 0; first < len; first += block_size) {                                             \
        const int64_t base = table[first / block_size] * block_size;                                        \
        const int64_t in_block = len - first < block_size ? len - first : block_size;                       \
        for (int64_t i = 0; i < in_block; ++i) {                                                            \
            const T* k = key_cache + (base + i) * slot_stride + head_offset;                                \
            const T* v = value_cache + (base + i) * slot_stride + head_offset;                              \
            float dot = 0.0f;                                                                               \
            _Pragma("omp simd reduction(+:dot)")                                                            \
            for (int64_t d = 0; d < head_dim; ++d) dot += q[d] * LOAD(k[d]);                                \
            if (SCALED) dot *= key_scales[(base + i) * num_heads + head];                                   \
            if (dot > running_max) {                                                                        \
                const float correction = exp_nonpositive(running_max - dot);                                \
                for (int64_t d = 0; d < head_dim; ++d) acc[d] *= correction;                                \
                running_sum *= correction;                                                                  \
                running_max = dot;                                                                          \
            }                                                                                               \
            const float w = exp_nonpositive(dot - running_max);                                             \
            running_sum += w;                                                                               \
            const float wv = SCALED ? w * value_scales[(base + i) * num_heads + head] : w;                  \
            _Pragma("omp simd")                                                                             \
            for (int64_t d = 0; d < head_dim; ++d) acc[d] += wv * LOAD(v[d]);                               \
        }                                                                                                   \
    }                                                                                                       \
    const float inv = 1.0f / running_sum;                                                                   \
    for (int64_t d = 0; d < head_dim; ++d) acc[d] *= inv;                                                   \
}

#define LOAD_F32(x) (x)
#define STORE_F32(x) (x)
#define LOAD_I8(x) ((float)(x))
DEFINE_HEAD_PORTABLE(head_portable_f32, float, LOAD_F32, 0)
DEFINE_HEAD_PORTABLE(head_portable_bf16, uint16_t, bf16_to_float, 0)
DEFINE_HEAD_PORTABLE(head_portable_i8, int8_t, LOAD_I8, 1)

/* Query and output rows are T (the model's dtype); the cache holds C: T itself, or int8 with one float32
 * scale per (slot, head) in key_scales / value_scales (NULL for float caches). */
#define DEFINE_DECODE_ATTENTION(NAME, T, LOAD, STORE, C, FAST, PORTABLE)                                    \
int NAME(const T* query, int64_t query_row_stride, const C* key_cache, const C* value_cache,                \
         const float* key_scales, const float* value_scales,                                                \
         const int64_t* block_tables, int64_t block_table_stride, const int64_t* context_lens,              \
         int64_t num_seqs, int64_t num_heads, int64_t head_dim, int64_t block_size, float scale,            \
         T* out, int64_t out_row_stride, int64_t head_groups, int num_threads) {                            \
    const int64_t heads_per_group = (num_heads + head_groups - 1) / head_groups;                            \
    const int64_t slot_stride = num_heads * head_dim;                                                       \
    const size_t group_floats = (size_t)(heads_per_group * head_dim);                                       \
    int failed = 0;                                                                                         \
    _Pragma("omp parallel num_threads(num_threads)")                                                        \
    {                                                                                                       \
        float* q = (float*)malloc(sizeof(float) * group_floats);                                            \
        float* result = (float*)malloc(sizeof(float) * group_floats);                                       \
        float* state = (float*)malloc(sizeof(float) * (group_floats + 2 * (size_t)heads_per_group));        \
        if (!q || !result || !state) {                                                                      \
            _Pragma("omp atomic write") failed = 1;                                                         \
        }                                                                                                   \
        _Pragma("omp for schedule(dynamic, 1)")                                                             \
        for (int64_t item = 0; item < num_seqs * head_groups; ++item) {                                     \
            if (!q || !result || !state) continue;                                                          \
            const int64_t s = item / head_groups;                                                           \
            const int64_t h0 = (item % head_groups) * heads_per_group;                                      \
            const int64_t h1 = h0 + heads_per_group < num_heads ? h0 + heads_per_group : num_heads;         \
            if (h1 <= h0) continue;                                                                         \
            const int64_t nh = h1 - h0;                                                                     \
            const int64_t* table = block_tables + s * block_table_stride;                                   \
            const T* q_row = query + s * query_row_stride + h0 * head_dim;                                  \
            for (int64_t i = 0; i < nh * head_dim; ++i) q[i] = LOAD(q_row[i]) * scale;                      \
            if (!FAST(q, key_cache, value_cache, key_scales, value_scales, table, context_lens[s],          \
                      block_size, slot_stride, num_heads, h0 * head_dim, nh, head_dim, state, result))      \
                for (int64_t h = 0; h < nh; ++h)                                                            \
                    PORTABLE(q + h * head_dim, key_cache, value_cache, key_scales, value_scales, table,     \
                             context_lens[s], block_size, slot_stride, num_heads, (h0 + h) * head_dim,      \
                             head_dim, result + h * head_dim);                                              \
            T* o = out + s * out_row_stride + h0 * head_dim;                                                \
            for (int64_t i = 0; i < nh * head_dim; ++i) o[i] = STORE(result[i]);                            \
        }                                                                                                   \
        free(q);                                                                                            \
        free(result);                                                                                       \
        free(state);                                                                                        \
    }                                                                                                       \
    return failed ? -1 : 0;                                                                                 \
}

DEFINE_DECODE_ATTENTION(decode_attention_f32, float, LOAD_F32, STORE_F32, float, sequence_fast_f32,
                        head_portable_f32)
DEFINE_DECODE_ATTENTION(decode_attention_bf16, uint16_t, bf16_to_float, float_to_bf16, uint16_t,
                        sequence_fast_bf16, head_portable_bf16)
DEFINE_DECODE_ATTENTION(decode_attention_f32_i8cache, float, LOAD_F32, STORE_F32, int8_t, sequence_fast_i8,
                        head_portable_i8)
DEFINE_DECODE_ATTENTION(decode_attention_bf16_i8cache, uint16_t, bf16_to_float, float_to_bf16, int8_t,
                        sequence_fast_i8, head_portable_i8)

/* Stores this step's keys and values ((tokens, heads * head_dim) rows, contiguous) into their cache slots:
 * one call instead of two index_copy_ dispatches per layer. The caller checked every slot is in the cache. */
void store_kv(const void* key, const void* value, void* key_cache, void* value_cache, const int64_t* slots,
              int64_t num_tokens, int64_t row_bytes) {
    for (int64_t t = 0; t < num_tokens; ++t) {
        memcpy((char*)key_cache + slots[t] * row_bytes, (const char*)key + t * row_bytes, (size_t)row_bytes);
        memcpy((char*)value_cache + slots[t] * row_bytes, (const char*)value + t * row_bytes, (size_t)row_bytes);
    }
}

/* int8 cache rows: each (token, head) row of head_dim values x is stored as round(x * 127 / max|x|) with the
 * scale max|x| / 127 (0 for an all-zero row), so x ~= value * scale. The same float32 operations as the torch
 * fallback (neox_ray.layers.attention.quantize_kv_rows), so both write the same bytes; with AVX-512, rows whose
 * head_dim is a multiple of 16 take 16 values at a time (the same roundings: nearest-even, then the clamp). */
#ifdef __AVX512F__
#define DEFINE_QUANTIZE_ROW_AVX512(NAME, T, LOAD16)                                                          \
static inline int NAME(const T* x, int64_t head_dim, int8_t* dst, float* scale) {                          \
    if (head_dim % 16) return 0;                                                                            \
    __m512 largest = _mm512_setzero_ps();                                                                   \
    for (int64_t d = 0; d < head_dim; d += 16) largest = _mm512_max_ps(largest, _mm512_abs_ps(LOAD16(x + d))); \
    const float row_largest = _mm512_reduce_max_ps(largest);                                                \
    const __m512 inverse = _mm512_set1_ps(row_largest > 0.0f ? 127.0f / row_largest : 0.0f);                \
    for (int64_t d = 0; d < head_dim; d += 16) {                                                            \
        __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(LOAD16(x + d), inverse));                              \
        q = _mm512_min_epi32(_mm512_max_epi32(q, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));         \
        _mm_storeu_si128((__m128i*)(dst + d), _mm512_cvtepi32_epi8(q));                                     \
    }                                                                                                       \
    *scale = row_largest / 127.0f;                                                                          \
    return 1;                                                                                               \
}
DEFINE_QUANTIZE_ROW_AVX512(quantize_row_fast_f32, float, load16_f32)
DEFINE_QUANTIZE_ROW_AVX512(quantize_row_fast_bf16, uint16_t, load16_bf16)
#else
#define quantize_row_fast_f32(...) 0
#define quantize_row_fast_bf16(...) 0
#endif

#define DEFINE_STORE_KV_INT8(NAME, T, LOAD, FAST)                                                           \
void NAME(const T* key, const T* value, int8_t* key_cache, int8_t* value_cache, float* key_scales,          \
          float* value_scales, const int64_t* slots, int64_t num_tokens, int64_t num_heads,                 \
          int64_t head_dim, int num_threads) {                                                              \
    const int64_t rows = num_tokens * num_heads;                                                            \
    _Pragma("omp parallel for num_threads(num_threads) schedule(static) if(rows >= 4096)")                  \
    for (int64_t row = 0; row < 2 * rows; ++row) {                                                          \
        const int is_value = row >= rows;                                                                   \
        const int64_t r = is_value ? row - rows : row;                                                      \
        const int64_t t = r / num_heads, h = r % num_heads;                                                 \
        const T* x = (is_value ? value : key) + r * head_dim;                                               \
        const int64_t slot_row = slots[t] * num_heads + h;                                                  \
        int8_t* dst = (is_value ? value_cache : key_cache) + slot_row * head_dim;                           \
        float* scale = (is_value ? value_scales : key_scales) + slot_row;                                   \
        if (FAST(x, head_dim, dst, scale)) continue;                                                        \
        float largest = 0.0f;                                                                               \
        for (int64_t d = 0; d < head_dim; ++d) {                                                            \
            const float a = fabsf(LOAD(x[d]));                                                              \
            largest = a > largest ? a : largest;                                                            \
        }                                                                                                   \
        const float inverse = largest > 0.0f ? 127.0f / largest : 0.0f;                                     \
        for (int64_t d = 0; d < head_dim; ++d) {                                                            \
            const float q = __builtin_rintf(LOAD(x[d]) * inverse);                                          \
            dst[d] = (int8_t)(q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q == q ? q : 0.0f);            \
        }                                                                                                   \
        *scale = largest / 127.0f;                                                                          \
    }                                                                                                       \
}

DEFINE_STORE_KV_INT8(store_kv_int8_f32, float, LOAD_F32, quantize_row_fast_f32)
DEFINE_STORE_KV_INT8(store_kv_int8_bf16, uint16_t, bf16_to_float, quantize_row_fast_bf16)
