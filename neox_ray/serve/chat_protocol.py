"""Schemas of ``/v1/chat/completions`` and the tokenizer routes (``/tokenize``, ``/detokenize``,
``/tokenizer_info``), as OpenAI and vLLM shape them. Pure pydantic, no engine.

:class:`ChatCompletionRequest` takes its sampling fields from
:class:`~neox_ray.engine.sampling_params.SamplingFields` like the completions request does; only chat's own
fields (``messages``, ``max_completion_tokens``, boolean ``logprobs`` + ``top_logprobs``) are declared here.
Messages are checked by :func:`neox_ray.chat.validate_messages` so a malformed one gets a 400 naming it.
Handling lives in :mod:`neox_ray.serve.chat_routes`.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

from neox_ray.engine.sampling_params import MAX_LOGPROBS, MAX_TOKENS_LIMIT, SamplingFields
from neox_ray.engine.schema import StrictModel
from neox_ray.serve.protocol import FinishReason, StreamOptions, Usage


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``. Unknown fields are rejected."""

    model: str
    messages: list[Any]
    # OpenAI's default: as many tokens as the context has room for after the prompt.
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT,  # type: ignore[assignment]
                                   description="tokens to generate (deprecated by OpenAI for max_completion_tokens)")
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    add_generation_prompt: bool = True  # vLLM's extension: end the prompt with the assistant's turn header
    # Accepted for client compatibility only at their neutral values.
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


class TokenizeRequest(StrictModel):
    """``POST /tokenize``: ``prompt`` or ``messages`` (vLLM's shape)."""
    model: str | None = None
    prompt: str | None = None
    messages: list[Any] | None = None
    add_special_tokens: bool | None = None      # default: True for a prompt, False for messages (as vLLM)
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[int]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


def new_chat_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"
