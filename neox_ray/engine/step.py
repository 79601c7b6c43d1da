"""The plain-data contract between the engine (scheduler side) and the model runner(s). Pure Python.

A :class:`StepInput` is everything a runner needs for one forward pass, given what earlier steps told it:
block tables travel as increments (a sequence's blocks appended since the runner last saw it) and ended
sequences are named once, so the runner keeps each table in a persistent buffer
(:mod:`neox_ray.engine.input_buffers`). It is picklable so the same object goes to an in-process runner or
to every rank of a Ray shard group. A :class:`StepOutput` is what comes back (from rank 0): sampled tokens
and requested logprobs, keyed by sequence id.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class SamplingRow:
    """One sequence's sampling for one step. The knobs carry :class:`SamplingParams`' field names and are
    copied from the request's params by name (``SAMPLING_KNOBS``); the rest is per sequence and step."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None                    # top logprobs to return (None: no logprobs at all)
    seed: int | None = None                        # the sample's own seed (derived from the request's)
    output_position: int = 0                       # index of the token being sampled among the outputs
    prompt_token_ids: list[int] = field(default_factory=list)  # only sent when repetition_penalty != 1
    output_token_ids: list[int] = field(default_factory=list)  # only sent when any penalty is active
    banned_token_ids: list[int] = field(default_factory=list)  # eos / stop ids while below min_tokens

    @property
    def needs_history(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


# SamplingRow fields set per sequence and step; every other field is a SamplingParams field of the same name.
PER_SEQUENCE_FIELDS = frozenset({"seed", "output_position", "prompt_token_ids", "output_token_ids",
                                 "banned_token_ids"})
SAMPLING_KNOBS = tuple(f.name for f in fields(SamplingRow) if f.name not in PER_SEQUENCE_FIELDS)


@dataclass
class SequenceStep:
    seq_id: int
    new_token_ids: list[int]          # fed this step
    start_position: int               # position of new_token_ids[0] (= tokens already cached)
    # The sequence's block table from index block_table_start on (0 with the whole table: a new sequence,
    # or one preempted and readmitted); entries before it are the ones the runner already holds.
    new_block_ids: list[int]
    block_table_start: int = 0
    sampling: SamplingRow | None = None   # set when this step completes the sequence's tokens and it samples
    # Logprobs of known next tokens ("prompt logprobs" / scoring): rows [first_logprob_row, ...) of this chunk
    # predict logprob_targets, in order.
    first_logprob_row: int = 0
    logprob_targets: list[int] = field(default_factory=list)
    num_top_logprobs: int = 0


@dataclass
class StepInput:
    sequences: list[SequenceStep]
    released_seq_ids: list[int] = field(default_factory=list)  # ended since the last step: their tables go


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None                   # raw logprob of the chosen token
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class TokenLogprobs:
    """Logprobs of known tokens (one entry per target), with optional top-k alternatives."""
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class StepOutput:
    samples: dict[int, SampleResult] = field(default_factory=dict)
    prompt_logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)
