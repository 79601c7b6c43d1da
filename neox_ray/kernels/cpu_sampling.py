"""Builds, loads and calls the CPU sampling kernel (``cpu_sampling.c``): temperature, top-k, top-p, min-p
and the draw for all sampled rows of a step in one call.

Why a kernel: sampling a 50k vocabulary in torch is a dozen passes over it per step (softmax, the top-p
search, masks, the cumulative sum of the draw), each a separate op with its own dispatch and
allocation; the kernel makes four to five passes per row, from cache, on torch's threads. Semantics are
those of :func:`neox_ray.engine.sampler.filtered_probs` and its inverse-CDF draw, except that tokens tied
with top-k's or top-p's last kept token are all kept (torch's ``topk`` keeps an arbitrary one of them).

It also has the greedy rows' argmax and scoring's log-sum-exp, for the same reason.

Built at first use by :mod:`neox_ray.kernels.build`; when it cannot be, :func:`available` is False and
the sampler uses its torch path. This module checks arguments; :mod:`neox_ray.engine.sampler` decides
which rows come here and with which uniforms.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from neox_ray.kernels.build import Signature, load_library

SOURCE = Path(__file__).with_name("cpu_sampling.c")
_INT64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ROWS = [_PTR, _INT64, _INT64, _INT64, _PTR, ctypes.c_int]  # logits, row stride, rows, vocab, out, threads
_SIGNATURES: dict[str, Signature] = {
    "sample_rows_f32": ([_PTR, _INT64, _INT64, _INT64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, ctypes.c_int],
                        ctypes.c_int),
    "argmax_rows_f32": (_ROWS, None),
    "logsumexp_rows_f32": (_ROWS, None),
}


@functools.cache
def _library() -> ctypes.CDLL | None:
    # 512-bit vectors: the exp and threshold passes run ~10 % faster per row here than with gcc's 256-bit default
    return load_library(SOURCE, "CPU sampling kernel", "the torch sampler (slower)", _SIGNATURES,
                        extra_flags=("-mprefer-vector-width=512",))


def available() -> bool:
    """Whether :func:`sample` can run here (builds the kernel if needed)."""
    return _library() is not None


def applies(logits: torch.Tensor) -> bool:
    """Whether these logits can go through the kernel: float32 on the CPU, and the kernel built."""
    return logits.device.type == "cpu" and logits.dtype == torch.float32 and available()


def _checked_logits(logits: torch.Tensor) -> torch.Tensor:
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 2:
        raise ValueError("the CPU sampling kernel takes (rows, vocab) float32 logits on the CPU")
    return logits if logits.stride(1) == 1 else logits.contiguous()


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """(rows, vocab) float32 CPU logits -> (rows,) int64: what ``logits.argmax(dim=-1)`` returns (first
    index on ties, first NaN if any), in one vectorised pass per row (torch's takes several times longer
    on a 50k vocabulary)."""
    library = _library()
    if library is None:
        raise RuntimeError("the CPU sampling kernel is not available")
    logits = _checked_logits(logits)
    tokens = torch.empty(logits.shape[0], dtype=torch.int64)
    if logits.shape[0] and logits.shape[1]:
        library.argmax_rows_f32(logits.data_ptr(), logits.stride(0), logits.shape[0], logits.shape[1],
                                tokens.data_ptr(), torch.get_num_threads())
    return tokens


def logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """(rows, vocab) float32 CPU logits -> (rows,) float32 ``logits.logsumexp(dim=-1)``: a token's logprob
    is its logit minus this, with no (rows, vocab) log-softmax written (scoring's per-position logprobs)."""
    library = _library()
    if library is None:
        raise RuntimeError("the CPU sampling kernel is not available")
    logits = _checked_logits(logits)
    out = torch.empty(logits.shape[0], dtype=torch.float32)
    if logits.shape[0]:
        library.logsumexp_rows_f32(logits.data_ptr(), logits.stride(0), logits.shape[0], logits.shape[1],
                                   out.data_ptr(), torch.get_num_threads())
    return out


def sample(logits: torch.Tensor, temperatures: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """logits: (rows, vocab) float32 on CPU, rows may be strided; temperatures, top_p, min_p: (rows,)
    float32 (temperature > 0); top_k: (rows,) int64, 0 or >= vocab for none; uniforms: (rows,) float64 in
    (0, 1). Returns (rows,) int64 tokens."""
    library = _library()
    if library is None:
        raise RuntimeError("the CPU sampling kernel is not available")
    logits = _checked_logits(logits)
    rows = logits.shape[0]
    columns = (temperatures.to(torch.float32), top_k.to(torch.int64), top_p.to(torch.float32),
               min_p.to(torch.float32), uniforms.to(torch.float64))
    temperatures, top_k, top_p, min_p, uniforms = (c.contiguous() for c in columns)
    if any(c.shape != (rows,) for c in (temperatures, top_k, top_p, min_p, uniforms)):
        raise ValueError("every per-row parameter needs one value per row of logits")
    tokens = torch.empty(rows, dtype=torch.int64)
    if rows == 0:
        return tokens
    status = library.sample_rows_f32(
        logits.data_ptr(), logits.stride(0), rows, logits.shape[1], temperatures.data_ptr(), top_k.data_ptr(),
        top_p.data_ptr(), min_p.data_ptr(), uniforms.data_ptr(), tokens.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise MemoryError("the CPU sampling kernel could not allocate its scratch buffers")
    return tokens
