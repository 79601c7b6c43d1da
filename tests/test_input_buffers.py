"""Persistent input buffers: block tables kept across steps from increments, packed arrays against a
plain list-built reference, row reuse and growth, and what the engine sends (only new blocks, released ids)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from neox_ray import LLM, SamplingParams
from neox_ray.engine.input_buffers import InputBuffers
from neox_ray.engine.step import SequenceStep, StepInput, StepOutput

BLOCK = 4


def reference(steps: list[SequenceStep], tables: dict[int, list[int]]) -> dict[str, list]:
    """The arrays built the plain way, from each sequence's whole table."""
    ids, positions, slots, starts, lens = [], [], [], [0], []
    for s in steps:
        table = tables[s.seq_id]
        for k, token in enumerate(s.new_token_ids):
            p = s.start_position + k
            ids.append(token)
            positions.append(p)
            slots.append(table[p // BLOCK] * BLOCK + p % BLOCK)
        starts.append(starts[-1] + len(s.new_token_ids))
        lens.append(s.start_position + len(s.new_token_ids))
    width = max(len(tables[s.seq_id]) for s in steps)
    padded = [tables[s.seq_id] + [0] * (width - len(tables[s.seq_id])) for s in steps]
    return {"input_ids": ids, "positions": positions, "slot_mapping": slots, "block_tables": padded,
            "query_start_loc": starts, "context_lens": lens}


def packed(buffers: InputBuffers, step: StepInput) -> dict[str, list]:
    arrays = buffers.prepare(step)
    return {"input_ids": arrays.input_ids.tolist(), "positions": arrays.positions.tolist(),
            "slot_mapping": arrays.slot_mapping.tolist(), "block_tables": arrays.block_tables.tolist(),
            "query_start_loc": arrays.query_start_loc, "context_lens": arrays.context_lens}


def test_incremental_tables_match_whole_tables_over_many_steps() -> None:
    """Random sequences prefill in chunks, decode, get preempted (a new, shorter table from index 0) and end;
    every step's arrays equal the ones built from the whole tables."""
    rng = random.Random(0)
    buffers = InputBuffers(BLOCK)
    tables: dict[int, list[int]] = {}
    sent: dict[int, int] = {}
    computed: dict[int, int] = {}
    next_block, next_id = 0, 0
    released: list[int] = []
    for _ in range(200):
        if len(tables) < 6 and rng.random() < 0.4:
            tables[next_id], sent[next_id], computed[next_id] = [], 0, 0
            next_id += 1
        steps = []
        for seq_id in list(tables):
            if rng.random() < 0.05:  # preempted: blocks gone, starts over later with a fresh table
                tables[seq_id], sent[seq_id], computed[seq_id] = [], 0, 0
                continue
            if rng.random() < 0.05:
                del tables[seq_id]
                released.append(seq_id)
                continue
            n = rng.choice([1, 1, 1, 3, 7]) if computed[seq_id] else rng.randint(1, 11)
            while len(tables[seq_id]) * BLOCK < computed[seq_id] + n:
                tables[seq_id].append(next_block % 97)
                next_block += 1
            start = sent[seq_id]
            steps.append(SequenceStep(seq_id, [rng.randrange(1000) for _ in range(n)], computed[seq_id],
                                      tables[seq_id][start:], block_table_start=start))
            sent[seq_id] = len(tables[seq_id])
            computed[seq_id] += n
        if not steps:
            continue
        step = StepInput(steps, released)
        expected = reference(steps, tables)
        assert packed(buffers, step) == expected
        assert packed(buffers, step) == expected  # a rerun (failed step, bisection) writes the same
        released = []
    assert set(buffers.tables) <= set(tables) and len(buffers.tables) >= len(tables) - 1  # ended ones dropped


def test_released_tables_are_dropped_and_a_release_may_repeat() -> None:
    buffers = InputBuffers(BLOCK)
    buffers.prepare(StepInput([SequenceStep(1, [5] * 9, 0, [7, 8, 9]), SequenceStep(2, [6], 0, [3])]))
    buffers.prepare(StepInput([SequenceStep(2, [6], 1, [])], released_seq_ids=[1, 1, 12345]))
    assert set(buffers.tables) == {2}
    buffers.prepare(StepInput([SequenceStep(2, [6], 2, [])], released_seq_ids=[1]))
    assert buffers.tables == {2: [3]}


def test_an_update_past_what_the_runner_holds_is_a_clear_error() -> None:
    buffers = InputBuffers(BLOCK)
    buffers.prepare(StepInput([SequenceStep(1, [5, 5], 0, [7])]))
    with pytest.raises(ValueError, match="starts at 3 but the runner knows 1 blocks"):
        buffers.prepare(StepInput([SequenceStep(1, [5], 2, [8], block_table_start=3)]))
    with pytest.raises(ValueError, match="position 4 has no block in its table of 1"):
        buffers.prepare(StepInput([SequenceStep(1, [5], 4, [])]))


class RecordingExecutor:
    """Wraps the engine's executor and keeps every StepInput it runs."""

    def __init__(self, inner):
        self.inner, self.steps = inner, []
        self.num_kv_blocks, self.prefers_contiguous_kv = inner.num_kv_blocks, inner.prefers_contiguous_kv

    def execute(self, step: StepInput) -> StepOutput:
        self.steps.append(step)
        return self.inner.execute(step)

    def shutdown(self) -> None:
        self.inner.shutdown()


def test_engine_sends_each_block_once_and_releases_ended_sequences(tiny_checkpoint: Path) -> None:
    llm = LLM(str(tiny_checkpoint), block_size=BLOCK, enable_prefix_caching=False)
    recorder = RecordingExecutor(llm.engine.executor)
    llm.engine.executor = recorder
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (3, 17)]
    outputs = llm.generate([[5] * 6, [9] * 10], params)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [3, 17]
    sent: dict[int, list[int]] = {}
    for step in recorder.steps:
        for s in step.sequences:
            assert s.block_table_start == len(sent.setdefault(s.seq_id, []))  # increments, never resent
            sent[s.seq_id] += s.new_block_ids
            assert len(sent[s.seq_id]) * BLOCK >= s.start_position + len(s.new_token_ids)
    short, long_ = sorted(sent, key=lambda seq_id: len(sent[seq_id]))
    assert len(sent[long_]) == -(-(10 + 17) // BLOCK)
    decode_steps = [s for step in recorder.steps for s in step.sequences if s.seq_id == long_][1:]
    assert sum(1 for s in decode_steps if s.new_block_ids) < len(decode_steps) / 3  # most steps send none
    released = [seq_id for step in recorder.steps for seq_id in step.released_seq_ids]
    assert released == [short]  # the first to end, named once by the next step; the other with the next call
    llm.generate([[4] * 3], SamplingParams(max_tokens=1))
    assert recorder.steps[-1].released_seq_ids == [long_]


def test_a_release_waits_for_a_pass_that_runs(tiny_checkpoint: Path) -> None:
    """An ended sequence's release is not lost when the next step runs no pass (every request it scheduled
    failed while its inputs were built): the next pass that runs carries it."""
    llm = LLM(str(tiny_checkpoint), block_size=BLOCK)
    recorder = RecordingExecutor(llm.engine.executor)
    llm.engine.executor = recorder
    engine = llm.engine
    llm.generate([[5] * 6], SamplingParams(max_tokens=2))
    ended = recorder.steps[-1].sequences[0].seq_id
    build = engine._sequence_step

    def failing(item):
        raise RuntimeError("cannot build this request's inputs")

    engine._sequence_step = failing
    failed = engine.add_request([6] * 4, SamplingParams(max_tokens=2))
    outputs = engine.step()
    assert [o.request_id for o in outputs] == [failed] and outputs[0].error
    engine._sequence_step = build
    llm.generate([[7] * 5], SamplingParams(max_tokens=2))
    assert [seq_id for step in recorder.steps for seq_id in step.released_seq_ids] == [ended]
