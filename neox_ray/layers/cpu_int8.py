"""int8 CPU matmuls: int8 weights (symmetric, one scale per output channel) times activations quantized
on the fly (uint8, one scale and zero point per tensor), through oneDNN's int8 GEMM (VNNI; AMX where present).

The op is ``onednn::qlinear_pointwise``, the x86 int8 path torch's inductor emits: the weight is quantized
and packed once (:func:`pack_int8_weight`), each call quantizes the activation (:func:`quantize_activation`)
and the GEMM writes float32 or bfloat16 directly with the bias and GELU/ReLU/SiLU fused in its epilogue.

Measured with ``benchmarks/int8_gemm.py`` on the 2-core Sapphire Rapids dev VM (AMX), 2 threads, best of 7,
ms, activation quantization included; "layer" is pythia-160m's four linears, "head" the 50304 x 768 LM head:

    rows M               1      16      64     256    2048
    layer fp32 packed  0.59    1.07    2.98   11.52   91.35
    layer bf16 packed  0.28    0.32    0.62    1.67   12.35
    layer int8 (this)  0.24    0.31    0.62    1.65   11.34
    head  fp32 packed  6.69   10.00   21.80   64.53
    head  bf16 packed  2.49    2.07    7.19   10.21
    head  int8 (this)  0.87    0.94    2.99    7.39

With AMX switched off (``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``: VNNI and AVX512-BF16 only, like the Zen4 CI
machine; one thread, loaded VM, layer + head for M <= 64): fp32 16.5 / 24.3 / 83.2 / 40.8 ms at M = 1 / 16 /
64 / 256, bf16 6.5 / 17.8 / 108.5 / 54.4, int8 1.9 / 5.8 / 22.7 / 7.4.

End to end on the AMX VM (random pythia-160m, 32 prompts of 16-128 tokens, 64 greedy tokens each, one quick
run): fp32 395 tok/s, bf16 762, int8 793, int8 with bf16 activations 821. There the int8 GEMMs are about a
third of a step's time (cProfile); decode attention, rotary and per-step Python take most of the rest. With
AMX switched off as above: fp32 401, bf16 383, int8 696, int8 with bf16 activations 722.

Memory (pythia-160m, anonymous RSS after load): the packed fp32 linears and LM head take 472 MiB, int8 120 MiB;
the input embedding stays float (148 MiB fp32, mapped from the checkpoint).

Why this path and these choices:

- small M (decode) is weight-bandwidth bound: int8 weights are a quarter of fp32 and half of bf16;
  with AMX, layers at M >= 16 run about as fast as AMX bf16 (both compute-bound on AMX tiles), the LM head
  2-3x faster; without AMX int8 (VNNI) beat bf16 by 3-7x in the run above;
- ``torch._int_mm`` (per-token activation scales, dequantized afterwards) was 2-12x slower;
  ``quantized::linear_dynamic`` (fbgemm, torch.ao) is faster at M=1 while the weights sit in cache (a
  microbenchmark artefact: a model's 85+ MB of weights do not) and 2-8x slower from M=64 up, and its
  quantized-tensor API is deprecated; ``torch._weight_int8pack_mm`` (weight-only) is far slower;
- activations are uint8 with a zero point, not int8: without AMX oneDNN runs int8 (s8) activations on its
  reference kernel (~300x slower), uint8 on ``brg_matmul:avx512_core_vnni``;
- per-tensor activation scales, because oneDNN's int8 linear takes one activation scale. On a random
  activation with four 20x outlier channels and token scales spread 40x, per-tensor gave 8.0% relative
  output error vs 4.1% per token; the inputs here come out of LayerNorm, attention or GELU, whose
  tokens have similar scales, which is the case per-tensor handles well.

Activations are quantized by a small C kernel (:mod:`neox_ray.kernels.cpu_quantize`; two passes, reads
bf16 directly): 409 us for 2048 x 768 vs 730 us for torch's fused ``quantize_per_tensor_dynamic`` (which
also needs a widened copy of a bf16 input), the fallback when no compiler is present.

Decode batches (at most 64 rows) on a CPU with AMX or AVX512-VNNI go to our own kernel instead
(:mod:`neox_ray.kernels.cpu_int8_gemm`, same quantized values, the erf GELU fused): on AMX oneDNN streamed the
weights at ~10 GB/s for 48 rows and cost ~45 us a call even for one (70m int8-bf16 decode pass 1.07 -> 0.80-0.89 s,
160m 2.72 -> 2.3-2.4 s on the 2-core AMX VM); on the 2-core Zen 4 box (VNNI) oneDNN cost 25-33 us a call at one
row and read cold weights at 14-21 GB/s, the kernel 28-33 GB/s, and 48 rows of the LM head ran 4.2 -> 3.2 ms
(70m int8-bf16 pass 1.50-1.61 -> 1.24-1.50 s, 160m 3.85-4.47 -> 3.51-3.73 s, same tokens). With AMX it keeps
its own copy of the weights in its tile layout beside oneDNN's (prefill stays on oneDNN, which was 1.3-1.9x faster
there than the AMX kernel over 64-row chunks), so int8 weights take twice their bytes on such CPUs; the VNNI
version takes prefills too (as fast as oneDNN there), so on VNNI CPUs a layer holds only the kernel's copy.

This module only quantizes, packs and multiplies. The layers (:mod:`neox_ray.layers.linear`) use an int8 weight
when they have one; the model runner decides to quantize (``quantization="int8"``, CPU, and
:func:`int8_supported` passing its self-check).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from neox_ray.kernels import cpu_int8_gemm, cpu_quantize
from neox_ray.layers.activation import get_activation
from neox_ray.layers.cpu_gemm import FUSED_ACTIVATIONS  # the int8 GEMM takes the same post-ops

UNSUPPORTED_MESSAGE = ("quantization int8 needs torch's oneDNN int8 linear (onednn::qlinear_pointwise) working on "
                       "this CPU, and this torch build or CPU lacks it or failed its self-check")

# torch marks its quantized-tensor constructors deprecated; we only borrow the fused min/max + quantize kernel
# and read the plain uint8 values back. If a later torch removes it, the self-check falls back to plain ops.
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
                        category=UserWarning)


@dataclass(frozen=True)
class Int8Weight:
    """A weight quantized per output channel and packed for oneDNN (and, on AMX or VNNI CPUs, for the decode kernel)."""
    packed: torch.Tensor | None  # opaque oneDNN int8 tensor, (in_features, out_features) blocked; None when
    #                              our kernel takes every batch size on this CPU (VNNI) and took this shape
    scales: torch.Tensor         # (out_features,) float32: weight = int8 value * scale
    zero_points: torch.Tensor    # (out_features,) int64 zeros (symmetric); the op wants them as a tensor
    tiles: cpu_int8_gemm.PackedInt8 | None = None  # the same int8 values for our kernel (AMX: decode batches)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (out, in) int8 in [-127, 127] and (out,) float32 scales, one per output channel."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(weight / scales[:, None]).clamp_(-127, 127).to(torch.int8), scales


def pack_int8_weight(weight: torch.Tensor, kernel: bool = True) -> Int8Weight:
    """Quantizes and packs ``weight`` for oneDNN and (``kernel``, where it runs and takes the shape) for our
    kernel. Where the kernel takes every batch size (VNNI CPUs) the oneDNN copy is not made: int8 weights then
    take their bytes once."""
    quantized, scales = quantize_weight(weight)
    tiles = cpu_int8_gemm.pack(quantized, scales) if kernel else None
    packed = None if tiles is not None and cpu_int8_gemm.takes_every_batch() else \
        torch.ops.onednn.qlinear_prepack(quantized, None)
    return Int8Weight(packed, scales, torch.zeros(scales.numel(), dtype=torch.int64), tiles)


def _quantize_fused(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    quantized = torch.quantize_per_tensor_dynamic(x.float(), torch.quint8, False)
    return quantized.int_repr(), quantized.q_scale(), quantized.q_zero_point()


def _quantize_plain(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=torch.uint8), 1.0, 0
    low, high = torch.aminmax(x)
    low_value, high_value = min(float(low), 0.0), max(float(high), 0.0)  # zero stays exactly representable
    scale = (high_value - low_value) / 255 or 1.0
    zero_point = int(round(-low_value / scale))
    return torch.round(x.float() * (1 / scale) + zero_point).clamp_(0, 255).to(torch.uint8), scale, zero_point


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """float32/bfloat16 -> (uint8 values, scale, zero point) over the tensor's [min, max] (with 0): the C
    kernel when it built, else torch's fused quantizer, else plain torch ops (all give the same values)."""
    quantized = cpu_quantize.quantize(x)
    if quantized is not None:
        return quantized
    return _quantize_fused(x) if x.numel() and _fused_quantizer_works() else _quantize_plain(x)


