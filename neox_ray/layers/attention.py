"""Causal attention over a flattened, padding-free batch with a paged KV cache: one call site, three backends.

A step's batch is S sequences packed into T tokens. :class:`AttentionMetadata` says where each sequence's
new tokens sit (``query_start_loc``), how long its context is after this step (``context_lens``), which
cache slots the new keys/values go to (``slot_mapping``) and which cache blocks hold its context
(``block_tables``). The cache itself is one preallocated tensor per layer of shape
``(2, num_blocks, block_size, heads, head_dim)``, handed to each :class:`Attention` by the model runner.
It holds the model's dtype, or int8 (``kv_cache_dtype="int8"``, CPU): then each (slot, head) row of keys or
values is stored as int8 with one float32 scale, in ``kv_scales`` of shape ``(2, num_blocks, block_size,
heads)`` (:func:`quantize_kv_rows`); the C decode kernel reads it as it is, the torch paths dequantize what
they read.

Backends:
- ``sdpa``: torch's scaled_dot_product_attention (default on CPU; uses flash/memory-efficient kernels on GPU).
- ``flash_attn``: the flash-attn package (varlen prefill, paged decode through ``block_table``), when it
  imports and the block size is a multiple of 256 (flash-attn's paged-KV requirement).
- ``eager``: plain matmul + softmax in float32, the reference the other two are tested against.

Prefill sequences (query length > 1) are attended one by one. Decode sequences (query length 1) take one
of three paths, chosen by the model runner:
- ``kernel`` (CPU default): one call per layer to the C paged-attention kernel
  (:mod:`neox_ray.kernels.cpu_paged_attention`), every sequence and head, reading the cache in place;
- ``views`` (CPU without a C compiler): each sequence reads its consecutive cache blocks in place as
  views, one SDPA call per sequence (CPU attention is memory-bound, so a gather would cost more);
- ``grouped`` (GPU without flash-attn): sequences of similar length gathered into padded batches, one
  SDPA call each.
What this module leaves to others: which tokens are in the batch (scheduler), which blocks a sequence
owns (block manager), and building the metadata tensors (model runner).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from neox_ray.kernels import cpu_paged_attention

try:  # optional GPU extra; absent on CPU machines
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
    FLASH_ATTN_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_varlen_func = flash_attn_with_kvcache = None
    FLASH_ATTN_AVAILABLE = False

BACKENDS = ("sdpa", "flash_attn", "eager")
FLASH_BLOCK_MULTIPLE = 256


def resolve_backend(requested: str, device: torch.device, block_size: int) -> str:
    """``auto`` -> flash_attn on CUDA when usable, else sdpa. An explicit unusable choice is an error."""
    if requested == "auto":
        usable = FLASH_ATTN_AVAILABLE and device.type == "cuda" and block_size % FLASH_BLOCK_MULTIPLE == 0
        return "flash_attn" if usable else "sdpa"
    if requested not in BACKENDS:
        raise ValueError(f"attention_backend must be one of auto, {', '.join(BACKENDS)}; got {requested!r}")
    if requested == "flash_attn":
        if not FLASH_ATTN_AVAILABLE:
            raise ValueError("attention_backend='flash_attn' but the flash-attn package is not installed "
                             "(pip install 'neox-ray[gpu]')")
        if device.type != "cuda":
            raise ValueError("attention_backend='flash_attn' needs a CUDA device")
        if block_size % FLASH_BLOCK_MULTIPLE:
            raise ValueError(f"attention_backend='flash_attn' needs block_size to be a multiple of "
                             f"{FLASH_BLOCK_MULTIPLE} (flash-attn's paged KV cache), got {block_size}")
    return requested


@dataclass
class AttentionMetadata:
    """One step's packed batch. Python lists are host-side bookkeeping; tensors live on the model's device."""

    query_start_loc: list[int]            # (S + 1,) token offsets of each sequence's new tokens
    context_lens: list[int]               # (S,) cached + new tokens of each sequence after this step
    slot_mapping: torch.Tensor | None     # (T,) int64 cache slot (block * block_size + offset) per new token
    block_tables: torch.Tensor | None     # (S, max_blocks) int64, padded with 0
    prefill_seqs: list[int] = field(init=False)
    decode_seqs: list[int] = field(init=False)
    decode_token_index: torch.Tensor | None = field(init=False, default=None)
    decode_context_lens: torch.Tensor | None = field(init=False, default=None)
    decode_path: str = field(init=False, default="views")
    decode_block_tables: torch.Tensor | None = field(init=False, default=None)  # kernel path: (decodes, blocks)
    decode_tables_checked: bool = field(init=False, default=False)  # kernel path: checked against the cache
    slots_checked: bool = field(init=False, default=False)  # slot_mapping checked against the cache (C store)
    decode_groups: list[DecodeGroup] = field(init=False, default_factory=list)
    # CPU path: per decode sequence, its context as runs of consecutive cache slots (start, length).
    decode_runs: list[list[tuple[int, int]]] | None = field(init=False, default=None)
    token_sequence_lens: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        query_lens = [b - a for a, b in itertools.pairwise(self.query_start_loc)]
        self.prefill_seqs = [i for i, n in enumerate(query_lens) if n > 1]
        self.decode_seqs = [i for i, n in enumerate(query_lens) if n == 1]

    def to(self, device: torch.device, block_size: int | None = None, decode_path: str = "auto",
           num_cache_blocks: int | None = None) -> AttentionMetadata:
        """Builds the derived index tensors once per step, on the model's device (shared by all layers).
        ``decode_path``: ``kernel`` (the C paged kernel: best on CPU), ``views`` (per sequence, reading
        consecutive blocks in place), ``grouped`` (length-sorted groups gathered into padded batches: best
        on GPU without flash-attn); ``auto``: ``views`` on CPU, ``grouped`` elsewhere. ``num_cache_blocks``: the
        KV cache's size, against which the block tables (kernel path) and slots are checked once for all layers."""
        if (device.type == "cpu" and self.slot_mapping is not None and num_cache_blocks is not None
                and block_size is not None):  # the C store is CPU-only (and a GPU check would sync every step)
            cpu_paged_attention.check_slots(self.slot_mapping, num_cache_blocks * block_size)
            self.slots_checked = True
        if self.decode_seqs:
            self.decode_token_index = torch.tensor([self.query_start_loc[i] for i in self.decode_seqs],
                                                   dtype=torch.long, device=device)
            self.decode_context_lens = torch.tensor([self.context_lens[i] for i in self.decode_seqs],
                                                    dtype=torch.long, device=device)
            if block_size is None or self.block_tables is None:
                raise ValueError("decode sequences need block tables and the cache's block_size")
            if decode_path == "auto":
                decode_path = "views" if device.type == "cpu" else "grouped"
            if decode_path not in ("kernel", "views", "grouped"):
                raise ValueError(f"decode_path must be kernel, views, grouped or auto; got {decode_path!r}")
            self.decode_path = decode_path
            if decode_path == "kernel":
                all_decode = len(self.decode_seqs) == len(self.context_lens)
                self.decode_block_tables = self.block_tables if all_decode else self.block_tables[self.decode_seqs]
                if num_cache_blocks is not None:  # checked once per step here, not by every layer's call
                    cpu_paged_attention.check_tables(self.decode_block_tables, self.decode_context_lens,
                                                     block_size, num_cache_blocks)
                    self.decode_tables_checked = True
            elif decode_path == "views":
                tables = self.block_tables.tolist()  # one host copy per step, not one per sequence
                self.decode_runs = [_slot_runs(tables[i], self.context_lens[i], block_size) for i in self.decode_seqs]
            else:
                self.decode_groups = _group_decodes(self, block_size, device)
        lens = [self.context_lens[i] for i in range(len(self.context_lens))
                for _ in range(self.query_start_loc[i + 1] - self.query_start_loc[i])]
        self.token_sequence_lens = torch.tensor(lens, dtype=torch.long, device=device)
        return self

    @classmethod
    def for_plain_forward(cls, seq_lens: list[int], device: torch.device) -> AttentionMetadata:
        """A batch of whole sequences attended without any cache (used by tests and reference forwards)."""
        starts = [0]
        for n in seq_lens:
            starts.append(starts[-1] + n)
        meta = cls(query_start_loc=starts, context_lens=list(seq_lens), slot_mapping=None, block_tables=None)
        meta.prefill_seqs = list(range(len(seq_lens)))  # length-1 sequences too: there is no cache to read
        meta.decode_seqs = []
        return meta.to(device)


