/* Sampling on CPU: temperature, top-k, top-p, min-p and the draw for every row of a step in one call.
 *
 * Per row, over the vocabulary: the maximum logit (one vectorised pass); e_i = exp((x_i - max) / T) and
 * their sum (one vectorised pass, a polynomial exp that needs no libm vector library); then the
 * filters as thresholds on e (top-p's only when the rejection test below gives up; every filter keeps an upper
 * set of the distribution, so the kept tokens are those with e >= the largest threshold): top-k's threshold is the k-th largest e, top-p's the
 * smallest e of the likeliest tokens whose mass reaches top_p of the top-k mass, min-p's is min_p itself
 * (the likeliest token's e is exactly 1). Both selections are radix descents over the float bit patterns
 * (non-negative floats order like their bits): a histogram of counts and mass over bits 20-29 finds
 * the bucket where the k-th token or the top_p mass is crossed, then bits 10-19 of that bucket's tokens,
 * then bits 0-9, so the threshold is exact without sorting. Ties with the last kept token are kept.
 * Finally the draw: the token where the cumulative kept mass, in vocabulary order, first exceeds u times
 * the kept mass (u is the row's uniform in (0, 1)), with block sums in float and their running total
 * in double, then one block token by token.
 *
 * Top-p is not searched for first: the row draws under the top-k and min-p thresholds and keeps the token
 * when the tokens with a larger e hold less than top_p of the top-k mass (one vectorised pass: exactly the
 * tokens the top-p cut keeps), else draws again with its next uniform (derived_uniform); after TOP_P_DRAWS
 * rejections it takes the exact cut above and draws once among the tokens it keeps. Accepted draws follow
 * the filtered distribution exactly (rejection sampling). 48 rows of 50304 at temperature 0.8, top-p 0.95,
 * 2 threads on the Zen 4 box: flat rows 1.46 -> 0.79 ms, peaked rows 1.03 -> 0.83 ms (top-p off: 0.58).
 *
 * Rows are spread over the OpenMP threads torch runs. Built at first use by
 * neox_ray/kernels/cpu_sampling.py, which owns the argument checks and the choice of u (seeded rows
 * hash theirs); penalties and bans are applied to the logits before, by the torch sampler.
 */
#include <math.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_math.h"

#define BLOCK 64
#define TOP_P_DRAWS 4  /* top-p rejections before the exact cut is searched for */

/* The largest of x[begin:end] (NaN ignored), and in *nan whether any is NaN: one vectorised pass. */
static inline float peak_and_nan(const float* x, int64_t begin, int64_t end, int* nan) {
    float peak = -INFINITY;
    int any_nan = 0;
#pragma omp simd reduction(max : peak) reduction(| : any_nan)
    for (int64_t i = begin; i < end; ++i) {
        peak = x[i] > peak ? x[i] : peak;
        any_nan |= x[i] != x[i];
    }
    *nan |= any_nan;
    return peak;
}

/* What a radix descent looks for, walking buckets from the largest values down. */
enum { BY_COUNT = 0, BY_MASS = 1 };

#define BUCKETS 1024  /* 10 bits per level: e in [0, 1] has bits <= 0x3F800000, so bits >> 20 < 1024 */
#define LANES 8       /* level 0 keeps 8 histograms, so runs of tokens in one bucket do not wait on each other */

/* The mass of the tokens with e >= threshold, in double (float partial sums of 64 tokens). */
static double mass_at_least(const float* e, int64_t vocab, float threshold) {
    double total = 0.0;
    for (int64_t start = 0; start < vocab; start += 64) {
        const int64_t end = start + 64 < vocab ? start + 64 : vocab;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = start; i < end; ++i) sum += e[i] >= threshold ? e[i] : 0.0f;
        total += sum;
    }
    return total;
}

/* From the top bucket down, the first where the tokens above plus the bucket reach `goal`; -1 if none.
 * Adds the buckets passed over to *count_above / *mass_above. */
