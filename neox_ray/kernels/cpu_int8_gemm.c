/* int8 GEMM for decode-sized batches: out = a_scale * w_scale[n] * (sum_k (a[m,k] - a_zero) * w[n,k]) + bias[n],
 * with a uint8 activation (one scale and zero point per tensor) and int8 weights (one scale per output channel),
 * written as float32 or bfloat16. Two versions over one packed weight layout: AMX tiles where the CPU has them,
 * AVX512-VNNI (VPDPBUSD) elsewhere (Zen 4, Ice Lake, Cascade Lake).
 *
 * Why: a decode step multiplies a few dozen rows by every weight once, so the GEMM is bound by streaming the
 * weights, and it is called ~25 times a step. oneDNN's AMX matmul streams them at 15-22 GB/s for up to 16 rows but
 * ~10 GB/s for 48 (measured on the 2-core Sapphire Rapids VM, benchmarks/README.md); its VNNI matmul on the 2-core
 * Zen 4 box costs 42-53 us a call at one row and runs the 70m shapes' small layers at 143-276 GMAC/s for 48 rows
 * (the VPDPBUSD peak there is 460). Here every 16-column block of the weights is read once for all rows.
 * Weights are packed once (int8_gemm_pack: for each block of 16 output channels, each 64-deep slice of the input
 * as the 16 x 64-byte tile TDPBUSD takes, four consecutive inputs of one channel per 4 bytes; read in order, the
 * same bytes are what VPDPBUSD takes for four inputs of 16 channels). Blocks of output channels are shared over
 * the OpenMP threads torch runs.
 *
 * AMX: up to four 16-row accumulator tiles take the same 1 KiB weight tile. VNNI: tiles of up to 8 rows x 3 blocks
 * (24 accumulator registers); per four inputs, 3 weight loads and 8 activation broadcasts feed 24 VPDPBUSD, and a
 * group of 3 blocks' weights (48 bytes per input) stays in L1/L2 while the row tiles go over it.
 *
 * Built at first use by neox_ray/kernels/cpu_int8_gemm.py (gcc -O3 -march=native -fopenmp); an entry point the
 * build or the process cannot run (no AMX at compile time or no permission for AMX state; no AVX512-VNNI) returns
 * an error and the caller keeps oneDNN. That module owns the argument checks.
 */
#define _GNU_SOURCE /* syscall() */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_math.h"

#define MAX_ROWS 64   /* four 16-row accumulator tiles */
#define TILE_ROWS 16
#define TILE_BYTES 64 /* per tile row: 64 uint8 activations, or 16 channels x 4 int8 weights, or 16 int32 */
#define TILE_SIZE (TILE_ROWS * TILE_BYTES)
#ifndef PREFETCH_TILES
#define PREFETCH_TILES 4 /* weight tiles (1 KiB each) requested ahead of the multiply */
#endif

/* What a build without the instructions exports for a version: not ready, and every call refused. */
#define UNAVAILABLE_GEMM(NAME)                                                                              \
int NAME##_ready(void) { return 0; }                                                                        \
int NAME(const uint8_t* a, int64_t m, int64_t k, const int8_t* packed, int64_t n, const int32_t* column_sums, \
         const float* weight_scales, const float* bias, float activation_scale, int32_t activation_zero,   \
         int gelu, void* out, int out_bf16, int num_threads) {                                              \
    (void)a; (void)m; (void)k; (void)packed; (void)n; (void)column_sums; (void)weight_scales; (void)bias;  \
    (void)activation_scale; (void)activation_zero; (void)gelu; (void)out; (void)out_bf16; (void)num_threads; \
    return -1;                                                                                              \
}

#ifdef __AVX512F__
#include <immintrin.h>

/* gelu(x) = x / 2 * (1 + erf(x / sqrt 2)) (the erf form, torch's default), with erf from Abramowitz & Stegun
 * 7.1.26 (absolute error <= 1.5e-7): 1 - t (a1 + t (a2 + ...)) exp(-z^2), t = 1 / (1 + p z), z = |x| / sqrt 2. */
