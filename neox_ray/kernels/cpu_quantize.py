"""Builds, loads and calls the CPU activation quantizer (``cpu_quantize.c``) of the int8 GEMM.

Why a kernel: quantizing an activation per tensor with torch ops takes a min, a max, a quantize and a copy
out of the quantized tensor (four passes, and a bfloat16 activation a fifth to widen it); profiled in a
pythia-160m prefill they cost as much as the int8 GEMMs themselves. The kernel does it in two passes
(min/max, quantize) reading float32 or bfloat16 directly.

It is built at first use by :mod:`neox_ray.kernels.build` (cached, atomically written, switched off by
``NEOX_RAY_CPU_KERNELS=0``). When it is unavailable :func:`quantize` returns None and the caller
(:mod:`neox_ray.layers.cpu_int8`) quantizes with torch ops: same values, slower.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from neox_ray.kernels.build import load_library

SOURCE = Path(__file__).with_name("cpu_quantize.c")
_FUNCTIONS = {torch.float32: "quantize_u8_f32", torch.bfloat16: "quantize_u8_bf16"}
_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]


@functools.cache
def _library() -> ctypes.CDLL | None:
    return load_library(SOURCE, "CPU quantizer kernel", "torch ops for int8 activations (slower)",
                        {name: (_ARGTYPES, None) for name in _FUNCTIONS.values()})


def available(dtype: torch.dtype) -> bool:
    return dtype in _FUNCTIONS and _library() is not None


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, float, int] | None:
    """(uint8 values shaped like ``x``, scale, zero point), ``x ~= (values - zero_point) * scale``, over
    ``x``'s [min, max] widened to include 0; None when the kernel is unavailable for ``x``."""
    library = _library()
    if library is None or x.dtype not in _FUNCTIONS or x.device.type != "cpu":
        return None
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.uint8)
    scale, zero_point = ctypes.c_double(), ctypes.c_int64()
    getattr(library, _FUNCTIONS[x.dtype])(x.data_ptr(), x.numel(), out.data_ptr(), ctypes.byref(scale),
                                          ctypes.byref(zero_point), torch.get_num_threads())
    return out, scale.value, zero_point.value