def int8_linear(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None,
                activation: str | None = None, output_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``activation(x W^T + b)`` in ``output_dtype`` (default ``x``'s dtype), W from :func:`pack_int8_weight`;
    ``activation`` is a ``hidden_act`` name, fused into the GEMM when oneDNN has it, else applied afterwards.
    The GEMM writes ``output_dtype`` itself (float32 logits from bfloat16 activations need no extra pass)."""
    if x.dim() != 2:
        return int8_linear(x.reshape(-1, x.shape[-1]), weight, bias, activation,
                           output_dtype).reshape(*x.shape[:-1], -1)
    quantized, scale, zero_point = quantize_activation(x)
    if weight.tiles is not None and (weight.packed is None or x.shape[0] <= cpu_int8_gemm.MAX_ROWS):
        fused_gelu = activation == "gelu"  # the erf GELU, in the kernel's epilogue; others applied after it
        out = cpu_int8_gemm.multiply(quantized, scale, zero_point, weight.tiles, bias, output_dtype or x.dtype,
                                     gelu=fused_gelu)
        if out is not None:
            return get_activation(activation)(out) if activation and not fused_gelu else out
    if weight.packed is None:
        raise RuntimeError("the int8 GEMM kernel refused a batch of a weight it holds the only copy of")
    post_op, algorithm = FUSED_ACTIVATIONS.get(activation, ("none", "")) if activation else ("none", "")
    out = torch.ops.onednn.qlinear_pointwise(quantized, scale, zero_point, weight.packed, weight.scales,
                                             weight.zero_points, bias, 1.0, 0, output_dtype or x.dtype, post_op, [],
                                             algorithm)
    if activation and activation not in FUSED_ACTIVATIONS:
        out = get_activation(activation)(out)
    return out


@functools.cache
def _fused_quantizer_works() -> bool:
    try:
        x = torch.tensor([[-1.0, 0.0, 0.5, 3.0]])
        return bool(torch.equal(_quantize_fused(x)[0], _quantize_plain(x)[0]))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-12))


# int8 weights and a uint8 activation keep a dot product over K terms to about 1% relative error (each
# factor's rounding error is up to half a step out of 127 / 255, and independent errors add in quadrature);
# 5% leaves room for bf16 output while still catching a wrong scale or layout (those are off by O(1)).
SELF_CHECK_TOLERANCE = 0.05


@functools.cache
def int8_supported(dtype: torch.dtype = torch.float32) -> bool:
    """True when this torch build and CPU run :func:`int8_linear` with ``dtype`` activations and a small
    problem matches ``F.linear`` within :data:`SELF_CHECK_TOLERANCE` (relative error)."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(48, 64, generator=generator)
        bias = torch.randn(48, generator=generator)
        x = torch.randn(5, 64, generator=generator)
        want = F.gelu(F.linear(x, weight, bias))
        # oneDNN, and our kernel where it runs: a layer may take either (or both) depending on its shape
        results = [int8_linear(x.to(dtype), pack_int8_weight(weight, kernel=kernel), bias.to(dtype), "gelu")
                   for kernel in (False, True)]
    except (RuntimeError, AttributeError, NotImplementedError, TypeError):
        return False
    return all(got.dtype == dtype and got.shape == want.shape and relative_error(got, want) < SELF_CHECK_TOLERANCE
               for got in results)