static inline __m512 gelu16(__m512 x) {
    const __m512 z = _mm512_abs_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f)));
    const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(z, _mm512_set1_ps(0.3275911f),
                                                                           _mm512_set1_ps(1.0f)));
    __m512 poly = _mm512_set1_ps(1.061405429f);
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-1.453152027f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
    poly = _mm512_mul_ps(poly, t);
    const __m512 tail = _mm512_mul_ps(poly, exp_nonpositive16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(z, z))));
    const __m512 erf_abs = _mm512_sub_ps(_mm512_set1_ps(1.0f), tail);
    const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 erf = _mm512_mask_sub_ps(erf_abs, negative, _mm512_setzero_ps(), erf_abs);
    return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), _mm512_add_ps(erf, _mm512_set1_ps(1.0f)));
}

/* The epilogue of one 16-channel block: int32 sums -> scaled, biased (and with gelu set, GELU'd) float32 or
 * bfloat16 outputs. */
static inline void write_block(const int32_t* sums, int64_t rows, int64_t n, int64_t first_channel,
                               const int32_t* column_sums, const float* weight_scales, const float* bias,
                               float activation_scale, int32_t activation_zero, int gelu, void* out,
                               int out_bf16) {
    const __m512i compensation = _mm512_mullo_epi32(_mm512_set1_epi32(activation_zero),
                                                    _mm512_loadu_si512(column_sums + first_channel));
    const __m512 scales = _mm512_mul_ps(_mm512_set1_ps(activation_scale),
                                        _mm512_loadu_ps(weight_scales + first_channel));
    const __m512 offsets = bias ? _mm512_loadu_ps(bias + first_channel) : _mm512_setzero_ps();
    for (int64_t r = 0; r < rows; ++r) {
        const __m512i exact = _mm512_sub_epi32(_mm512_loadu_si512(sums + r * 16), compensation);
        __m512 value = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), scales, offsets);
        if (gelu) value = gelu16(value);
        if (out_bf16) {  /* float_to_bf16 on 16 lanes: round to nearest even, NaN stays a (quiet) NaN */
            const __m512i bits = _mm512_castps_si512(value);
            const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
            __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
            const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)),
                                                          _mm512_set1_epi32(0x7f800000));
            rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(_mm512_srli_epi32(bits, 16),
                                                                          _mm512_set1_epi32(0x40)));
            _mm256_storeu_si256((__m256i*)((uint16_t*)out + r * n + first_channel), _mm512_cvtepi32_epi16(rounded));
        } else {
            _mm512_storeu_ps((float*)out + r * n + first_channel, value);
        }
    }
}

#endif

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__)
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

struct tile_config {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
};

/* 1 when this process may use AMX tile data (Linux asks every process to request it once). */
int int8_gemm_amx_ready(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

/* Tiles 0-3: accumulators (16 rows x 16 int32); 4: weights (16 x 64 int8); 5-7: activation rows (16 x 64 uint8)
 * of row tiles 0-2 (row tile 3 reuses 5), so the multiplies of one weight tile do not wait on each other's loads. */
static void configure_tiles(void) {
    struct tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; ++t) {
        config.rows[t] = TILE_ROWS;
        config.bytes_per_row[t] = TILE_BYTES;
    }
    _tile_loadconfig(&config);
}

#define MULTIPLY_ROW_TILE(T, A)                                                                             \
    if (row_tiles > T) {                                                                                    \
        _tile_loadd(A, activations + (int64_t)(T) * TILE_ROWS * k + slice * TILE_BYTES, k);                 \
        _tile_dpbusd(T, A, 4);                                                                              \
    }

#define STORE_ROW_TILE(T)                                                                                   \
    if (row_tiles > T) _tile_stored(T, sums + (T) * TILE_ROWS * 16, 64);

/* a: (m, k) uint8 rows; packed: from int8_gemm_pack; gelu: 1 applies the erf GELU to the outputs; out: (m, n)
 * float32 or bfloat16. 0 on success, -1 for a
 * shape this kernel does not take (m > 64, k % 64, n % 16), -2 when a scratch buffer cannot be allocated. */
