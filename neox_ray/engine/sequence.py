"""A sequence: one sample of one request, as the scheduler and block manager see it. Pure Python.

Token ids only; text, detokenization and stop strings belong to the engine. ``num_computed_tokens`` is how
many of ``token_ids`` already have keys/values in the cache; the scheduler feeds the rest in chunks.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from neox_ray.engine.sampling_params import SamplingParams

_seq_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    sample_index: int = 0
    seed: int | None = None
    # Prefill-only sequences (scoring, prompt logprobs with max_tokens=0) never sample a token.
    prefill_only: bool = False
    # First token position whose logprob (given the tokens before it) the caller wants; None = none.
    logprob_start: int | None = None
    # Publish full blocks to the prefix cache. Off for content no later prompt can start with (perplexity
    # windows): freed uncached blocks are reused first, so such requests neither evict cached prefixes nor,
    # on the CPU's lazily mapped cache, keep mapping fresh pages.
    cache_prefix: bool = True
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0        # tokens served from the prefix cache at the last admission
    block_table: list[int] = field(default_factory=list)
    num_registered_blocks: int = 0    # leading full blocks already published to the prefix cache
    finish_reason: str | None = None
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        self.token_ids = list(self.token_ids)
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_compute_tokens(self) -> int:
        """How many tokens get keys/values computed: all of them, except that a prefill-only sequence skips
        its last token (nothing reads its logits; its logprob comes from the token before it)."""
        return max(self.num_tokens - 1, 1) if self.prefill_only else self.num_tokens

    @property
    def max_tokens(self) -> int:
        return 0 if self.prefill_only else self.params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
