"""OpenAI-compatible request schemas and response bodies for the HTTP layer. Pure pydantic, no engine.

Pydantic checks only types and shapes here (a wrong type becomes a 400 naming the field); value ranges
are :class:`SamplingParams`' job, so the HTTP layer and the batch jobs share one set of rules. Building
engine requests from these and engine outputs into these lives in :mod:`neox_ray.serve.server`.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# A prompt as OpenAI's legacy completions API accepts it: text, texts, token ids or lists of token ids.
PromptField = str | list[str] | list[int] | list[list[int]]

# Logprobs are JSON numbers; -inf (a token the sampler could never pick) is clamped like vLLM does.
MIN_LOGPROB = -9999.0


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """``POST /v1/completions``. Unknown fields are rejected (a typo should not silently do nothing)."""
    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: PromptField
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = None
    echo: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    # Accepted for client compatibility only at their neutral values.
    best_of: int | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None
    # Extensions (vLLM's names).
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False


class ScoreRequest(BaseModel):
    """``POST /v1/score`` (extension): per-text NLL / perplexity, the fields of ``LLM.score``."""
    model_config = ConfigDict(extra="forbid")

    model: str
    input: PromptField
    window: int | None = None
    stride: int | None = None
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


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


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


class ScoreResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[ScoreResult]
    usage: Usage


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def clamp_logprob(value: float) -> float:
    return max(value, MIN_LOGPROB) if not math.isnan(value) else MIN_LOGPROB


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")
