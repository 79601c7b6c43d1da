"""What callers get back: vLLM-shaped request and completion outputs, and scoring results. Pure Python."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None           # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None       # the stop string or token id that ended it
    # One dict per generated token: {token_id: logprob} with the chosen token and the top-k alternatives.
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    # One entry per prompt token (the first is None): {token_id: logprob} for the actual token + top-k.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    # Set (with finished=True) when the engine failed this request alone; the others keep running.
    error: str | None = None


@dataclass
class ScoreOutput:
    """Per-text scoring in lm-eval's definitions: nll is a sum in nats over every token of the text."""
    num_tokens: int
    nll: float
    perplexity: float
    num_bytes: int
    bits_per_byte: float
    num_words: int
    word_perplexity: float
    byte_perplexity: float
    token_logprobs: list[float] | None = None