int int8_gemm_amx(const uint8_t* a, int64_t m, int64_t k, const int8_t* packed, int64_t n,
                  const int32_t* column_sums, const float* weight_scales, const float* bias,
                  float activation_scale, int32_t activation_zero, int gelu, void* out, int out_bf16,
                  int num_threads) {
    if (m < 1 || m > MAX_ROWS || k % TILE_BYTES || n % 16) return -1;
    const int64_t row_tiles = (m + TILE_ROWS - 1) / TILE_ROWS, slices = k / TILE_BYTES, blocks = n / 16;
    /* Rows padded to whole tiles with zeros (their sums are computed and dropped). */
    uint8_t* activations = (uint8_t*)aligned_alloc(64, (size_t)(row_tiles * TILE_ROWS * k));
    if (!activations) return -2;
    memcpy(activations, a, (size_t)(m * k));
    memset(activations + m * k, 0, (size_t)((row_tiles * TILE_ROWS - m) * k));
    #pragma omp parallel num_threads(num_threads)
    {
        configure_tiles();
        int32_t sums[MAX_ROWS * 16] __attribute__((aligned(64)));
        #pragma omp for schedule(static)
        for (int64_t block = 0; block < blocks; ++block) {
            const int8_t* weights = packed + block * slices * TILE_SIZE;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t slice = 0; slice < slices; ++slice) {
                const char* ahead = (const char*)(weights + (slice + PREFETCH_TILES) * TILE_SIZE);
                for (int line = 0; line < TILE_SIZE; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
                _tile_loadd(4, weights + slice * TILE_SIZE, TILE_BYTES);
                MULTIPLY_ROW_TILE(0, 5)
                MULTIPLY_ROW_TILE(1, 6)
                MULTIPLY_ROW_TILE(2, 7)
                MULTIPLY_ROW_TILE(3, 5)
            }
            STORE_ROW_TILE(0)
            STORE_ROW_TILE(1)
            STORE_ROW_TILE(2)
            STORE_ROW_TILE(3)
            write_block(sums, m, n, block * 16, column_sums, weight_scales, bias, activation_scale,
                        activation_zero, gelu, out, out_bf16);
        }
        _tile_release();
    }
    free(activations);
    return 0;
}
#else
UNAVAILABLE_GEMM(int8_gemm_amx)
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512F__)
#define VNNI_ROWS 8
#define VNNI_BLOCKS 3
#define VNNI_CHUNK_ROWS 256

int int8_gemm_vnni_ready(void) { return 1; }

/* rows (<= VNNI_ROWS) activation rows times blocks (<= VNNI_BLOCKS) consecutive 16-channel blocks, over all of k:
 * sums[(c * VNNI_ROWS + r) * 16 + j] = sum_i a[r, i] * w[16 * c + j, i]. Constant rows and blocks after inlining. */
static inline __attribute__((always_inline)) void vnni_tile(const uint8_t* a, int64_t k, const int8_t* weights,
                                                            const int8_t* next, const int rows, const int blocks,
                                                            int32_t* sums) {
    __m512i acc[VNNI_ROWS][VNNI_BLOCKS];
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < blocks; ++c) acc[r][c] = _mm512_setzero_si512();
    const int64_t block_bytes = 16 * k, steps = k / 4;
    for (int64_t j = 0; j < steps; ++j) {
        if (next) {  /* the next group's weights (VNNI_BLOCKS * 16 * k bytes), three lines a step, into L2 */
            const char* line = (const char*)next + j * 3 * 64;
            _mm_prefetch(line, _MM_HINT_T1);
            _mm_prefetch(line + 64, _MM_HINT_T1);
            _mm_prefetch(line + 128, _MM_HINT_T1);
        }
        __m512i w[VNNI_BLOCKS];
        for (int c = 0; c < blocks; ++c) w[c] = _mm512_loadu_si512(weights + c * block_bytes + j * 64);
        for (int r = 0; r < rows; ++r) {
            int32_t four;
            memcpy(&four, a + r * k + 4 * j, sizeof four);
            const __m512i inputs = _mm512_set1_epi32(four);
            for (int c = 0; c < blocks; ++c) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], inputs, w[c]);
        }
    }
    for (int c = 0; c < blocks; ++c)
        for (int r = 0; r < rows; ++r) _mm512_storeu_si512(sums + (c * VNNI_ROWS + r) * 16, acc[r][c]);
}

#define VNNI_TILE_CASE(R, C) case R: vnni_tile(a_rows, k, weights, next, R, C, sums); break;
#define VNNI_TILE_SWITCH(C)                                                                                  \
    switch (rows) {                                                                                          \
    VNNI_TILE_CASE(1, C) VNNI_TILE_CASE(2, C) VNNI_TILE_CASE(3, C) VNNI_TILE_CASE(4, C)                      \
    VNNI_TILE_CASE(5, C) VNNI_TILE_CASE(6, C) VNNI_TILE_CASE(7, C) VNNI_TILE_CASE(8, C)                      \
    default: break;                                                                                          \
    }

