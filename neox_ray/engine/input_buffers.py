"""The runner's persistent step inputs: each live sequence's block table, updated incrementally.

A :class:`SequenceStep` carries only the block ids appended since the runner last saw the sequence
(``new_block_ids`` from ``block_table_start``), and :class:`StepInput` names the sequences that ended
(``released_seq_ids``), so a table is sent once, not every step: what vLLM's persistent batch does, and
what keeps the pickled step small for the ranks of a shard group. :meth:`InputBuffers.prepare` packs a
step's token ids, positions, cache slots and block tables into host tensors.

Host tensors only: the runner moves them to its device. What to run, and the block ids themselves, are
the scheduler's; the attention metadata built from these is the layer's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neox_ray.engine.step import StepInput


@dataclass
class StepArrays:
    """One step's packed inputs (host tensors)."""
    input_ids: torch.Tensor        # (T,) int64
    positions: torch.Tensor        # (T,) int64
    slot_mapping: torch.Tensor     # (T,) int64
    block_tables: torch.Tensor     # (S, max_blocks) int64, rows padded with 0
    query_start_loc: list[int]     # (S + 1,)
    context_lens: list[int]        # (S,)


class InputBuffers:
    """Each live sequence's block table, kept across steps and updated from increments, and the packing
    of a step's tokens, positions, slots and tables into tensors."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.tables: dict[int, list[int]] = {}

    def release(self, seq_ids: list[int]) -> None:
        """Drops the tables of sequences that ended (unknown ids are ignored: a release may be repeated)."""
        for seq_id in seq_ids:
            self.tables.pop(seq_id, None)

    def update_table(self, seq_id: int, start: int, new_block_ids: list[int]) -> list[int]:
        """Writes ``new_block_ids`` from index ``start`` of the sequence's table, dropping what followed
        (``start`` 0 after a preemption: the table starts over). Idempotent: a step rerun writes the same
        ids again. Returns the table."""
        table = self.tables.setdefault(seq_id, [])
        if start > len(table):
            raise ValueError(f"sequence {seq_id}: block table update starts at {start} but the runner knows "
                             f"{len(table)} blocks")
        del table[start:]
        table.extend(new_block_ids)
        return table

    def prepare(self, step: StepInput) -> StepArrays:
        """Applies the step's table updates and packs its inputs. Plain lists into one ``torch.tensor`` each:
        at a few dozen sequences a step, numpy's per-call cost (with the caches cold after the forward pass)
        was higher than the Python loop's."""
        self.release(step.released_seq_ids)
        block_size = self.block_size
        sequences = step.sequences
        tables = [self.update_table(s.seq_id, s.block_table_start, s.new_block_ids)
                  if s.new_block_ids or s.seq_id not in self.tables else self.tables[s.seq_id] for s in sequences]
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        context_lens = []
        for seq, table in zip(sequences, tables, strict=True):
            n = len(seq.new_token_ids)
            end = seq.start_position + n
            if end > len(table) * block_size:
                raise ValueError(f"sequence {seq.seq_id}: position {end - 1} has no block in its table of "
                                 f"{len(table)}")
            span = range(seq.start_position, end)
            token_ids.extend(seq.new_token_ids)
            positions.extend(span)
            slots.extend([table[p // block_size] * block_size + p % block_size for p in span])
            query_start_loc.append(query_start_loc[-1] + n)
            context_lens.append(end)
        width = max((len(t) for t in tables), default=0)
        padded = [t if len(t) == width else t + [0] * (width - len(t)) for t in tables]
        return StepArrays(
            input_ids=torch.tensor(token_ids, dtype=torch.long), positions=torch.tensor(positions, dtype=torch.long),
            slot_mapping=torch.tensor(slots, dtype=torch.long), block_tables=torch.tensor(padded, dtype=torch.long),
            query_start_loc=query_start_loc, context_lens=context_lens)