static int crossing_bucket(const double* mass, const int32_t* count, int mode, double goal,
                           int64_t* count_above, double* mass_above) {
    for (int b = BUCKETS - 1; b >= 0; --b) {
        if (!count[b] && !(mass[b] > 0.0)) continue;
        const double reached = mode == BY_COUNT ? (double)(*count_above + count[b]) : *mass_above + mass[b];
        if (reached >= goal) return b;
        *mass_above += mass[b];
        *count_above += count[b];
    }
    return -1;
}

/* The largest value v among e[i] >= floor such that the tokens >= v hold at least `goal` (a count or a
 * mass), and in *kept_mass (unless NULL: it costs a pass over the row) the mass of the tokens >= v. Returns `floor` (and the mass above it) when all
 * of them together fall short of the goal (rounding at top_p close to 1): everything above floor stays.
 * Level 0 histograms bits 20-29 of every token; the crossing bucket's tokens are gathered into
 * `candidates` (scratch of vocab entries), and levels 1 and 2 histogram bits 10-19, then 0-9, of those. */
static float radix_select(const float* e, int64_t vocab, float floor, int mode, double goal,
                          float* candidates, double* kept_mass) {
    float lane_mass[LANES][BUCKETS];  /* float, like torch's scatter_add fallback: ~1e-7 relative per add */
    double mass[BUCKETS];
    int32_t lane_count[LANES][BUCKETS], count[BUCKETS];
    const uint32_t floor_bits = float_bits(floor);
    double mass_above = 0.0;
    int64_t count_above = 0;
    memset(lane_mass, 0, sizeof lane_mass);
    memset(lane_count, 0, sizeof lane_count);
    /* One loop per mode: a count search needs no mass here (the kept mass is summed at the end) and a
     * mass search no counts, and each memory update dropped is a good share of this, the costliest loop. */
    int64_t i = 0;
    if (mode == BY_COUNT) {
        for (; i + LANES <= vocab; i += LANES) {
            for (int lane = 0; lane < LANES; ++lane) {
                const uint32_t bits = float_bits(e[i + lane]);
                if (bits >= floor_bits) lane_count[lane][bits >> 20] += 1;
            }
        }
    } else {
        for (; i + LANES <= vocab; i += LANES) {
            for (int lane = 0; lane < LANES; ++lane) {
                const uint32_t bits = float_bits(e[i + lane]);
                if (bits >= floor_bits) lane_mass[lane][bits >> 20] += e[i + lane];
            }
        }
    }
    for (; i < vocab; ++i) {
        const uint32_t bits = float_bits(e[i]);
        if (bits < floor_bits) continue;
        lane_mass[0][bits >> 20] += e[i];
        lane_count[0][bits >> 20] += 1;
    }
    for (int b = 0; b < BUCKETS; ++b) {
        mass[b] = 0.0;
        count[b] = 0;
        for (int lane = 0; lane < LANES; ++lane) {
            mass[b] += lane_mass[lane][b];
            count[b] += lane_count[lane][b];
        }
    }
    int crossing = crossing_bucket(mass, count, mode, goal, &count_above, &mass_above);
    if (crossing < 0) {
        if (kept_mass) *kept_mass = mass_at_least(e, vocab, floor);
        return floor;
    }
    uint32_t prefix = (uint32_t)crossing;  /* the high bits every candidate shares */
    int64_t num_candidates = 0, j = 0;
#ifdef __AVX512F__
    /* 16 tokens at a time: compare, compress the matches in a register, store (candidates has 16 spare) */
    const __m512i wanted = _mm512_set1_epi32((int)prefix), lowest = _mm512_set1_epi32((int)floor_bits);
    for (; j + 16 <= vocab; j += 16) {
        const __m512i bits = _mm512_loadu_si512((const void*)(e + j));
        const __mmask16 match = _mm512_cmpeq_epi32_mask(_mm512_srli_epi32(bits, 20), wanted)
                              & _mm512_cmpge_epu32_mask(bits, lowest);
        _mm512_storeu_si512((void*)(candidates + num_candidates), _mm512_maskz_compress_epi32(match, bits));
        num_candidates += __builtin_popcount((unsigned)match);
    }
#endif
    for (; j < vocab; ++j) {  /* branch-free: the crossing bucket may hold most tokens */
        const uint32_t bits = float_bits(e[j]);
        candidates[num_candidates] = e[j];
        num_candidates += ((bits >> 20) == prefix) & (bits >= floor_bits);
    }
    for (int shift = 10; shift >= 0; shift -= 10) {
        memset(mass, 0, sizeof mass);
        memset(count, 0, sizeof count);
        for (int64_t j = 0; j < num_candidates; ++j) {
            const uint32_t bucket = (float_bits(candidates[j]) >> shift) & (BUCKETS - 1);
            mass[bucket] += candidates[j];
            count[bucket] += 1;
        }
        crossing = crossing_bucket(mass, count, mode, goal, &count_above, &mass_above);
        if (crossing < 0) {  /* rounding between levels: keep the bucket range found so far */
            const float threshold = bits_float(prefix << (shift + 10));
            if (kept_mass) *kept_mass = mass_at_least(e, vocab, threshold);
            return threshold;
        }
        prefix = (prefix << 10) | (uint32_t)crossing;
        if (shift == 0) break;
        int64_t kept = 0;
        for (int64_t j = 0; j < num_candidates; ++j) {
            candidates[kept] = candidates[j];
            kept += (float_bits(candidates[j]) >> shift) == prefix;
        }
        num_candidates = kept;
    }
    if (kept_mass) *kept_mass = mass_at_least(e, vocab, bits_float(prefix));
    return bits_float(prefix);
}

