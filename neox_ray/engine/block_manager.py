"""Paged KV-cache bookkeeping: fixed-size blocks, per-sequence block tables, prefix caching. Pure Python.

The cache tensor itself lives in the model runner; this module only hands out block ids.

Prefix caching: a *full* block is identified by a hash chained over every token up to its end, so equal
hashes mean equal prefixes (the token tuple is kept and compared too, so a hash collision cannot alias).
A block is published to the cache only once its keys/values have actually been computed
(:meth:`BlockManager.register_computed_blocks`), never at allocation, so a sequence admitted later can
never read a block another sequence has not filled yet. Blocks are reference counted; a freed block
keeps its hash and content and stays reusable until it is evicted (least recently freed first).

Contiguity (``prefer_contiguous``): the CPU fallback decode path (per-sequence SDPA over views, used when
the C kernel cannot be built) is far faster when a sequence's blocks are consecutive. So a new sequence
takes a run of consecutive free blocks when one exists, and *softly* reserves the free blocks after it for
the tokens it may still generate: its own growth takes the next block when free, other sequences avoid
reserved blocks while anything else is free, but take them rather than fail. Reservations never reduce capacity.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from neox_ray.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    content_hash: int | None = None
    tokens: tuple[int, ...] = ()


def chained_hash(parent_hash: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent_hash, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 prefer_contiguous: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.prefer_contiguous = prefer_contiguous
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order (oldest first). Cached-but-free blocks stay here until reused or evicted.
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.soft_reserved: dict[int, int] = {}   # free block id -> seq_id whose growth it is kept for
        self.prefix_cache_hits = 0      # blocks served from the cache
        self.prefix_cache_queries = 0   # full blocks looked up

    # ---- queries -------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _full_block_hashes(self, token_ids: list[int], num_blocks: int) -> list[tuple[int, tuple[int, ...]]]:
        hashes, parent = [], None
        for i in range(num_blocks):
            tokens = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            parent = chained_hash(parent, tokens)
            hashes.append((parent, tokens))
        return hashes

    def _cacheable_blocks(self, seq: Sequence) -> int:
        """Leading full blocks that may come from the cache. At least one token is left to compute (its
        logits are needed to continue), and a logprob request computes every position from the one before
        its first target (that position's logits score it): a shared context is reused, its targets never."""
        num_tokens = seq.num_compute_tokens
        if seq.logprob_start is not None:
            num_tokens = min(num_tokens, seq.logprob_start)
        return (num_tokens - 1) // self.block_size

    def _cached_prefix(self, seq: Sequence, use_cache: bool) -> list[int]:
        """Block ids of the longest computed prefix of ``seq`` already in the cache."""
        if not (self.enable_prefix_caching and use_cache):
            return []
        num_full = self._cacheable_blocks(seq)
        hits = []
        for content_hash, tokens in self._full_block_hashes(seq.token_ids, num_full):
            block_id = self.hash_to_block.get(content_hash)
            if block_id is None or self.blocks[block_id].tokens != tokens:
                break
            hits.append(block_id)
        return hits

    # ---- allocation ----------------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, use_cache: bool = True) -> bool:
        hits = self._cached_prefix(seq, use_cache)
        hits_in_free_list = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        fresh = self.blocks_needed(seq.num_tokens) - len(hits)
        return fresh + hits_in_free_list <= self.num_free_blocks

    def allocate(self, seq: Sequence, use_cache: bool = True, lookahead_tokens: int = 0) -> None:
        """Gives ``seq`` blocks for all its current tokens, reusing cached prefix blocks; fresh blocks come
        from a consecutive free run when possible, with ``lookahead_tokens`` of room softly reserved after it."""
        assert not seq.block_table, "sequence already holds blocks"
        hits = self._cached_prefix(seq, use_cache)
        self.prefix_cache_queries += self._cacheable_blocks(seq) if use_cache else 0
        self.prefix_cache_hits += len(hits)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_blocks[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        fresh = self.blocks_needed(seq.num_tokens) - len(hits)
        lookahead = self.blocks_needed(seq.num_tokens + lookahead_tokens) - len(hits) - fresh
        run_start = self._find_free_run(fresh, fresh + lookahead) if fresh else None
        for i in range(fresh):
            seq.block_table.append(self._take_free_block(run_start + i if run_start is not None else None))
        if run_start is not None:
            for block_id in range(run_start + fresh, run_start + fresh + lookahead):
                if block_id in self.free_blocks and block_id not in self.soft_reserved:
                    self.soft_reserved[block_id] = seq.seq_id
        seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_computed_tokens = seq.num_cached_tokens
        seq.num_registered_blocks = len(hits)

    def _find_free_run(self, need: int, want: int) -> int | None:
        """Start of the first run of ``want`` (else ``need``) consecutive free, unreserved blocks, preferring
        runs that hold no cached prefix (a stretch of uncached blocks beside cached ones counts as such a run).
        None when contiguity is off or no run is long enough."""
        if not self.prefer_contiguous:
            return None
        usable = [block_id in self.free_blocks and block_id not in self.soft_reserved
                  for block_id in range(self.num_blocks)]
        uncached = [free and self.blocks[block_id].content_hash is None for block_id, free in enumerate(usable)]
        clean_runs, any_runs = _runs(uncached), _runs(usable)
        for length in (want, need):
            for runs in (clean_runs, any_runs):
                for run_start, run_length in runs:
                    if run_length >= length:
                        return run_start
        return None

    def _take_free_block(self, block_id: int | None = None) -> int:
        """Takes ``block_id`` if given and free, else the least recently freed block not reserved for
        another sequence's growth (a reserved one only when nothing else is left)."""
        if block_id is None or block_id not in self.free_blocks:
            block_id = next((b for b in self.free_blocks if b not in self.soft_reserved), None)
            if block_id is None:
                block_id = next(iter(self.free_blocks))
        del self.free_blocks[block_id]
        self.soft_reserved.pop(block_id, None)
        block = self.blocks[block_id]
        if block.content_hash is not None:  # evict its cached content
            if self.hash_to_block.get(block.content_hash) == block_id:
                del self.hash_to_block[block.content_hash]
            block.content_hash, block.tokens = None, ()
        block.ref_count = 1
        return block_id

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        extra = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return extra <= self.num_free_blocks

    def ensure_capacity(self, seq: Sequence, num_tokens: int) -> None:
        """Grows the block table to hold ``num_tokens`` tokens (callers check :meth:`can_append` first)."""
        while len(seq.block_table) < self.blocks_needed(num_tokens):
            following = seq.block_table[-1] + 1 if seq.block_table else None
            if following is not None and self.soft_reserved.get(following, seq.seq_id) != seq.seq_id:
                following = None  # kept for another sequence's growth
            seq.block_table.append(self._take_free_block(following))

    def free(self, seq: Sequence) -> None:
        # Free in reverse so a sequence's tail blocks are evicted before its (more shareable) head.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.content_hash is None:
                    self.free_blocks[block_id] = None
                    self.free_blocks.move_to_end(block_id, last=False)  # uncached blocks are reused first
                else:
                    self.free_blocks[block_id] = None
        seq.block_table = []
        seq.num_registered_blocks = 0
        self.soft_reserved = {b: owner for b, owner in self.soft_reserved.items() if owner != seq.seq_id}

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Publishes ``seq``'s newly filled full blocks to the prefix cache (call after each step)."""
        if not self.enable_prefix_caching or not seq.cache_prefix:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= seq.num_registered_blocks:
            return
        hashes = self._full_block_hashes(seq.token_ids, num_full)
        for i in range(seq.num_registered_blocks, num_full):
            content_hash, tokens = hashes[i]
            block = self.blocks[seq.block_table[i]]
            if content_hash not in self.hash_to_block:
                block.content_hash, block.tokens = content_hash, tokens
                self.hash_to_block[content_hash] = block.block_id
        seq.num_registered_blocks = num_full


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of True in ``flags``."""
    runs: list[tuple[int, int]] = []
    start: int | None = None
    for index, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            runs.append((start, index - start))
            start = None
    return runs