/* The AMX kernel's contract (same packed weights, same epilogue), any m >= 1: rows go in chunks of
 * VNNI_CHUNK_ROWS (their activations stay in L2 while every block group passes over them); -1 for k % 64 or
 * n % 16. */
int int8_gemm_vnni(const uint8_t* a, int64_t m, int64_t k, const int8_t* packed, int64_t n,
                   const int32_t* column_sums, const float* weight_scales, const float* bias,
                   float activation_scale, int32_t activation_zero, int gelu, void* out, int out_bf16,
                   int num_threads) {
    if (m < 1 || k % 64 || n % 16) return -1;
    const int64_t blocks = n / 16, groups = (blocks + VNNI_BLOCKS - 1) / VNNI_BLOCKS;
    const size_t element = out_bf16 ? 2 : 4;
    #pragma omp parallel num_threads(num_threads)
    for (int64_t chunk = 0; chunk < m; chunk += VNNI_CHUNK_ROWS) {
        const int64_t chunk_end = chunk + VNNI_CHUNK_ROWS < m ? chunk + VNNI_CHUNK_ROWS : m;
        #pragma omp for schedule(static)
        for (int64_t group = 0; group < groups; ++group) {
            int32_t sums[VNNI_BLOCKS * VNNI_ROWS * 16] __attribute__((aligned(64)));
            const int64_t first_block = group * VNNI_BLOCKS;
            const int group_blocks = (int)(blocks - first_block < VNNI_BLOCKS ? blocks - first_block : VNNI_BLOCKS);
            const int8_t* weights = packed + first_block * 16 * k;
            for (int64_t row0 = chunk; row0 < chunk_end; row0 += VNNI_ROWS) {
                const int rows = (int)(chunk_end - row0 < VNNI_ROWS ? chunk_end - row0 : VNNI_ROWS);
                const uint8_t* a_rows = a + row0 * k;
                /* while the first row tile runs, the next group's weights come in (weights are read from
                 * memory; the row tiles after the first find them in L1/L2) */
                const int8_t* next = row0 == chunk && group + 1 < groups ? weights + VNNI_BLOCKS * 16 * k : NULL;
                if (group_blocks == 3) { VNNI_TILE_SWITCH(3) }
                else if (group_blocks == 2) { VNNI_TILE_SWITCH(2) }
                else { VNNI_TILE_SWITCH(1) }
                void* out_rows = (char*)out + (size_t)(row0 * n) * element;
                for (int c = 0; c < group_blocks; ++c)
                    write_block(sums + c * VNNI_ROWS * 16, rows, n, (first_block + c) * 16, column_sums,
                                weight_scales, bias, activation_scale, activation_zero, gelu, out_rows, out_bf16);
            }
        }
    }
    return 0;
}
#else
UNAVAILABLE_GEMM(int8_gemm_vnni)
#endif


/* weight: (n, k) int8, row per output channel -> packed (n / 16 blocks, k / 64 slices, 16 rows, 64 bytes): row r
 * of a slice holds inputs 4r..4r+3 of each of the block's 16 channels (the layout TDPBUSD's second tile takes).
 * Also the per-channel sums of the weights (for the activation zero point). -1 unless k % 64 == 0 and n % 16 == 0. */
int int8_gemm_pack(const int8_t* weight, int64_t n, int64_t k, int8_t* packed, int32_t* column_sums) {
    if (k % TILE_BYTES || n % 16) return -1;
    const int64_t slices = k / TILE_BYTES;
    for (int64_t channel = 0; channel < n; ++channel) {
        const int8_t* row = weight + channel * k;
        const int64_t block = channel / 16, column = channel % 16;
        int32_t total = 0;
        for (int64_t i = 0; i < k; ++i) {
            const int64_t slice = i / TILE_BYTES, tile_row = (i % TILE_BYTES) / 4, within = i % 4;
            packed[(block * slices + slice) * TILE_SIZE + tile_row * TILE_BYTES + column * 4 + within] = row[i];
            total += row[i];
        }
        column_sums[channel] = total;
    }
    return 0;
}
