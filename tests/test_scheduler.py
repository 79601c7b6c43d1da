"""The scheduler and block manager, tested without torch: a fake model "samples" a token per step."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from neox_ray.engine.block_manager import BlockManager
from neox_ray.engine.sampling_params import SamplingParams
from neox_ray.engine.scheduler import Scheduler
from neox_ray.engine.sequence import Sequence, SequenceStatus


def test_scheduler_and_block_manager_do_not_import_torch() -> None:
    code = ("import sys; import neox_ray.engine.scheduler, neox_ray.engine.block_manager, "
            "neox_ray.engine.sampling_params, neox_ray.engine.scoring; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def make_seq(n_prompt: int, max_tokens: int, first_token: int = 1000, **params) -> Sequence:
    return Sequence("r", list(range(first_token, first_token + n_prompt)),
                    SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params))


def run_to_completion(scheduler: Scheduler, max_steps: int = 10_000) -> int:
    steps = 0
    while scheduler.has_unfinished():
        scheduled = scheduler.schedule()
        assert scheduled, "scheduler made no progress"
        total = sum(s.num_new_tokens for s in scheduled)
        assert total <= scheduler.max_num_batched_tokens
        assert len(scheduled) <= scheduler.max_num_seqs
        for item in scheduled:  # every scheduled token has a cache slot
            assert len(item.seq.block_table) * scheduler.block_manager.block_size >= \
                item.seq.num_computed_tokens + item.num_new_tokens
        sampled = {s.seq.seq_id: 7 for s in scheduled if s.completes_prompt}
        scheduler.update(scheduled, sampled)
        steps += 1
        assert steps < max_steps
    return steps


def test_mixes_prefill_and_decode_and_admits_as_others_finish() -> None:
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=32)
    short, long_, late = make_seq(3, 2), make_seq(5, 6), make_seq(4, 2)
    for seq in (short, long_, late):
        scheduler.add(seq)
    first = scheduler.schedule()
    assert [s.seq for s in first] == [short, long_]  # max_num_seqs=2: `late` waits
    scheduler.update(first, {short.seq_id: 7, long_.seq_id: 7})
    scheduler.update(scheduler.schedule(), {short.seq_id: 7, long_.seq_id: 7})
    assert short.is_finished and short.finish_reason == "length"
    third = scheduler.schedule()
    assert {s.seq.seq_id for s in third} == {long_.seq_id, late.seq_id}  # late joins the running batch
    assert [s.num_new_tokens for s in third] == [1, 4]  # a decode and a prefill in one step
    assert scheduler.block_manager.num_free_blocks == 64 - len(long_.block_table) - len(late.block_table)


def test_long_prompt_is_chunked_within_the_token_budget() -> None:
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=4, max_num_batched_tokens=8)
    seq = make_seq(20, 1)
    scheduler.add(seq)
    sizes = []
    while not seq.is_finished:
        scheduled = scheduler.schedule()
        sizes.append(scheduled[0].num_new_tokens)
        scheduler.update(scheduled, {seq.seq_id: 7})
    assert sizes == [8, 8, 4]
    assert seq.output_token_ids == [7]


def test_preemption_when_blocks_run_out_and_everything_completes() -> None:
    manager = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    scheduler = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=64)
    seqs = [make_seq(6, 10, first_token=100 * i) for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    run_to_completion(scheduler)
    assert scheduler.stats.preemptions > 0
    assert all(s.is_finished and s.num_output_tokens == 10 for s in seqs)
    assert manager.num_free_blocks == 6


def test_request_that_can_never_fit_is_rejected() -> None:
    scheduler = Scheduler(BlockManager(4, 4), max_num_seqs=2, max_num_batched_tokens=64)
    with pytest.raises(ValueError, match="cannot fit in the KV cache"):
        scheduler.add(make_seq(10, 10))


def test_prefix_blocks_are_shared_only_after_they_are_computed() -> None:
    manager = BlockManager(32, 4)
    scheduler = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=64)
    first = make_seq(10, 2)
    scheduler.add(first)
    scheduler.update(scheduler.schedule(), {first.seq_id: 7})  # computes 10 tokens: 2 full blocks
    second = make_seq(10, 2)  # same prompt
    scheduler.add(second)
    scheduled = scheduler.schedule()
    prefill = [s for s in scheduled if s.seq is second][0]
    assert second.num_cached_tokens == 8 and prefill.num_new_tokens == 2
    assert second.block_table[:2] == first.block_table[:2]
    assert manager.blocks[first.block_table[0]].ref_count == 2
    assert manager.prefix_cache_hits == 2


def test_same_step_admissions_do_not_read_uncomputed_blocks() -> None:
    manager = BlockManager(32, 4)
    scheduler = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = make_seq(12, 1), make_seq(12, 1)
    scheduler.add(a)
    scheduler.add(b)
    scheduled = scheduler.schedule()
    assert [s.num_new_tokens for s in scheduled] == [12, 12]
    assert not set(a.block_table) & set(b.block_table)


def test_freed_cached_blocks_are_reused_then_evicted() -> None:
    manager = BlockManager(6, 4)
    scheduler = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=64)
    first = make_seq(9, 1)
    scheduler.add(first)
    run_to_completion(scheduler)
    assert manager.num_free_blocks == 6 and len(manager.hash_to_block) == 2  # freed but still cached
    again = make_seq(9, 1)
    scheduler.add(again)
    scheduler.schedule()
    assert again.num_cached_tokens == 8
    run_to_completion(scheduler)
    other = make_seq(23, 1, first_token=5000)  # needs all 6 blocks: evicts the cached ones
    scheduler.add(other)
    run_to_completion(scheduler)
    assert all(manager.blocks[b].content_hash is None or manager.blocks[b].tokens[0] >= 5000
               for b in range(6))


def test_logprob_requests_bypass_the_prefix_cache() -> None:
    manager = BlockManager(32, 4)
    scheduler = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=64)
    first = make_seq(10, 1)
    scheduler.add(first)
    run_to_completion(scheduler)
    scorer = make_seq(10, 1)
    scorer.logprob_start = 1
    scheduler.add(scorer)
    assert scheduler.schedule()[0].num_new_tokens == 10


@pytest.mark.parametrize("prefer_contiguous", [False, True])
def test_sequences_that_do_not_cache_their_prefix_leave_the_cache_alone(prefer_contiguous: bool) -> None:
    """cache_prefix=False (perplexity windows): no blocks published; freed blocks are reused before untouched
    ones and before other sequences' cached prefixes, which stay cached. Contiguity-preferring (the views
    decode path) too: a run of uncached blocks beside the cached ones is taken, not a run over them."""
    manager = BlockManager(12, 4, prefer_contiguous=prefer_contiguous)
    scheduler = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=64)
    cached = make_seq(9, 1)
    scheduler.add(cached)
    run_to_completion(scheduler)
    prefix_blocks = dict(manager.hash_to_block)
    assert len(prefix_blocks) == 2
    used: set[int] = set()
    for first_token in (2000, 3000, 4000):
        window = make_seq(9, 1, first_token=first_token)
        window.cache_prefix = False
        scheduler.add(window)
        scheduler.schedule()
        used.update(window.block_table)
        run_to_completion(scheduler)
    assert manager.hash_to_block == prefix_blocks  # nothing published, nothing evicted
    assert len(used) == 3  # the same 3 blocks each time, not fresh ones
    again = make_seq(9, 1)
    scheduler.add(again)
    scheduler.schedule()
    assert again.num_cached_tokens == 8


def test_stop_conditions() -> None:
    scheduler = Scheduler(BlockManager(32, 4), max_num_seqs=4, max_num_batched_tokens=64, eos_token_ids={2})
    eos = Sequence("r", [5, 6], SamplingParams(max_tokens=5))
    early_eos = Sequence("r", [5, 6], SamplingParams(max_tokens=5, min_tokens=2))
    stop_id = Sequence("r", [5, 6], SamplingParams(max_tokens=5, stop_token_ids=[9], ignore_eos=True))
    for seq in (eos, early_eos, stop_id):
        scheduler.add(seq)
    scheduler.update(scheduler.schedule(), {eos.seq_id: 2, early_eos.seq_id: 2, stop_id.seq_id: 2})
    assert eos.finish_reason == "stop" and not early_eos.is_finished and not stop_id.is_finished
    scheduler.update(scheduler.schedule(), {early_eos.seq_id: 2, stop_id.seq_id: 9})
    assert early_eos.finish_reason == "stop" and stop_id.finish_reason == "stop"


def test_abort_frees_blocks_immediately() -> None:
    manager = BlockManager(16, 4)
    scheduler = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=64)
    running, waiting = make_seq(8, 4), make_seq(8, 4)
    scheduler.add(running)
    scheduler.schedule()
    scheduler.add(waiting)
    scheduler.finish(running, "abort")
    scheduler.finish(waiting, "abort")
    assert manager.num_free_blocks == 16 and not scheduler.has_unfinished()
    assert running.status is SequenceStatus.FINISHED and running.finish_reason == "abort"


@pytest.mark.parametrize("seed", range(5))
def test_random_workloads_always_complete_within_limits(seed: int) -> None:
    rng = random.Random(seed)
    manager = BlockManager(num_blocks=rng.randint(12, 30), block_size=rng.choice([1, 2, 4, 8]))
    scheduler = Scheduler(manager, max_num_seqs=rng.randint(1, 8), max_num_batched_tokens=rng.randint(8, 64))
    capacity = manager.num_blocks * manager.block_size
    seqs = []
    for _ in range(rng.randint(5, 30)):
        prompt = rng.randint(1, min(20, capacity - 2))
        max_tokens = rng.randint(1, max(1, min(15, capacity - prompt - 1)))
        # Shared prefixes half the time to exercise the prefix cache under preemption.
        seq = make_seq(prompt, max_tokens, first_token=rng.choice([0, 0, 100 * rng.randint(1, 50)]))
        seqs.append(seq)
        scheduler.add(seq)
    run_to_completion(scheduler)
    assert all(s.is_finished and s.num_output_tokens == s.params.max_tokens for s in seqs)
    assert manager.num_free_blocks == manager.num_blocks
    assert all(b.ref_count == 0 for b in manager.blocks)
