"""``/v1/chat/completions`` and the tokenizer routes, on top of :class:`~neox_ray.serve.server.OpenAIServer`.

Chat renders the messages with the checkpoint's chat template (:mod:`neox_ray.chat`, on the server's
tokenizer threads, after the same size checks as completions: lone surrogates, characters, ``n``),
then runs exactly like a completion of that text: same engine submission, limits, timeouts, errors and
metrics as ``/v1/completions`` (the server's helpers). Streamed chunks carry ``delta.role`` first, then
``delta.content``, then the finish reason; ``usage`` comes last when ``stream_options.include_usage``.

The tokenizer routes follow vLLM (what lm-eval's ``tokenizer_backend=remote`` reads): ``POST /tokenize``
(a prompt or messages), ``POST /detokenize`` and ``GET /tokenizer_info`` at the server root.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any, cast

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from neox_ray.chat import ChatTemplate, ChatTemplateError, MessagesError
from neox_ray.engine.async_engine import EngineRequest
from neox_ray.engine.outputs import CompletionOutput, RequestOutput
from neox_ray.engine.sampling_params import SamplingParams
from neox_ray.engine.schema import SettingsError
from neox_ray.serve.chat_protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChoiceLogprobs,
    DeltaMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprob,
    TopLogprob,
    new_chat_id,
)
from neox_ray.serve.errors import bad_request
from neox_ray.serve.metrics import TokenLatencyObserver
from neox_ray.serve.protocol import FinishReason, Usage, clamp_logprob, dump, now_s
from neox_ray.serve.server import ENGINE_ERRORS, SAMPLING_FIELDS, EventStreamResponse, OpenAIServer, sse_event

# Chat's logprobs/max_tokens differ in meaning from the engine's; everything else is copied by name.
_CHAT_SAMPLING_FIELDS = (SAMPLING_FIELDS & set(ChatCompletionRequest.model_fields)) - {"logprobs", "max_tokens"}


class ChatRoutes:
    def __init__(self, server: OpenAIServer, chat_template_file: str | None = None):
        self.server = server
        self.engine = server.llm_engine
        self.tokenizer = server.tokenizer
        model_dir = getattr(self.engine, "model_dir", self.engine.config.model)
        # A bad --chat-template file fails at start-up, not on the first request.
        self.template = ChatTemplate.load(model_dir, chat_template_file)

    # ---- shared -------------------------------------------------------------------------------------
    def render(self, messages: Any, add_generation_prompt: bool) -> list[int]:
        """Messages -> prompt token ids (runs in a worker thread: templates and tokenizing can be slow)."""
        if self.template is None:
            raise bad_request("this model has no chat template (none in its tokenizer_config.json or "
                              "chat_template.jinja); start the server with --chat-template FILE, or use "
                              "/v1/completions", "messages", "chat_template_missing")
        try:
            text = self.template.render(messages, add_generation_prompt)
        except MessagesError as exc:
            raise bad_request(str(exc), "messages") from None
        except ChatTemplateError as exc:
            raise bad_request(str(exc), "messages", "chat_template_error") from None
        return self.tokenizer.encode(text)

    # ---- /v1/chat/completions -----------------------------------------------------------------------
    def sampling_params(self, body: ChatCompletionRequest, prompt_tokens: int) -> SamplingParams:
        for name in ("logit_bias", "tools", "response_format"):
            if getattr(body, name):
                raise bad_request(f"{name} is not supported", name)
        if body.tool_choice not in (None, "none"):
            raise bad_request("tool_choice is not supported", "tool_choice")
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        if body.prompt_logprobs is not None:
            raise bad_request("prompt_logprobs is not a chat request field", "prompt_logprobs")
        if body.max_tokens is not None and body.max_completion_tokens is not None \
                and body.max_tokens != body.max_completion_tokens:
            raise bad_request("give max_completion_tokens or max_tokens, not both", "max_completion_tokens")
        values = {name: getattr(body, name) for name in _CHAT_SAMPLING_FIELDS}
        room = self.engine.max_model_len - prompt_tokens
        values["max_tokens"] = body.max_completion_tokens or body.max_tokens or max(room, 1)
        values["logprobs"] = (body.top_logprobs or 0) if body.logprobs else None
        try:
            return SamplingParams(**values)
        except SettingsError as exc:
            field = "max_completion_tokens" if exc.field == "max_tokens" and body.max_completion_tokens else exc.field
            raise bad_request(str(exc), field) from None

    async def chat_completions(self, body: ChatCompletionRequest, arrival: float) -> Response:
        server = self.server
        server.check_model(body.model)
        server.check_n(body.n)
        # Lone surrogates, characters, and n against the queue: before any rendering or tokenizing.
        server.check_request_size(body, [_message_text(body.messages)], "messages", body.n)
        token_ids = await server.on_tokenizer_threads(self.render, body.messages, body.add_generation_prompt)
        params = self.sampling_params(body, len(token_ids))
        try:
            self.engine.validate_prompt(token_ids, params.max_tokens)
        except ValueError as exc:
            code = "context_length_exceeded" if "max_model_len" in str(exc) else None
            raise bad_request(str(exc), "messages", code) from None
        server.metrics.prompt_tokens.inc(len(token_ids))
        stream = server.submit([EngineRequest(token_ids, params)], arrival, "messages")
        observer = TokenLatencyObserver(server.metrics, arrival)
        assembler = _ChatAssembler(server, body.n, (body.top_logprobs or 0) if body.logprobs else None)
        chat_id, created, model = new_chat_id(), now_s(), server.settings.served_model_name
        usage = _Usage(len(token_ids))

        if body.stream:
            try:  # the first update decides the status code: errors before it are proper HTTP errors
                first = await stream.__anext__()
            except ENGINE_ERRORS as exc:
                raise server.engine_error(exc) from None
            observer.observe(*first)

            event = sse_event

            def chunk(choices: list[ChatChunkChoice]) -> str:
                return event(dump(ChatCompletionChunk(id=chat_id, created=created, model=model, choices=choices)))

            async def events() -> AsyncIterator[str]:
                try:
                    yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                                 for i in range(body.n)])
                    updates: list[tuple[int, RequestOutput]] = [first]
                    while True:
                        for _, output in updates:
                            choices = assembler.deltas(output)
                            if choices:
                                yield chunk(choices)
                        if not stream.has_unfinished:
                            break
                        updates = [await stream.__anext__()]
                        observer.observe(*updates[0])
                    if body.stream_options is not None and body.stream_options.include_usage:
                        yield event(dump(ChatCompletionChunk(id=chat_id, created=created, model=model, choices=[],
                                                             usage=usage.of(assembler))))
                    self._finish_metrics(assembler, arrival)
                except ENGINE_ERRORS as exc:  # the status line is already sent: report in-band, as OpenAI does
                    yield event(server.engine_error(exc).body())
                except StopAsyncIteration:
                    pass
                finally:
                    stream.abort_unfinished()  # the client went away, or an error: free the engine slots
                yield "data: [DONE]\n\n"

            return EventStreamResponse(events(), media_type="text/event-stream",
                                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        finals = await server.collect(stream, observer)
        choices = assembler.final_choices(finals[0])
        self._finish_metrics(assembler, arrival)
        return JSONResponse(dump(ChatCompletionResponse(id=chat_id, created=created, model=model, choices=choices,
                                                        usage=usage.of(assembler))))

    def _finish_metrics(self, assembler: _ChatAssembler, arrival: float) -> None:
        self.server.metrics.generation_tokens.inc(assembler.completion_tokens)
        self.server.metrics.request_latency.observe(time.monotonic() - arrival)

    # ---- tokenizer routes ---------------------------------------------------------------------------
    def _check_optional_model(self, model: str | None) -> None:
        if model is not None:
            self.server.check_model(model)

    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        self._check_optional_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give either prompt or messages", "prompt")
        text = body.prompt if body.prompt is not None else _message_text(body.messages or [])
        self.server.check_request_size(body, [text], "prompt" if body.prompt is not None else "messages", 0)
        if body.messages is not None:
            tokens = await self.server.on_tokenizer_threads(self.render, body.messages, body.add_generation_prompt)
            if body.add_special_tokens:
                tokens = self.tokenizer.encode(self.tokenizer.decode(tokens, skip_special_tokens=False),
                                               add_special_tokens=True)
        else:
            prompt = body.prompt or ""
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
            try:
                tokens = await self.server.on_tokenizer_threads(self.tokenizer.encode, prompt, add_special)
            except (UnicodeEncodeError, ValueError):
                raise bad_request("prompt is not valid UTF-8 text (lone surrogate?)", "prompt") from None
        token_strs = [self.server.token_text(t) for t in tokens] if body.return_token_strs else None
        return TokenizeResponse(count=len(tokens), max_model_len=self.engine.max_model_len, tokens=tokens,
                                token_strs=token_strs)

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self._check_optional_model(body.model)
        vocab = self.engine.vocab_size
        for index, token in enumerate(body.tokens):
            if not 0 <= token < vocab:
                raise bad_request(f"tokens[{index}]: token id {token} is outside the vocabulary [0, {vocab})",
                                  "tokens")
        text = await self.server.on_tokenizer_threads(self.tokenizer.decode, body.tokens, False)
        return DetokenizeResponse(prompt=text)

    def tokenizer_info(self) -> dict[str, Any]:
        """What vLLM's ``/tokenizer_info`` returns and lm-eval's remote tokenizer reads."""
        def token(token_id: int | None) -> str | None:
            return None if token_id is None else self.tokenizer.id_to_token(token_id)

        return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": self.engine.max_model_len,
                "eos_token": token(self.tokenizer.eos_token_id), "bos_token": token(self.tokenizer.bos_token_id),
                "pad_token": token(self.tokenizer.pad_token_id),
                "chat_template": None if self.template is None else self.template.source,
                "vocab_size": self.tokenizer.vocab_size}

    def add_routes(self, router: APIRouter, counted: Any) -> None:
        @router.post("/v1/chat/completions")
        async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
            arrival = time.monotonic()
            return counted(request, await self.chat_completions(body, arrival))

        @router.post("/tokenize")
        async def tokenize(body: TokenizeRequest, request: Request) -> Response:
            return counted(request, JSONResponse(dump(await self.tokenize(body))))

        @router.post("/detokenize")
        async def detokenize(body: DetokenizeRequest, request: Request) -> Response:
            return counted(request, JSONResponse(dump(await self.detokenize(body))))

        @router.get("/tokenizer_info")
        async def tokenizer_info(request: Request) -> Response:
            return counted(request, JSONResponse(self.tokenizer_info()))


class _Usage:
    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens

    def of(self, assembler: _ChatAssembler) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=assembler.completion_tokens,
                     total_tokens=self.prompt_tokens + assembler.completion_tokens)


class _ChatAssembler:
    """Engine outputs of one chat request -> choices (one per sample), as deltas against what was sent."""

    def __init__(self, server: OpenAIServer, n: int, top_logprobs: int | None):
        self.server = server
        self.n = n
        self.top_logprobs = top_logprobs  # None: no logprobs; else alternatives per token
        self.sent_chars: dict[int, int] = defaultdict(int)
        self.sent_tokens: dict[int, int] = defaultdict(int)
        self.finished: set[int] = set()
        self.completion_tokens = 0

    def final_choices(self, output: RequestOutput) -> list[ChatChoice]:
        choices = []
        for sample in output.outputs[:self.n]:
            self.completion_tokens += len(sample.token_ids)
            choices.append(ChatChoice(index=sample.index, message=ChatMessage(content=sample.text),
                                      logprobs=self._logprobs(sample, 0), finish_reason=_finish(sample)))
        return choices

    def deltas(self, output: RequestOutput) -> list[ChatChunkChoice]:
        choices = []
        for sample in output.outputs[:self.n]:
            index = sample.index
            if index in self.finished:
                continue
            text = sample.text[self.sent_chars[index]:]
            logprobs = self._logprobs(sample, self.sent_tokens[index])
            self.sent_chars[index] = len(sample.text)
            self.sent_tokens[index] = len(sample.token_ids)
            finish_reason = _finish(sample)
            if finish_reason is not None:
                self.finished.add(index)
                self.completion_tokens += len(sample.token_ids)
            if not text and finish_reason is None and not (logprobs and logprobs.content):
                continue
            choices.append(ChatChunkChoice(index=index, delta=DeltaMessage(content=text or None),
                                           logprobs=logprobs, finish_reason=finish_reason))
        return choices

    def _logprobs(self, sample: CompletionOutput, start: int) -> ChoiceLogprobs | None:
        if self.top_logprobs is None:
            return None
        entries = (sample.logprobs or [])[start:]
        content = []
        for token_id, entry in zip(sample.token_ids[start:], entries, strict=False):
            chosen = entry.get(token_id, float("-inf"))
            # The engine's entry holds the top-k and the chosen token (which may be outside them).
            ranked = sorted(entry.items(), key=lambda item: -item[1])[:self.top_logprobs]
            top = [self._top(t, lp) for t, lp in ranked]
            content.append(TokenLogprob(**self._top(token_id, chosen).model_dump(), top_logprobs=top))
        return ChoiceLogprobs(content=content)

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        text = self.server.token_text(token_id)
        raw = self.server.tokenizer.decode([token_id], skip_special_tokens=False)
        return TopLogprob(token=text, logprob=clamp_logprob(logprob),
                          bytes=list(raw.encode("utf-8", errors="replace")) if "\ufffd" not in raw else None)


def _message_text(messages: list[Any]) -> str:
    """The messages' string contents joined: what the per-request character limit counts."""
    return "".join(m["content"] for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))


def _finish(sample: CompletionOutput) -> FinishReason | None:
    """The sample's finish reason as the response models type it (the engine sets only these three)."""
    return cast(FinishReason | None, sample.finish_reason)
