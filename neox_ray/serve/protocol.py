"""OpenAI-compatible request schemas and response bodies for the HTTP layer. Pure pydantic, no engine.

:class:`CompletionRequest` takes its sampling fields (types, defaults, bounds) from
:class:`~neox_ray.engine.sampling_params.SamplingFields`, so the HTTP layer, the offline API and the batch
jobs share one set of rules; only OpenAI's own fields are declared here. The request is strict like
OpenAI's (``"1"`` is not a number) and any violation is a 400 naming the field
(:mod:`neox_ray.serve.errors`). Building engine requests from these and engine outputs into these lives
in :mod:`neox_ray.serve.server`.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from neox_ray.engine.sampling_params import MAX_TOKENS_LIMIT, SamplingFields
from neox_ray.engine.schema import StrictModel

# A prompt as OpenAI's legacy completions API accepts it: text, texts, token ids or lists of token ids.
PromptField = str | list[str] | list[int] | list[list[int]]

# Logprobs are JSON numbers; -inf (a token the sampler could never pick) is clamped like vLLM does.
MIN_LOGPROB = -9999.0


class StreamOptions(StrictModel):
    include_usage: bool = False


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: OpenAI's fields plus every sampling field (vLLM's names for the extensions).
    Unknown fields are rejected (a typo should not silently do nothing)."""

    model: str
    prompt: PromptField
    # OpenAI's max_tokens default (16) is the engine's; 0 is allowed here with echo=true (score the prompt).
    max_tokens: int = Field(SamplingFields.model_fields["max_tokens"].default, ge=0, le=MAX_TOKENS_LIMIT,
                            description="tokens to generate per sample; 0 with echo=true returns the prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    user: str | None = None
    # Accepted for client compatibility only at their neutral values.
    best_of: int | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None


# Request fields that are SamplingParams fields (the server copies these into the engine's params).
SAMPLING_REQUEST_FIELDS = tuple(name for name in CompletionRequest.model_fields if name in SamplingFields.model_fields)


class ScoreRequest(StrictModel):
    """``POST /v1/score`` (extension): per-text NLL / perplexity (``input``; the fields of ``LLM.score``), or
    with ``mode="loglikelihood"`` lm-eval's loglikelihood of (context, continuation) pairs: ``pairs``, or
    the ``context`` and ``continuation`` lists (the fields of ``LLM.loglikelihood``). Strict like
    :class:`CompletionRequest`: ``"8"`` is not a window, unknown fields are rejected."""

    model: str
    mode: Literal["perplexity", "loglikelihood"] = "perplexity"
    input: PromptField | None = None
    perplexity: Literal["sliding", "rolling"] = "sliding"
    window: int | None = None
    stride: int | None = None
    # [context, continuation] per pair (a JSON array: strict mode takes no tuple from JSON).
    pairs: list[Annotated[list[str], Field(min_length=2, max_length=2)]] | None = None
    context: list[str] | None = None
    continuation: list[str] | None = None
    return_token_logprobs: bool = False


# ---- response bodies ---------------------------------------------------------------------------------
def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


class CompletionLogprobs(BaseModel):
    """The legacy completions ``logprobs`` object: one entry per token of the choice's text."""
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)

    def append(self, token: str, logprob: float | None, top: dict[str, float] | None, offset: int) -> None:
        self.tokens.append(token)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(offset)


FinishReason = Literal["stop", "length", "abort"]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "neox-ray"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ScoreResult(BaseModel):
    """One text's metrics: the fields of :class:`neox_ray.engine.outputs.ScoreOutput` (non-finite -> null)."""
    index: int
    object: Literal["score"] = "score"
    num_tokens: int
    nll: float | None
    perplexity: float | None
    num_bytes: int
    bits_per_byte: float | None
    num_words: int
    word_perplexity: float | None
    byte_perplexity: float | None
    token_logprobs: list[float] | None = None


class LoglikelihoodResult(BaseModel):
    """One pair's loglikelihood: the fields of :class:`neox_ray.engine.scoring.LoglikelihoodOutput`."""
    index: int
    object: Literal["loglikelihood"] = "loglikelihood"
    logprob: float | None
    is_greedy: bool
    num_tokens: int
    token_logprobs: list[float] | None = None


class ScoreResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[ScoreResult] | list[LoglikelihoodResult]
    usage: Usage


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def clamp_logprob(value: float) -> float:
    return max(value, MIN_LOGPROB) if not math.isnan(value) else MIN_LOGPROB


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")
