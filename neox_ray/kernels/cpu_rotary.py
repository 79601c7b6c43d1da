"""Builds, loads and calls the CPU kernel that splits a fused QKV projection and rotates query and key
(``cpu_rotary.c``).

Why a kernel: torch's rotate-half is about ten small passes per layer (view, unbind, slice, concatenate,
negate, multiply, add, concatenate, two contiguous copies), each a dispatch costing more than its work at
decode batch sizes; profiled on the 70m shape in int8 + bfloat16 that was 170 us per layer and step, about
6 % of the step. The kernel makes one pass and gives the same values (see the C file for why bit for bit).

Built at first use by :mod:`neox_ray.kernels.build`; when unavailable (no compiler, ``NEOX_RAY_CPU_KERNELS=0``,
a non-CPU tensor, another dtype) :func:`rotate_split` returns None and :mod:`neox_ray.layers.rotary` runs the
torch ops. This module knows nothing of the model beyond the QKV row layout (heads, 3, head_dim).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from neox_ray.kernels.build import load_library

SOURCE = Path(__file__).with_name("cpu_rotary.c")
_FUNCTIONS = {torch.float32: "rotate_split_f32", torch.bfloat16: "rotate_split_bf16"}
_INT64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = [_PTR, _INT64, _INT64, _INT64, _INT64, _INT64, _PTR, _PTR, _PTR, _PTR, _PTR, ctypes.c_int]
# Below this many tokens one thread does it (waking a second costs more than the pass); measured on 2 cores.
PARALLEL_MIN_TOKENS = 256


@functools.cache
def _library() -> ctypes.CDLL | None:
    return load_library(SOURCE, "CPU rotary kernel", "torch ops for rotary embeddings (slower)",
                        {name: (_ARGTYPES, None) for name in _FUNCTIONS.values()})


def rotate_split(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """qkv: (tokens, heads, 3, head_dim) with unit stride inside a token's row; cos, sin: (tokens, 1,
    rotary_dim) float32. Returns contiguous (tokens, heads, head_dim) query and key (rotated on their first
    ``rotary_dim`` dims) and value, or None when the kernel is unavailable for these inputs."""
    library = _library()
    if library is None or qkv.dtype not in _FUNCTIONS or qkv.device.type != "cpu" or qkv.dim() != 4:
        return None
    num_tokens, num_heads, three, head_dim = qkv.shape
    if three != 3 or rotary_dim % 2 or not 0 <= rotary_dim <= head_dim:
        raise ValueError(f"qkv must be (tokens, heads, 3, head_dim) with an even rotary_dim <= head_dim; got "
                         f"{tuple(qkv.shape)} and rotary_dim {rotary_dim}")
    if qkv.stride()[1:] != (3 * head_dim, head_dim, 1):
        qkv = qkv.contiguous()
    cos, sin = (t.reshape(num_tokens, rotary_dim).float().contiguous() for t in (cos, sin))
    query, key, value = (torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype) for _ in range(3))
    threads = torch.get_num_threads() if num_tokens >= PARALLEL_MIN_TOKENS else 1
    getattr(library, _FUNCTIONS[qkv.dtype])(qkv.data_ptr(), qkv.stride(0), num_tokens, num_heads, head_dim,
                                            rotary_dim, cos.data_ptr(), sin.data_ptr(), query.data_ptr(),
                                            key.data_ptr(), value.data_ptr(), threads)
    return query, key, value
