/* GPT-NeoX rotary embedding fused with the split of the QKV projection, on CPU.
 *
 * The fused QKV linear writes, per token, heads x (query, key, value) x head_dim. Attention needs query,
 * key and value as separate (tokens, heads, head_dim) tensors with the first rotary_dim dims of query and
 * key rotated ("rotate half": out[i] = x[i] cos[i] - x[i + half] sin[i] below half, x[i] cos[i] +
 * x[i - half] sin[i] up to rotary_dim). In torch that is a view, an unbind, a slice, a concatenation, a
 * negation, two multiplies, an add and another concatenation per tensor, plus two copies to make key and
 * value contiguous: about ten small passes per layer. This does it in one pass.
 *
 * The arithmetic is torch's: x * cos and rotated * sin each rounded to float, then added (the build uses
 * -std=c11, so the compiler does not contract them into one fused multiply-add); bfloat16 inputs are widened
 * to float and the result rounded to nearest even, as torch's rotate in float32 then store does.
 *
 * Built at first use by neox_ray/kernels/cpu_rotary.py, which owns the argument checks.
 */
#include <stdint.h>
#include <string.h>

#include "cpu_math.h"

#define DEFINE_ROTATE_SPLIT(NAME, T, LOAD, STORE)                                                           \
void NAME(const T* qkv, int64_t qkv_row_stride, int64_t num_tokens, int64_t num_heads, int64_t head_dim,    \
          int64_t rotary_dim, const float* cos, const float* sin, T* query, T* key, T* value,               \
          int num_threads) {                                                                                \
    const int64_t half = rotary_dim / 2;                                                                    \
    const int64_t row = num_heads * head_dim;                                                               \
    _Pragma("omp parallel for num_threads(num_threads) schedule(static)")                                   \
    for (int64_t t = 0; t < num_tokens; ++t) {                                                              \
        const float* c = cos + t * rotary_dim;                                                              \
        const float* s = sin + t * rotary_dim;                                                              \
        for (int64_t h = 0; h < num_heads; ++h) {                                                           \
            const T* in = qkv + t * qkv_row_stride + h * 3 * head_dim;                                      \
            T* outs[2] = {query + t * row + h * head_dim, key + t * row + h * head_dim};                    \
            for (int which = 0; which < 2; ++which) {                                                       \
                const T* x = in + which * head_dim;                                                         \
                T* out = outs[which];                                                                       \
                for (int64_t i = 0; i < half; ++i) {                                                        \
                    const float a = LOAD(x[i]) * c[i];                                                      \
                    const float b = -LOAD(x[i + half]) * s[i];                                              \
                    out[i] = STORE(a + b);                                                                  \
                }                                                                                           \
                for (int64_t i = half; i < rotary_dim; ++i) {                                               \
                    const float a = LOAD(x[i]) * c[i];                                                      \
                    const float b = LOAD(x[i - half]) * s[i];                                               \
                    out[i] = STORE(a + b);                                                                  \
                }                                                                                           \
                memcpy(out + rotary_dim, x + rotary_dim, sizeof(T) * (size_t)(head_dim - rotary_dim));      \
            }                                                                                               \
            memcpy(value + t * row + h * head_dim, in + 2 * head_dim, sizeof(T) * (size_t)head_dim);        \
        }                                                                                                   \
    }                                                                                                       \
}

#define LOAD_F32(x) (x)
#define STORE_F32(x) (x)
DEFINE_ROTATE_SPLIT(rotate_split_f32, float, LOAD_F32, STORE_F32)
DEFINE_ROTATE_SPLIT(rotate_split_bf16, uint16_t, bf16_to_float, float_to_bf16)
