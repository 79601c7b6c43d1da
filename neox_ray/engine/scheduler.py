"""Continuous-batching scheduler: decides, every step, which sequences run and how many tokens each feeds.

One token budget per step (``max_num_batched_tokens``) is shared by decodes (one token each) and
prefills (a prompt, or a chunk of one when it does not fit: chunked prefill), so new requests join the
running batch as soon as others finish and long prompts never stall decodes. When the KV cache runs out
of blocks, the most recently admitted running sequence is preempted: its blocks are freed and it goes
back to the front of the queue to be recomputed later (its generated tokens are kept), so every request
eventually completes. A prefill-only sequence (scoring) never computes its last token: nothing reads
that token's logits, and its own logprob comes from the position before it. Pure Python: no torch, no
tokenizer; stop *strings* are checked by the engine, which calls :meth:`Scheduler.finish`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from neox_ray.engine.block_manager import BlockManager
from neox_ray.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int       # tokens fed this step, starting at seq.num_computed_tokens

    @property
    def completes_prompt(self) -> bool:
        """After this step every token of the sequence has been computed, so its next token can be sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_compute_tokens


@dataclass
class SchedulerStats:
    steps: int = 0
    preemptions: int = 0
    scheduled_tokens: int = 0
    max_running: int = 0            # the most sequences that shared one step
    shared_decode_steps: int = 0    # steps where two or more sequences decoded together


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 eos_token_ids: frozenset[int] | set[int] = frozenset()):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = SchedulerStats()

    # ---- queue ---------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        max_blocks = self.block_manager.num_blocks
        if self.block_manager.blocks_needed(seq.num_tokens + seq.max_tokens) > max_blocks:
            raise ValueError(f"sequence of {seq.num_tokens} tokens + {seq.max_tokens} to generate cannot fit in "
                             f"the KV cache ({max_blocks} blocks of {self.block_manager.block_size} tokens)")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one step ------------------------------------------------------------------------------------
    def schedule(self) -> list[ScheduledSequence]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        # Running sequences first, oldest first: decodes and unfinished prefill chunks.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_compute_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.can_append(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # seq itself was preempted: nothing after it remains either
            self.block_manager.ensure_capacity(seq, seq.num_computed_tokens + num_new)
            scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
            i += 1
        # Then admit waiting sequences while there is budget, room in the batch and cache blocks.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, lookahead_tokens=seq.max_tokens - seq.num_output_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_new = min(seq.num_compute_tokens - seq.num_computed_tokens, budget)
            scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        self.stats.steps += bool(scheduled)
        self.stats.scheduled_tokens += self.max_num_batched_tokens - budget
        self.stats.max_running = max(self.stats.max_running, len(scheduled))
        decodes = sum(1 for s in scheduled if s.num_new_tokens == 1 and s.seq.num_output_tokens > 0)
        self.stats.shared_decode_steps += decodes >= 2
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(seq)

    def update(self, scheduled: list[ScheduledSequence], sampled: dict[int, int]) -> list[Sequence]:
        """Advances computed counts, appends sampled tokens (by seq_id) and finishes sequences that hit
        max_tokens, eos or a stop token. Returns the sequences that received a token or finished."""
        changed = []
        for item in scheduled:
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            completes = item.completes_prompt
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.register_computed_blocks(seq)
            if not completes:
                continue
            if seq.prefill_only:
                self.finish(seq, "length")
                changed.append(seq)
                continue
            token = sampled[seq.seq_id]
            seq.append_token(token)
            reason = self._stop_reason(seq, token)
            if reason:
                self.finish(seq, reason)
            changed.append(seq)
        return changed

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if seq.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in self.eos_token_ids:
                return "stop"
            if token in params.stop_token_ids:
                return "stop"
        if seq.num_output_tokens >= params.max_tokens:
            return "length"
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends ``seq`` (finished normally, by a stop string, or aborted) and frees its blocks at once."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
