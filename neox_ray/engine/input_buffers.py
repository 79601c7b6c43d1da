"""Persistent host buffers for a step's inputs, updated incrementally from one step to the next.

The runner keeps, across steps, a block table row per live sequence: a :class:`SequenceStep` carries only
the block ids appended since the runner last saw the sequence (``new_block_ids`` from ``block_table_start``),
and :class:`StepInput` names the sequences that ended (``released_seq_ids``) so their rows are reused. Token
ids, positions and cache slots are written into preallocated arrays with vectorised numpy, not built as
Python lists token by token. This is what vLLM's persistent batch does; here it also keeps the pickled
step small for the ranks of a shard group (a long sequence's table is sent once, not every step).

Host arrays only (numpy views of CPU tensors): the runner moves them to its device. What to run, and the
block ids themselves, are the scheduler's; the attention metadata built from these is the layer's.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from neox_ray.engine.step import StepInput


@dataclass
class StepArrays:
    """One step's packed inputs (host tensors; ``input_ids``, ``positions`` and ``slot_mapping`` are views of
    the persistent buffers, valid until the next :meth:`InputBuffers.prepare`)."""
    input_ids: torch.Tensor        # (T,) int64
    positions: torch.Tensor        # (T,) int64
    slot_mapping: torch.Tensor     # (T,) int64
    block_tables: torch.Tensor     # (S, max_blocks) int64, rows padded with 0
    query_start_loc: list[int]     # (S + 1,)
    context_lens: list[int]        # (S,)


def _grown(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``array`` enlarged (at least doubled along each too-small axis) to hold ``shape``, contents kept."""
    if all(have >= need for have, need in zip(array.shape, shape, strict=True)):
        return array
    new_shape = tuple(have if have >= need else max(need, 2 * have) for have, need in zip(array.shape, shape,
                                                                                        strict=True))
    grown = np.zeros(new_shape, dtype=array.dtype)
    grown[tuple(slice(0, n) for n in array.shape)] = array
    return grown


class InputBuffers:
    """Block table rows by sequence id, and token-indexed arrays reused every step (grown when a step needs
    more room than any before)."""

    def __init__(self, block_size: int, max_seqs: int = 8, max_blocks_per_seq: int = 8, max_tokens: int = 256):
        self.block_size = block_size
        self.tables = np.zeros((max_seqs, max_blocks_per_seq), dtype=np.int64)
        self.row_lens = np.zeros(max_seqs, dtype=np.int64)  # blocks known per row
        self.row_of: dict[int, int] = {}
        self.free_rows: list[int] = list(range(max_seqs - 1, -1, -1))
        self.token_ids = np.zeros(max_tokens, dtype=np.int64)
        self.positions = np.zeros(max_tokens, dtype=np.int64)
        self.slots = np.zeros(max_tokens, dtype=np.int64)

    # ---- block table rows ----------------------------------------------------------------------------
    def release(self, seq_ids: list[int]) -> None:
        """Frees the rows of sequences that ended (unknown ids are ignored: a release may be repeated)."""
        for seq_id in seq_ids:
            row = self.row_of.pop(seq_id, None)
            if row is not None:
                self.tables[row, :self.row_lens[row]] = 0
                self.row_lens[row] = 0
                self.free_rows.append(row)

    def _row(self, seq_id: int) -> int:
        row = self.row_of.get(seq_id)
        if row is None:
            if not self.free_rows:
                old = self.tables.shape[0]
                self.tables = _grown(self.tables, (old + 1, self.tables.shape[1]))
                self.row_lens = _grown(self.row_lens, (self.tables.shape[0],))
                self.free_rows = list(range(self.tables.shape[0] - 1, old - 1, -1))
            row = self.row_of[seq_id] = self.free_rows.pop()
        return row

    def update_table(self, seq_id: int, start: int, new_block_ids: list[int]) -> int:
        """Writes ``new_block_ids`` at ``start`` of the sequence's row (``start`` 0 after a preemption:
        the table starts over, and stale entries past the new end are cleared). Idempotent: a step rerun
        writes the same ids again. Returns the row."""
        row = self._row(seq_id)
        known = int(self.row_lens[row])
        if start > known:
            raise ValueError(f"sequence {seq_id}: block table update starts at {start} but the runner knows "
                             f"{known} blocks")
        end = start + len(new_block_ids)
        if end > self.tables.shape[1]:
            self.tables = _grown(self.tables, (self.tables.shape[0], end))
        self.tables[row, start:end] = new_block_ids
        if end < known and start == 0:  # a new table after preemption, shorter than the old one
            self.tables[row, end:known] = 0
            known = end
        self.row_lens[row] = max(known, end)
        return row

    # ---- one step ------------------------------------------------------------------------------------
    def prepare(self, step: StepInput) -> StepArrays:
        """Applies the step's table updates and packs its tokens, positions and slots."""
        self.release(step.released_seq_ids)
        sequences = step.sequences
        row_of = self.row_of
        rows = np.fromiter((row_of[s.seq_id] if not s.new_block_ids and s.seq_id in row_of
                            and s.block_table_start <= self.row_lens[row_of[s.seq_id]]
                            else self.update_table(s.seq_id, s.block_table_start, s.new_block_ids)
                            for s in sequences), dtype=np.int64, count=len(sequences))
        counts = np.fromiter((len(s.new_token_ids) for s in sequences), dtype=np.int64, count=len(sequences))
        first_positions = np.fromiter((s.start_position for s in sequences), dtype=np.int64, count=len(sequences))
        ends = np.cumsum(counts)
        total = int(ends[-1]) if len(ends) else 0
        if total > self.token_ids.shape[0]:
            size = (max(total, 2 * self.token_ids.shape[0]),)
            self.token_ids, self.positions, self.slots = (np.zeros(size, np.int64) for _ in range(3))
        token_ids, positions, slots = self.token_ids[:total], self.positions[:total], self.slots[:total]
        token_ids[:] = np.fromiter(itertools.chain.from_iterable(s.new_token_ids for s in sequences),
                                   dtype=np.int64, count=total)
        starts = ends - counts
        if total == len(sequences):  # every sequence feeds one token (all decodes): no repeats needed
            positions[:] = first_positions
            token_rows = rows
        else:
            positions[:] = np.arange(total) + np.repeat(first_positions - starts, counts)
            token_rows = np.repeat(rows, counts)
        block_index = positions // self.block_size
        beyond = np.nonzero(block_index >= self.row_lens[token_rows])[0]
        if len(beyond):
            seq = sequences[int(np.searchsorted(ends, beyond[0], side="right"))]
            raise ValueError(f"sequence {seq.seq_id}: position {int(positions[beyond[0]])} has no block in its "
                             f"table of {int(self.row_lens[self.row_of[seq.seq_id]])}")
        slots[:] = self.tables[token_rows, block_index] * self.block_size + positions % self.block_size
        width = int(self.row_lens[rows].max()) if len(rows) else 0
        tables = np.ascontiguousarray(self.tables[rows, :width])
        return StepArrays(
            input_ids=torch.from_numpy(token_ids), positions=torch.from_numpy(positions),
            slot_mapping=torch.from_numpy(slots), block_tables=torch.from_numpy(tables),
            query_start_loc=[0, *ends.tolist()], context_lens=(first_positions + counts).tolist())