#ifdef __AVX512F__
#define FLOOR_RUNGS 8
/* The floor pays for its pass only on peaked rows: with the likeliest token's e = 1, a row whose e sum to more
 * than this is flat enough that top-p keeps most of it and the floor prunes next to nothing (48 rows of
 * 50304 at top-p 0.95, one thread: e summing to ~580 took 3.9 ms with the floor, 3.3 without; to 2-8,
 * 2.1-2.3 ms with it, 3.0 without; the two cross near 50). Either way the cut is the same. */
#define LADDER_MAX_MASS 64.0
/* A floor for the top-p cut among the tokens e >= lower (their mass: `total`): the cut cannot lie below any
 * F whose tokens in [lower, F) hold at most total - goal, since the tokens >= F then still reach `goal`.
 * F = base * 2^r for r = 1..8 with base = (total - goal) / (2 vocab) (below base lie at most half of
 * total - goal by construction); each rung must leave at most half of total - goal below it, a margin no
 * float rounding of these sums can cross. One vectorised pass; the selection then histograms only the
 * tokens above the floor (on a trained model's peaked rows, a few hundred instead of the vocabulary).
 * Returns `lower` when total - goal is too small to give a margin (top_p within 1e-6 of 1). */
static float top_p_floor(const float* e, int64_t vocab, float lower, double total, double goal) {
    const double spare = total - goal;
    if (!(spare > 1e-6 * total)) return lower;
    const float base = (float)(0.5 * spare / (double)vocab);
    float rung[FLOOR_RUNGS];
    __m512 below[FLOOR_RUNGS], rung16[FLOOR_RUNGS];
    for (int r = 0; r < FLOOR_RUNGS; ++r) {
        rung[r] = base * (float)(2 << r);
        rung16[r] = _mm512_set1_ps(rung[r]);
        below[r] = _mm512_setzero_ps();
    }
    const __m512 lower16 = _mm512_set1_ps(lower);
    int64_t i = 0;
    for (; i + 16 <= vocab; i += 16) {
        const __m512 v = _mm512_loadu_ps(e + i);
        const __mmask16 kept = _mm512_cmp_ps_mask(v, lower16, _CMP_GE_OQ);
        for (int r = 0; r < FLOOR_RUNGS; ++r)
            below[r] = _mm512_mask_add_ps(below[r], kept & _mm512_cmp_ps_mask(v, rung16[r], _CMP_LT_OQ), below[r], v);
    }
    double tail[FLOOR_RUNGS];
    for (int r = 0; r < FLOOR_RUNGS; ++r) tail[r] = _mm512_reduce_add_ps(below[r]);
    for (; i < vocab; ++i)
        for (int r = 0; r < FLOOR_RUNGS; ++r) tail[r] += (e[i] >= lower && e[i] < rung[r]) ? e[i] : 0.0f;
    float floor = base > lower ? base : lower;
    for (int r = 0; r < FLOOR_RUNGS; ++r)
        if (tail[r] <= 0.5 * spare && rung[r] > floor) floor = rung[r];
    return floor;
}

