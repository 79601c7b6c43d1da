"""Builds, loads and calls the int8 GEMM for decode-sized batches (``cpu_int8_gemm.c``): AMX tiles where the CPU
has them, AVX512-VNNI elsewhere, one packed weight layout for both.

Why a kernel: a decode step's int8 linears multiply a few dozen rows by weights that come from memory, so
they are bound by how fast the weights stream, and there are ~25 of them a step. oneDNN's AMX matmul reads the
weights at 15-22 GB/s for up to 16 rows but ~10 GB/s for 48, and pays ~45 us a call even for one row; its VNNI
matmul (Zen 4) pays 42-53 us a call at one row and runs small layers well below the VPDPBUSD peak at 48 rows.
The kernel reads each 16-channel block of weights once for all rows (see the C file).

It is used only where it applies: the CPU has AMX (int8) or AVX512-VNNI and the build saw it (for AMX, Linux
also granted the process AMX state), input features a multiple of 64 and output features of 16, and for AMX at
most :data:`MAX_ROWS` rows (the VNNI version takes any number, so on such CPUs it runs prefills too and layers
keep no oneDNN copy of their weights: :func:`takes_every_batch`). Everywhere else :func:`available` is False
or :func:`multiply` returns None and the caller (:mod:`neox_ray.layers.cpu_int8`) runs oneDNN. Built at first
use by :mod:`neox_ray.kernels.build` (``NEOX_RAY_CPU_KERNELS=0`` switches it off).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from neox_ray.kernels.build import load_library

SOURCE = Path(__file__).with_name("cpu_int8_gemm.c")
MAX_ROWS = 64  # the AMX version's limit (four 16-row accumulator tiles)
_PTR, _INT64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "int8_gemm_amx_ready": ([], ctypes.c_int),
    "int8_gemm_amx": ([_PTR, _INT64, _INT64, _PTR, _INT64, _PTR, _PTR, _PTR, ctypes.c_float, ctypes.c_int32,
                       ctypes.c_int, _PTR, ctypes.c_int, ctypes.c_int], ctypes.c_int),
    "int8_gemm_vnni_ready": ([], ctypes.c_int),
    "int8_gemm_vnni": ([_PTR, _INT64, _INT64, _PTR, _INT64, _PTR, _PTR, _PTR, ctypes.c_float, ctypes.c_int32,
                        ctypes.c_int, _PTR, ctypes.c_int, ctypes.c_int], ctypes.c_int),
    "int8_gemm_pack": ([_PTR, _INT64, _INT64, _PTR, _PTR], ctypes.c_int),
}
BACKENDS = ("amx", "vnni")


@functools.cache
def _library() -> ctypes.CDLL | None:
    return load_library(SOURCE, "int8 GEMM kernel", "oneDNN's int8 matmul for every batch size", _SIGNATURES)


@functools.cache
def backends() -> tuple[str, ...]:
    """The versions this CPU, build and process run, fastest first (AMX, then VNNI)."""
    library = _library()
    if library is None:
        return ()
    ready = {"amx": library.int8_gemm_amx_ready(), "vnni": library.int8_gemm_vnni_ready()}
    return tuple(name for name in BACKENDS if ready[name])


def available(backend: str | None = None) -> bool:
    """Whether this CPU, build and process run the kernel (``backend``: that version of it)."""
    return bool(backends()) if backend is None else backend in backends()


def takes_every_batch() -> bool:
    """Whether the version this CPU runs takes any number of rows (VNNI), so a layer needs no oneDNN copy of its
    weights for prefill. The AMX version stops at :data:`MAX_ROWS` (its four accumulator tiles), and oneDNN's
    AMX matmul beat it 1.3-1.9x on long prefills; on VNNI the two run long prefills at the same 85-97 % of
    VPDPBUSD's peak."""
    return backends()[:1] == ("vnni",)


def applies(in_features: int, out_features: int) -> bool:
    return in_features % 64 == 0 and out_features % 16 == 0


@dataclass(frozen=True)
class PackedInt8:
    """Weights in the kernel's tile layout, with what the epilogue needs."""
    tiles: torch.Tensor          # (out_features * in_features,) int8
    column_sums: torch.Tensor    # (out_features,) int32: each channel's sum of int8 weights
    scales: torch.Tensor         # (out_features,) float32
    in_features: int
    out_features: int


def pack(quantized: torch.Tensor, scales: torch.Tensor) -> PackedInt8 | None:
    """(out, in) int8 weights and their per-channel scales -> the kernel's layout; None when the kernel is not
    available or does not take this shape."""
    library = _library()
    out_features, in_features = quantized.shape
    if library is None or not backends() or not applies(in_features, out_features):
        return None
    quantized = quantized.contiguous()
    tiles = torch.empty(out_features * in_features, dtype=torch.int8)
    column_sums = torch.empty(out_features, dtype=torch.int32)
    if library.int8_gemm_pack(quantized.data_ptr(), out_features, in_features, tiles.data_ptr(),
                              column_sums.data_ptr()) != 0:
        return None
    return PackedInt8(tiles, column_sums, scales.float().contiguous(), in_features, out_features)


def multiply(activation: torch.Tensor, scale: float, zero_point: int, weight: PackedInt8,
             bias: torch.Tensor | None, output_dtype: torch.dtype, gelu: bool = False,
             backend: str | None = None) -> torch.Tensor | None:
    """``scale * weight.scales * ((activation - zero_point) @ W^T) + bias`` for a (rows, in) uint8 activation,
    as (rows, out) ``output_dtype`` (float32 or bfloat16), with ``gelu`` the erf GELU of that (to ~1.5e-7, in
    float32 before the output is rounded); None when the kernel does not take it (the caller then runs oneDNN).
    ``backend``: "amx" or "vnni" (default: the fastest this CPU runs); None when that one does not run here."""
    library = _library()
    offered = backends()
    backend = backend or (offered[0] if offered else None)
    rows = activation.shape[0]
    if (library is None or backend not in offered or activation.dim() != 2 or rows < 1
            or (backend == "amx" and rows > MAX_ROWS)
            or activation.dtype != torch.uint8 or activation.shape[1] != weight.in_features
            or output_dtype not in (torch.float32, torch.bfloat16)):
        return None
    activation = activation.contiguous()
    if bias is not None:
        bias = bias.float().contiguous()
    out = torch.empty(rows, weight.out_features, dtype=output_dtype)
    entry = library.int8_gemm_amx if backend == "amx" else library.int8_gemm_vnni
    status = entry(
        activation.data_ptr(), rows, weight.in_features, weight.tiles.data_ptr(), weight.out_features,
        weight.column_sums.data_ptr(), weight.scales.data_ptr(), None if bias is None else bias.data_ptr(),
        scale, zero_point, int(gelu), out.data_ptr(), int(output_dtype == torch.bfloat16), torch.get_num_threads())
    if status == -2:
        raise MemoryError("the int8 GEMM could not allocate its scratch buffer")
    return out if status == 0 else None