class Attention(nn.Module):
    """Writes this step's keys/values into the paged cache, then attends each query to its context."""

    def __init__(self, num_heads: int, head_dim: int, backend: str = "sdpa"):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.scale = 1.0 / math.sqrt(head_dim)
        self.backend = backend
        self.kv_cache: torch.Tensor | None = None  # (2, num_blocks, block_size, heads, head_dim), set by the runner
        self.kv_scales: torch.Tensor | None = None  # int8 cache only: (2, num_blocks, block_size, heads) float32

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """query/key/value: (tokens, heads, head_dim) -> (tokens, heads, head_dim)."""
        if self.kv_cache is not None and meta.slot_mapping is not None:
            self._store(key, value, meta)
        if self.backend == "flash_attn":
            return self._flash_attn(query, key, value, meta)
        with_kernel = meta.decode_path == "kernel" and bool(meta.decode_seqs)
        if with_kernel and not meta.prefill_seqs:  # the usual decode step: no gather, no scatter
            return self._decode_with_kernel(query, meta)
        output = torch.empty_like(query)
        for i in meta.prefill_seqs:
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            context_len = meta.context_lens[i]
            if context_len == end - start:  # nothing cached before this step: attend to the new tokens
                k, v, mask = key[start:end], value[start:end], None
            else:
                assert meta.block_tables is not None  # AttentionMetadata.to() requires them for cached context
                k, v = self._gather_context(meta.block_tables[i], context_len, query.dtype)
                mask = _causal_mask_with_offset(end - start, context_len, query.device)
            output[start:end] = self._attend(query[start:end].unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                             mask, causal=mask is None)[0]
        if with_kernel:
            output[meta.decode_token_index] = self._decode_with_kernel(query[meta.decode_token_index], meta)
        if meta.decode_runs is not None:
            self._decode_from_views(query, meta, output)
        for group in meta.decode_groups:
            # Gather each group's context blocks into (B, blocks * block_size, heads, dim); groups hold
            # sequences of similar length so little of the gather is padding.
            kv = self._cache()[:, group.block_tables].flatten(2, 3)
            if self.kv_scales is not None:
                kv = dequantize_kv(kv, self.kv_scales[:, group.block_tables].flatten(2, 3).unsqueeze(-1), query.dtype)
            out = self._attend(query[group.token_index].unsqueeze(1), kv[0], kv[1], group.mask, causal=False)
            output[group.token_index] = out[:, 0]
        return output

    def _store(self, key: torch.Tensor, value: torch.Tensor, meta: AttentionMetadata) -> None:
        """Writes this step's keys and values to their slots (quantized first for an int8 cache)."""
        assert self.kv_cache is not None and meta.slot_mapping is not None
        key_cache, value_cache = self.kv_cache[0], self.kv_cache[1]
        slots = meta.slot_mapping
        if self.kv_scales is None:
            if meta.slots_checked and cpu_paged_attention.store_kv(key, value, key_cache, value_cache, slots):
                return
            key_cache.view(-1, self.num_heads, self.head_dim).index_copy_(0, slots, key)
            value_cache.view(-1, self.num_heads, self.head_dim).index_copy_(0, slots, value)
            return
        key_scales, value_scales = self.kv_scales[0], self.kv_scales[1]
        if meta.slots_checked and cpu_paged_attention.store_kv_int8(key, value, key_cache, value_cache, key_scales,
                                                                    value_scales, slots):
            return
        for rows, cache, scales in ((key, key_cache, key_scales), (value, value_cache, value_scales)):
            quantized, row_scales = quantize_kv_rows(rows)
            cache.view(-1, self.num_heads, self.head_dim).index_copy_(0, slots, quantized)
            scales.view(-1, self.num_heads).index_copy_(0, slots, row_scales)

    def _decode_with_kernel(self, queries: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The decode sequences' queries (one row each, in ``meta.decode_seqs`` order) through the C kernel."""
        assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
        cache, scales = self._cache(), self.kv_scales
        return cpu_paged_attention.decode_attention(queries, cache[0], cache[1], meta.decode_block_tables,
                                                    meta.decode_context_lens, self.scale,
                                                    tables_checked=meta.decode_tables_checked,
                                                    key_scales=None if scales is None else scales[0],
                                                    value_scales=None if scales is None else scales[1])

    def _cache(self) -> torch.Tensor:
        """The paged KV cache; reading cached context before the model runner allocated it is a bug."""
        if self.kv_cache is None:
            raise RuntimeError("attention reads cached context but no KV cache is allocated")
        return self.kv_cache

    def _decode_from_views(self, query: torch.Tensor, meta: AttentionMetadata, output: torch.Tensor) -> None:
        """CPU decode: each sequence attends to its cache slots read as views (no gather) when its blocks
        are consecutive, which the block manager arranges; otherwise only its own runs are concatenated.
        Memory-bound on CPU, so avoiding the padded gather is what matters."""
        # (heads, slots, head_dim) views of the whole cache: a sequence's context is a slice of them.
        cache = self._cache()
        keys = cache[0].view(-1, self.num_heads, self.head_dim).transpose(0, 1)
        values = cache[1].view(-1, self.num_heads, self.head_dim).transpose(0, 1)
        # int8 cache: (heads, slots, 1) scales beside the (heads, slots, head_dim) values
        key_scales = value_scales = None
        if self.kv_scales is not None:
            key_scales = self.kv_scales[0].view(-1, self.num_heads).transpose(0, 1).unsqueeze(2)
            value_scales = self.kv_scales[1].view(-1, self.num_heads).transpose(0, 1).unsqueeze(2)
        queries = query.unsqueeze(2)  # (tokens, heads, 1, head_dim)
        outputs = []
        rows = [meta.query_start_loc[i] for i in meta.decode_seqs]
        assert meta.decode_runs is not None
        for row, runs in zip(rows, meta.decode_runs, strict=True):
            k, v = _read_runs(keys, runs), _read_runs(values, runs)
            if key_scales is not None and value_scales is not None:
                k = dequantize_kv(k, _read_runs(key_scales, runs), query.dtype)
                v = dequantize_kv(v, _read_runs(value_scales, runs), query.dtype)
            if self.backend == "eager":
                outputs.append(self._attend(queries[row].transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                            v.transpose(0, 1).unsqueeze(0), None, causal=False)[0].transpose(0, 1))
            else:
                # 4-D inputs: torch's CPU flash kernel (3-D ones fall back to the slower math path).
                outputs.append(F.scaled_dot_product_attention(queries[row].unsqueeze(0), k.unsqueeze(0),
                                                              v.unsqueeze(0), scale=self.scale)[0])
        output[meta.decode_token_index] = torch.stack(outputs)[:, :, 0]

    def _gather_context(self, block_table: torch.Tensor, context_len: int,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self._cache()
        block_size = cache.shape[2]
        blocks = block_table[: -(-context_len // block_size)]
        k = cache[0][blocks].flatten(0, 1)[:context_len]
        v = cache[1][blocks].flatten(0, 1)[:context_len]
        if self.kv_scales is not None:
            k = dequantize_kv(k, self.kv_scales[0][blocks].flatten(0, 1)[:context_len].unsqueeze(-1), dtype)
            v = dequantize_kv(v, self.kv_scales[1][blocks].flatten(0, 1)[:context_len].unsqueeze(-1), dtype)
        return k, v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                causal: bool) -> torch.Tensor:
        """q: (B, Lq, H, D); k, v: (B, Lk, H, D); mask broadcastable to (B, H, Lq, Lk), True = attend."""
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.backend == "eager":
            scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.scale
            if causal:
                mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            out = torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale)
        return out.transpose(1, 2)

    def _flash_attn(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    meta: AttentionMetadata) -> torch.Tensor:  # pragma: no cover - needs CUDA + flash-attn
        output = torch.empty_like(query)
        key_cache, value_cache = self._cache()[0], self._cache()[1]
        for i in meta.prefill_seqs:
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            if meta.context_lens[i] == end - start:
                cu = torch.tensor([0, end - start], dtype=torch.int32, device=query.device)
                output[start:end] = flash_attn_varlen_func(
                    query[start:end], key[start:end], value[start:end], cu, cu, end - start, end - start,
                    softmax_scale=self.scale, causal=True)
            else:  # chunked prefill or a prefix-cache hit: read the earlier context from the paged cache
                assert meta.block_tables is not None
                output[start:end] = flash_attn_with_kvcache(
                    query[start:end].unsqueeze(0), key_cache, value_cache,
                    cache_seqlens=torch.tensor([meta.context_lens[i]], dtype=torch.int32, device=query.device),
                    block_table=meta.block_tables[i: i + 1].to(torch.int32), softmax_scale=self.scale,
                    causal=True)[0]
        if meta.decode_seqs:
            assert meta.block_tables is not None and meta.decode_context_lens is not None
            index = meta.decode_token_index
            output[index] = flash_attn_with_kvcache(
                query[index].unsqueeze(1), key_cache, value_cache,
                cache_seqlens=meta.decode_context_lens.to(torch.int32),
                block_table=meta.block_tables[meta.decode_seqs].to(torch.int32),
                softmax_scale=self.scale, causal=True)[:, 0]
        return output


def quantize_kv_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., head_dim) keys or values -> int8 values and (...) float32 scales, one per row: round(x * 127 /
    max|x|), scale max|x| / 127 (0 for an all-zero row). The C store does the same float32 operations."""
    rows = rows.float()
    largest = rows.abs().amax(dim=-1)
    # A tensor-by-tensor division, correctly rounded as C's: ``127.0 / largest`` is a reciprocal times 127 in torch.
    inverse = torch.where(largest > 0, torch.full_like(largest, 127.0) / largest, torch.zeros_like(largest))
    values = torch.round(rows * inverse.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return values, largest / 127.0


def dequantize_kv(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 cache rows times their scales (broadcast over head_dim), in ``dtype``."""
    return (values.float() * scales).to(dtype)


def _causal_mask_with_offset(query_len: int, context_len: int, device: torch.device) -> torch.Tensor:
    """(Lq, Lk) bool: the j-th new token sits at position context_len - query_len + j."""
    query_positions = torch.arange(context_len - query_len, context_len, device=device)
    return torch.arange(context_len, device=device).unsqueeze(0) <= query_positions.unsqueeze(1)


@dataclass
class DecodeGroup:
    token_index: torch.Tensor    # (B,) rows of the packed batch
    block_tables: torch.Tensor   # (B, blocks) the group's tables, cut to its longest context
    mask: torch.Tensor           # (B, 1, 1, blocks * block_size) True where a key is in the context


DECODE_GROUP_MAX_SEQS = 32


def _group_decodes(meta: AttentionMetadata, block_size: int, device: torch.device) -> list[DecodeGroup]:
    """Sorts decode sequences by context length and cuts them into groups whose longest context needs at
    most ~1.5x the blocks of the shortest, so the padded gather moves little beyond the real context."""
    assert meta.block_tables is not None  # checked by AttentionMetadata.to()
    order = sorted(meta.decode_seqs, key=lambda i: meta.context_lens[i])
    groups: list[list[int]] = []
    for i in order:
        blocks = -(-meta.context_lens[i] // block_size)
        if groups:
            first_blocks = -(-meta.context_lens[groups[-1][0]] // block_size)
            if len(groups[-1]) < DECODE_GROUP_MAX_SEQS and blocks <= first_blocks * 1.5 + 1:
                groups[-1].append(i)
                continue
        groups.append([i])
    result = []
    for members in groups:
        blocks = -(-max(meta.context_lens[i] for i in members) // block_size)
        lens = torch.tensor([meta.context_lens[i] for i in members], device=device)
        positions = torch.arange(blocks * block_size, device=device)
        result.append(DecodeGroup(
            token_index=torch.tensor([meta.query_start_loc[i] for i in members], dtype=torch.long, device=device),
            block_tables=meta.block_tables[members, :blocks],
            mask=(positions.unsqueeze(0) < lens.unsqueeze(1))[:, None, None, :]))
    return result


def _read_runs(slots: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
    """A sequence's context out of a (heads, slots, ...) view of the cache: a view when it is one run of slots."""
    if len(runs) == 1:
        start, length = runs[0]
        return slots[:, start:start + length]
    return torch.cat([slots[:, start:start + length] for start, length in runs], dim=1)


def _slot_runs(block_table: list[int], context_len: int, block_size: int) -> list[tuple[int, int]]:
    """The first ``context_len`` cache slots of a sequence as runs of consecutive slots."""
    runs: list[tuple[int, int]] = []
    for block in block_table[: -(-context_len // block_size)]:
        start = block * block_size
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + block_size)
        else:
            runs.append((start, block_size))
    overshoot = sum(length for _, length in runs) - context_len
    runs[-1] = (runs[-1][0], runs[-1][1] - overshoot)
    return runs