/* The tokens e >= floor, packed into `pool` (vocab + 16 entries); returns how many. */
static int64_t tokens_at_least(const float* e, int64_t vocab, float floor, float* pool) {
    const __m512 floor16 = _mm512_set1_ps(floor);
    int64_t n = 0, i = 0;
    for (; i + 16 <= vocab; i += 16) {
        const __m512 v = _mm512_loadu_ps(e + i);
        const __mmask16 kept = _mm512_cmp_ps_mask(v, floor16, _CMP_GE_OQ);
        _mm512_storeu_ps(pool + n, _mm512_maskz_compress_ps(kept, v));
        n += __builtin_popcount((unsigned)kept);
    }
    for (; i < vocab; ++i) {
        pool[n] = e[i];
        n += e[i] >= floor;
    }
    return n;
}
#endif

/* Block sums of the tokens e >= threshold into block_mass (num_blocks entries; e is padded with zeros to whole
 * blocks); returns their total, in double. */
static double kept_block_sums(const float* e, int64_t num_blocks, float threshold, float* block_mass) {
    double kept_total = 0.0;
    for (int64_t b = 0; b < num_blocks; ++b) {
        const float* block = e + b * BLOCK;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < BLOCK; ++j) sum += block[j] >= threshold ? block[j] : 0.0f;
        block_mass[b] = sum;
        kept_total += sum;
    }
    return kept_total;
}

/* The token where the cumulative mass of the tokens e >= threshold (vocabulary order) first exceeds target:
 * block sums first, then one block token by token; rounding that leaves the target past the end gives the
 * last kept token. */
static int64_t draw_token(const float* e, const float* block_mass, int64_t num_blocks, float threshold,
                          double target) {
    double before = 0.0;
    int64_t chosen = -1, last_block = -1;
    for (int64_t b = 0; b < num_blocks; ++b) {
        if (block_mass[b] <= 0.0f) continue;
        last_block = b;
        if (before + block_mass[b] <= target) {
            before += block_mass[b];
            continue;
        }
        for (int j = 0; j < BLOCK; ++j) {  /* the block the target falls in, token by token */
            const float value = e[b * BLOCK + j];
            if (value < threshold || value <= 0.0f) continue;
            chosen = b * BLOCK + j;
            before += value;
            if (before > target) break;  /* else rounding: the block's last kept token */
        }
        return chosen;
    }
    for (int j = BLOCK - 1; last_block >= 0 && j >= 0; --j) {
        const float value = e[last_block * BLOCK + j];
        if (value >= threshold && value > 0.0f) return last_block * BLOCK + j;
    }
    return chosen;
}

/* The row's uniform for draw `attempt` >= 1: splitmix64 of the first uniform's bits plus attempt times the
 * golden ratio, 53 bits of it in (0, 1). neox_ray.engine.sampler.derived_uniforms computes the same numbers. */
static double derived_uniform(double first, int attempt) {
    uint64_t z;
    memcpy(&z, &first, sizeof z);
    z += (uint64_t)attempt * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return ((double)(z >> 11) + 0.5) * 0x1p-53;
}

