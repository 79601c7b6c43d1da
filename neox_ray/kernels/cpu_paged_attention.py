"""Builds, loads and calls the CPU paged decode-attention kernel (``cpu_paged_attention.c``).

Why a kernel: on CPU, decode attention is memory-bound, and torch offers no paged attention, so the
alternatives are one SDPA call per sequence (dispatch overhead x sequences x layers, reading keys with a
head stride) or gathering every context into a padded batch first (moving the whole cache twice). The
kernel does every sequence and head of a layer in one call, reading each cached row once, in place.

The C file is compiled at first use by :mod:`neox_ray.kernels.build`. When that is not possible (no
compiler, a failed build, an unwritable cache, ``NEOX_RAY_CPU_KERNELS=0``), :func:`available` is False and
attention falls back to SDPA (same results, slower).

This module knows nothing of the model: :mod:`neox_ray.layers.attention` decides when to call it.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from neox_ray.kernels.build import Signature, find_compiler, load_library

SOURCE = Path(__file__).with_name("cpu_paged_attention.c")
# (query dtype, cache dtype) -> decode function; an int8 cache comes with float32 scales per (slot, head).
_FUNCTIONS = {(torch.float32, torch.float32): "decode_attention_f32",
              (torch.bfloat16, torch.bfloat16): "decode_attention_bf16",
              (torch.float32, torch.int8): "decode_attention_f32_i8cache",
              (torch.bfloat16, torch.int8): "decode_attention_bf16_i8cache"}
_STORE_INT8_FUNCTIONS = {torch.float32: "store_kv_int8_f32", torch.bfloat16: "store_kv_int8_bf16"}
_INT64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = [_PTR, _INT64, _PTR, _PTR, _PTR, _PTR, _PTR, _INT64, _PTR, _INT64, _INT64, _INT64, _INT64,
             ctypes.c_float, _PTR, _INT64, _INT64, ctypes.c_int]


_compiler = find_compiler  # kept under this name for tests that ask whether a build is attempted


_STORE_ARGTYPES = [_PTR, _PTR, _PTR, _PTR, _PTR, _INT64, _INT64]
_STORE_INT8_ARGTYPES = [_PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _INT64, _INT64, _INT64, ctypes.c_int]


@functools.cache
def _library() -> ctypes.CDLL | None:
    signatures: dict[str, Signature] = {name: (_ARGTYPES, ctypes.c_int) for name in _FUNCTIONS.values()}
    signatures["store_kv"] = (_STORE_ARGTYPES, None)
    signatures.update({name: (_STORE_INT8_ARGTYPES, None) for name in _STORE_INT8_FUNCTIONS.values()})
    return load_library(SOURCE, "CPU attention kernel", "torch SDPA per sequence (slower)", signatures)


def available(dtype: torch.dtype, cache_dtype: torch.dtype | None = None) -> bool:
    """Whether :func:`decode_attention` can run for ``dtype`` queries over a cache of ``cache_dtype`` (default
    ``dtype``; or int8), building the kernel if needed."""
    return (dtype, cache_dtype or dtype) in _FUNCTIONS and _library() is not None


def _outside(indices: torch.Tensor, size: int) -> bool:
    """Whether any index is not in [0, size)."""
    return bool(indices.numel()) and (int(indices.max()) >= size or int(indices.min()) < 0)


def check_slots(slot_mapping: torch.Tensor, num_slots: int) -> None:
    """Raises ValueError unless every slot of ``slot_mapping`` is inside a cache of ``num_slots`` slots."""
    if _outside(slot_mapping, num_slots):
        raise ValueError("a slot mapping names a slot outside the cache")


def store_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> bool:
    """Writes key/value (tokens, heads, head_dim) into the caches' slots (slot = block * block_size + offset)
    in one C call; the caller checked the slots with :func:`check_slots`. Returns False (nothing written)
    when the kernel cannot do it (unavailable, or tensors not contiguous CPU tensors of the cache's dtype)."""
    library = _library()
    tensors = (key, value, key_cache, value_cache)
    if (library is None or slot_mapping.dtype != torch.int64 or not slot_mapping.is_contiguous()
            or any(t.device.type != "cpu" or not t.is_contiguous() or t.dtype != key_cache.dtype for t in tensors)
            or key.shape != value.shape or key.shape[1:] != key_cache.shape[2:]
            or key.shape[0] != slot_mapping.numel()):
        return False
    row_bytes = key.shape[1] * key.shape[2] * key.element_size()
    library.store_kv(key.data_ptr(), value.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
                     slot_mapping.data_ptr(), key.shape[0], row_bytes)
    return True


def store_kv_int8(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  key_scales: torch.Tensor, value_scales: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
    """:func:`store_kv` for an int8 cache: each (token, head) row quantized with its own scale (written to
    ``key_scales`` / ``value_scales``, (num_blocks, block_size, heads) float32). Returns False (nothing written)
    when the kernel cannot do it; the caller then quantizes with torch (the same bytes)."""
    library = _library()
    caches = (key_cache, value_cache, key_scales, value_scales)
    if (library is None or key.dtype not in _STORE_INT8_FUNCTIONS or slot_mapping.dtype != torch.int64
            or not slot_mapping.is_contiguous()
            or any(t.device.type != "cpu" or not t.is_contiguous() for t in (key, value, *caches))
            or value.dtype != key.dtype or key_cache.dtype != torch.int8 or value_cache.dtype != torch.int8
            or key_scales.dtype != torch.float32 or value_scales.dtype != torch.float32
            or key.shape != value.shape or key.shape[1:] != key_cache.shape[2:]
            or key_scales.shape != key_cache.shape[:3] or value_scales.shape != key_scales.shape
            or value_cache.shape != key_cache.shape or key.shape[0] != slot_mapping.numel()):
        return False
    getattr(library, _STORE_INT8_FUNCTIONS[key.dtype])(
        key.data_ptr(), value.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(), key_scales.data_ptr(),
        value_scales.data_ptr(), slot_mapping.data_ptr(), key.shape[0], key.shape[1], key.shape[2],
        torch.get_num_threads())
    return True


def check_tables(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                 num_blocks: int | None) -> None:
    """Raises ValueError unless every context is covered by its block table and (with ``num_blocks``) every
    block id names a block of the cache: the kernel reads wherever the tables point."""
    num_seqs = block_tables.shape[0]
    if context_lens.shape != (num_seqs,):
        raise ValueError("block_tables and context_lens need one row per query")
    if num_seqs and int(context_lens.max()) > block_tables.shape[1] * block_size:
        raise ValueError("a context is longer than its block table covers")
    if num_blocks is not None and _outside(block_tables, num_blocks):
        raise ValueError("a block table names a block outside the cache")


def decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                     tables_checked: bool = False, key_scales: torch.Tensor | None = None,
                     value_scales: torch.Tensor | None = None) -> torch.Tensor:
    """query: (S, heads, head_dim), one token per sequence; key/value_cache: (num_blocks, block_size,
    heads, head_dim), contiguous, of the query's dtype or int8 (then with ``key_scales`` / ``value_scales``,
    (num_blocks, block_size, heads) float32); block_tables: (S, max_blocks) int64; context_lens: (S,) int64,
    each covered by its table. Returns (S, heads, head_dim): softmax(q k^T * scale) v over each context.
    ``tables_checked``: the caller ran :func:`check_tables` on these tables and this cache (once per step
    for every layer), so it is not repeated here."""
    library = _library()
    function = _FUNCTIONS.get((query.dtype, key_cache.dtype))
    if library is None or function is None:
        raise RuntimeError(f"the CPU attention kernel is not available for {query.dtype} queries over a "
                           f"{key_cache.dtype} cache")
    scaled = key_cache.dtype == torch.int8
    scale_tensors = (key_scales, value_scales) if scaled else ()
    if any(t is None for t in scale_tensors):
        raise ValueError("an int8 cache needs its key and value scales")
    if any(t.device.type != "cpu" for t in (query, key_cache, value_cache, block_tables, context_lens, *scale_tensors)
           if t is not None):
        raise ValueError("the CPU attention kernel needs every tensor on the CPU")
    num_seqs, num_heads, head_dim = query.shape
    num_blocks, block_size = key_cache.shape[:2]
    if key_cache.shape != (num_blocks, block_size, num_heads, head_dim) or value_cache.shape != key_cache.shape:
        raise ValueError(f"cache shape {tuple(key_cache.shape)} does not match the query's heads and head_dim")
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("the key and value caches must be contiguous")
    if value_cache.dtype != key_cache.dtype:
        raise ValueError("the key and value caches' dtypes differ")
    if scaled and key_scales is not None and value_scales is not None and (
            key_scales.shape != key_cache.shape[:3] or value_scales.shape != key_scales.shape
            or key_scales.dtype != torch.float32 or value_scales.dtype != torch.float32
            or not (key_scales.is_contiguous() and value_scales.is_contiguous())):
        raise ValueError("the cache's scales must be contiguous float32 tensors of shape (blocks, block_size, "
                             "heads)")
    if query.stride(2) != 1 or query.stride(1) != head_dim:
        query = query.contiguous()
    block_tables = block_tables.to(torch.int64).contiguous()
    context_lens = context_lens.to(torch.int64).contiguous()
    if block_tables.shape[0] != num_seqs:
        raise ValueError("block_tables and context_lens need one row per query")
    if not tables_checked:
        check_tables(block_tables, context_lens, block_size, num_blocks)
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=query.dtype)
    threads = torch.get_num_threads()
    # Enough (sequence, head group) items to keep every thread busy when few sequences decode.
    head_groups = min(num_heads, max(1, -(-4 * threads // max(num_seqs, 1))))
    status = getattr(library, function)(
        query.data_ptr(), query.stride(0), key_cache.data_ptr(), value_cache.data_ptr(),
        key_scales.data_ptr() if scaled and key_scales is not None else None,
        value_scales.data_ptr() if scaled and value_scales is not None else None,
        block_tables.data_ptr(), block_tables.stride(0), context_lens.data_ptr(),
        num_seqs, num_heads, head_dim, block_size, float(scale), out.data_ptr(), out.stride(0), head_groups,
        threads)
    if status != 0:
        raise MemoryError("the CPU attention kernel could not allocate its scratch buffers")
    return out
