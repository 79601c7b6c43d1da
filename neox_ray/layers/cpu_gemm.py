"""CPU matmuls through oneDNN with weights packed once at load time (the CPU counterpart of cuBLAS).

``F.linear`` on CPU calls MKL's sgemm with a plain weight; oneDNN's ``_linear_pointwise`` takes a weight
reordered once into its blocked layout and applies GELU/ReLU/SiLU in the GEMM's epilogue instead of another
pass over the activations. Measured on the 2-core AMD EPYC CI-class VM, fp32: the twelve pythia-160m
layers' linears with weights streamed from DRAM take 78 ms vs 135 ms at 96 rows and 12 ms vs 23 ms at one
row; the 50k-row LM head 37 ms vs 63 ms at 96 rows; a 2048^3 matmul 221 vs 187 GFLOP/s
(``benchmarks/README.md``). Likely reasons, not measured one by one: a GEMM handed an unpacked weight packs
it on every call, and oneDNN uses this CPU's AVX-512.

This module only packs and multiplies. The layers (:mod:`neox_ray.layers.linear`,
:mod:`neox_ray.layers.embedding`) decide to use a packed weight when they have one; the model runner
decides when to pack (CPU, float32 or bfloat16, oneDNN present and passing a self-check).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from neox_ray.layers.activation import get_activation

# hidden_act -> (oneDNN post-op, its algorithm). Other activations run as a separate op after the GEMM.
FUSED_ACTIVATIONS: dict[str, tuple[str, str]] = {
    "gelu": ("gelu", "none"),
    "gelu_new": ("gelu", "tanh"),
    "gelu_fast": ("gelu", "tanh"),
    "gelu_pytorch_tanh": ("gelu", "tanh"),
    "relu": ("relu", ""),
    "silu": ("swish", ""),
    "swish": ("swish", ""),
}


@functools.cache
def packing_supported(dtype: torch.dtype) -> bool:
    """True when this torch build packs and multiplies ``dtype`` weights through oneDNN and the result
    matches ``F.linear`` on a small problem (so an odd build or CPU falls back instead of miscomputing)."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 40, generator=generator).to(dtype)
        bias = torch.randn(24, generator=generator).to(dtype)
        x = torch.randn(3, 40, generator=generator).to(dtype)
        packed = pack_weight(weight)
        got = packed_linear(x, packed, bias, "gelu").float()
        want = F.gelu(F.linear(x.float(), weight.float(), bias.float()))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    return bool(torch.allclose(got, want, atol=tolerance, rtol=tolerance))


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(out_features, in_features) -> an opaque oneDNN tensor in the GEMM's blocked layout."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def packed_linear(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None,
                  activation: str | None = None) -> torch.Tensor:
    """``activation(x W^T + b)`` with W packed by :func:`pack_weight`; ``activation`` is a ``hidden_act``
    name, fused into the GEMM when oneDNN has it as a post-op, else applied afterwards."""
    post_op, algorithm = FUSED_ACTIVATIONS.get(activation, ("none", "")) if activation else ("none", "")
    out = torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, post_op, [], algorithm)
    if activation and activation not in FUSED_ACTIVATIONS:
        out = get_activation(activation)(out)
    return out