int sample_rows_f32(const float* logits, int64_t row_stride, int64_t num_rows, int64_t vocab,
                    const float* temperatures, const int64_t* top_ks, const float* top_ps,
                    const float* min_ps, const double* uniforms, int64_t* tokens, int num_threads) {
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float* e = (float*)malloc(sizeof(float) * (size_t)(vocab + BLOCK));
        float* candidates = (float*)malloc(sizeof(float) * (size_t)(vocab + 16));
        float* block_mass = (float*)malloc(sizeof(float) * (size_t)(vocab / BLOCK + 2));
        float* pool = (float*)malloc(sizeof(float) * (size_t)(vocab + 16));
        if (!e || !candidates || !block_mass || !pool) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t row = 0; row < num_rows; ++row) {
            if (!e || !candidates || !block_mass || !pool) continue;
            const float* x = logits + row * row_stride;
            float peak = -INFINITY;
#pragma omp simd reduction(max : peak)
            for (int64_t i = 0; i < vocab; ++i) peak = x[i] > peak ? x[i] : peak;
            const float inverse_temperature = 1.0f / temperatures[row];
            float partial = 0.0f;
            int64_t first = 0;
#ifdef __AVX512F__
            {  /* explicit: 48 x 50304 rows at temperature 0.8 took 0.95 ms with the compiler-vectorised loop, 0.70 */
                const __m512 peak16 = _mm512_set1_ps(peak), scale16 = _mm512_set1_ps(inverse_temperature);
                __m512 sum16 = _mm512_setzero_ps();
                for (; first + 16 <= vocab; first += 16) {
                    const __m512 z = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + first), peak16), scale16);
                    const __m512 value = exp_nonpositive16(z);
                    _mm512_storeu_ps(e + first, value);
                    sum16 = _mm512_add_ps(sum16, value);
                }
                partial = _mm512_reduce_add_ps(sum16);
            }
#endif
            for (int64_t i = first; i < vocab; ++i) {
                e[i] = exp_nonpositive((x[i] - peak) * inverse_temperature);
                partial += e[i];
            }
            const double total = partial;
            /* Filters, each as a threshold on e. */
            float threshold = 0.0f;
            double filtered_mass = total;  /* the mass top-p is a share of: the top-k tokens' */
            const int64_t top_k = top_ks[row];
            const float top_p = top_ps[row];
            if (top_k > 0 && top_k < vocab) {  /* top-p then needs the top-k mass, else it is not summed */
                threshold = radix_select(e, vocab, 0.0f, BY_COUNT, (double)top_k, candidates,
                                         top_p < 1.0f ? &filtered_mass : NULL);
            }
            /* Top-k and min-p are thresholds the draw applies directly; top-p is a rejection test on the drawn
             * token (the tokens likelier than it must hold less than top_p of the top-k mass), so its cut is not
             * searched for: the accepted draw follows the filtered distribution exactly, and takes 1 / (kept
             * share) draws on average. TOP_P_DRAWS rejections in a row fall back to the exact cut. */
            float base = min_ps[row] > threshold ? min_ps[row] : threshold;
            if (base > 1.0f) base = 1.0f;  /* the likeliest token (e == 1) always stays */
            const int64_t num_blocks = (vocab + BLOCK - 1) / BLOCK;
            for (int64_t i = vocab; i < num_blocks * BLOCK; ++i) e[i] = 0.0f;
            double kept_total = kept_block_sums(e, num_blocks, base, block_mass);
            if (!(kept_total > 0.0)) {  /* nothing finite to sample from (all logits -inf or NaN) */
                int64_t first_peak = 0;
                while (first_peak < vocab - 1 && !(x[first_peak] >= peak)) ++first_peak;
                tokens[row] = first_peak;
                continue;
            }
            int64_t chosen = draw_token(e, block_mass, num_blocks, base, uniforms[row] * kept_total);
            if (top_p < 1.0f) {
                const double goal = (double)top_p * filtered_mass;
                int attempt = 0;
                /* t is inside the nucleus exactly when the tokens with e > e_t (e >= the next float up)
                 * hold less than the goal */
                while (chosen >= 0 && !(mass_at_least(e, vocab, bits_float(float_bits(e[chosen]) + 1)) < goal)) {
                    if (++attempt == TOP_P_DRAWS) {
                        chosen = -1;
                        break;
                    }
                    chosen = draw_token(e, block_mass, num_blocks, base,
                                        derived_uniform(uniforms[row], attempt) * kept_total);
                }
                if (chosen < 0) {  /* the exact cut, and one draw among the tokens it keeps */
                    const float* pooled = e;
                    int64_t pooled_count = vocab;
                    float floor = threshold;
#ifdef __AVX512F__
                    if (filtered_mass <= LADDER_MAX_MASS) floor = top_p_floor(e, vocab, threshold, filtered_mass, goal);
                    if (floor > threshold) {  /* select among the tokens above the floor only */
                        pooled_count = tokens_at_least(e, vocab, floor, pool);
                        pooled = pool;
                    }
#endif
                    const float cut = radix_select(pooled, pooled_count, floor, BY_MASS, goal, candidates, NULL);
                    const float kept = cut > base ? (cut > 1.0f ? 1.0f : cut) : base;
                    kept_total = kept_block_sums(e, num_blocks, kept, block_mass);
                    chosen = draw_token(e, block_mass, num_blocks, kept,
                                        derived_uniform(uniforms[row], TOP_P_DRAWS) * kept_total);
                }
            }
            tokens[row] = chosen;
        }
        free(e);
        free(candidates);
        free(block_mass);
        free(pool);
    }
    return failed ? -1 : 0;
}

/* Greedy rows: the index of each row's largest logit, the first one on ties and the first NaN if there
 * is one (what torch.argmax returns), from one vectorised pass over blocks and a scan of one block. */
void argmax_rows_f32(const float* logits, int64_t row_stride, int64_t num_rows, int64_t vocab, int64_t* tokens,
                     int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t row = 0; row < num_rows; ++row) {
        const float* x = logits + row * row_stride;
        float peak = -INFINITY;
        int64_t peak_block = 0;
        int nan = 0;
        for (int64_t start = 0; start < vocab; start += BLOCK) {  /* the first block holding the maximum */
            const int64_t end = start + BLOCK < vocab ? start + BLOCK : vocab;
            const float block_peak = peak_and_nan(x, start, end, &nan);
            if (block_peak > peak) {
                peak = block_peak;
                peak_block = start;
            }
        }
        int64_t first = 0;
        if (nan) {
            while (x[first] == x[first]) ++first;
        } else {
            first = peak_block;
            while (first < vocab - 1 && x[first] != peak) ++first;
        }
        tokens[row] = first;
    }
}

/* Scoring rows: log(sum(exp(x))) of each row, so that a token's logprob is its logit minus it, without
 * the (rows, vocab) log-softmax tensor torch would write: a max pass and an exp-sum pass (float partial
 * sums of 64 tokens, added in double). */
void logsumexp_rows_f32(const float* logits, int64_t row_stride, int64_t num_rows, int64_t vocab, float* out,
                        int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t row = 0; row < num_rows; ++row) {
        const float* x = logits + row * row_stride;
        int nan = 0;
        const float peak = peak_and_nan(x, 0, vocab, &nan);
        if (nan || !(peak > -INFINITY) || peak == INFINITY) {  /* what torch gives: NaN, -inf, inf */
            out[row] = nan ? NAN : peak;
            continue;
        }
        double total = 0.0;
        for (int64_t start = 0; start < vocab; start += BLOCK) {
            const int64_t end = start + BLOCK < vocab ? start + BLOCK : vocab;
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t i = start; i < end; ++i) sum += exp_nonpositive(x[i] - peak);
            total += sum;
        }
        out[row] = peak + (float)log(total);
    }
}
