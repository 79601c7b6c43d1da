"""The OpenAI-compatible FastAPI app over one shared :class:`AsyncLLMEngine`.

Every HTTP request becomes one or more engine requests (one per prompt; scoring fans out into windows
inside the engine) that join the engine's running batch. Their updates come back as the engine's merged
:class:`RequestStream`, which aborts whatever is unfinished the moment the HTTP request ends early
(client disconnect, timeout, error); here they are turned into OpenAI-shaped bodies or server-sent
events, and engine errors into HTTP statuses: ``max_queued_requests`` (503 + ``Retry-After``, the
engine's own pending count), ``request_timeout_s`` (408), a request the engine failed (500).

No Ray import: the same app runs inside a Serve replica (:mod:`neox_ray.serve.deployment`) or in-process.
Generation, stop strings and detokenization are the engine's; schemas are :mod:`neox_ray.serve.protocol`'s.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from neox_ray.engine.async_engine import (AsyncLLMEngine, DeadlineExceeded, EngineDeadError, EngineRequest,
                                          QueueFullError, RequestFailedError, RequestStream)
from neox_ray.engine.outputs import CompletionOutput, RequestOutput
from neox_ray.engine.sampling_params import SamplingParams
from neox_ray.engine.schema import SettingsError
from neox_ray.engine.scoring import ScoreItemError, encode_pair
from neox_ray.serve.auth import APIKeyChecker
from neox_ray.serve.errors import (APIError, bad_request, engine_dead, install_error_handlers, param_from_message,
                                   queue_full, request_timeout)
from neox_ray.serve.metrics import ServerMetrics, TokenLatencyObserver
from neox_ray.serve.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
                                     LoglikelihoodResult, ModelCard, ModelList, PromptField,
                                     SAMPLING_REQUEST_FIELDS, ScoreRequest, ScoreResponse, ScoreResult, Usage,
                                     clamp_logprob, dump, finite_or_none, new_completion_id, now_s)

# Request fields copied into the engine's SamplingParams: derived from the schema, never listed here.
# prompt_logprobs is not one: echo=true with logprobs sets it (the response has no other place for them).
SAMPLING_FIELDS = frozenset(SAMPLING_REQUEST_FIELDS) - {"prompt_logprobs"}


# What the engine raises for one HTTP request's submission or stream; each maps onto an HTTP error.
EngineError = DeadlineExceeded | EngineDeadError | QueueFullError | RequestFailedError
ENGINE_ERRORS = (DeadlineExceeded, EngineDeadError, QueueFullError, RequestFailedError)


@dataclass
class ServerSettings:
    served_model_name: str
    request_timeout_s: float | None = None
    api_keys: tuple[str, ...] = ()
    chat_template: str | None = None   # a jinja file overriding the checkpoint's chat template


@dataclass
class _Prompt:
    text: str | None        # None when given as token ids
    token_ids: list[int]


class _CompletionAssembler:
    """Engine outputs -> completion choices (choice ``slot * n + sample``), as deltas against what was sent.

    Non-streamed responses take one delta per finished output (the whole choice); streamed ones take one
    per update. With ``echo`` the prompt (and its logprobs) leads each choice; prompt logprobs only exist
    once a request finishes, so a streamed echo-with-logprobs choice is held back until then.
    """

    def __init__(self, server: "OpenAIServer", body: CompletionRequest, prompts: list[_Prompt], prefill_only: bool):
        self.server = server
        self.body = body
        self.prompts = prompts
        self.prefill_only = prefill_only
        self.sent_chars: dict[int, int] = defaultdict(int)
        self.sent_tokens: dict[int, int] = defaultdict(int)
        self.text_offset: dict[int, int] = defaultdict(int)
        self.echoed: set[int] = set()
        self.finished: set[int] = set()
        self.completion_tokens = 0

    def deltas(self, slot: int, output: RequestOutput) -> list[CompletionChoice]:
        body = self.body
        if body.echo and body.logprobs is not None and not output.finished:
            return []
        choices = []
        for sample_index in range(body.n):
            index = slot * body.n + sample_index
            if index in self.finished:
                continue
            sample = None if self.prefill_only else output.outputs[sample_index]
            logprobs = CompletionLogprobs() if body.logprobs is not None else None
            text = ""
            if body.echo and index not in self.echoed:
                prompt = self.prompts[slot]
                text += self.server.prompt_text(prompt)
                if logprobs is not None:
                    self._add_logprobs(logprobs, index, prompt.token_ids, output.prompt_logprobs)
                self.echoed.add(index)
            if sample is not None:
                text += sample.text[self.sent_chars[index]:]
                self.sent_chars[index] = len(sample.text)
                new_tokens = sample.token_ids[self.sent_tokens[index]:]
                if logprobs is not None:
                    entries = (sample.logprobs or [])[self.sent_tokens[index]:]
                    self._add_logprobs(logprobs, index, new_tokens, entries)
                self.sent_tokens[index] = len(sample.token_ids)
            finish_reason = self._finish_reason(sample, output)
            if finish_reason is not None:
                self.finished.add(index)
                self.completion_tokens += len(sample.token_ids) if sample is not None else 0
            if not text and finish_reason is None and not (logprobs and logprobs.tokens):
                continue
            choices.append(CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason))
        return choices

    def _finish_reason(self, sample: CompletionOutput | None, output: RequestOutput) -> str | None:
        if sample is None:
            return "length" if output.finished else None  # echo with max_tokens=0
        return sample.finish_reason

    def _add_logprobs(self, logprobs: CompletionLogprobs, index: int, token_ids: list[int],
                      entries: list[dict[int, float] | None] | None) -> None:
        entries = list(entries or [])
        for position, token_id in enumerate(token_ids):
            entry = entries[position] if position < len(entries) else None
            token = self.server.token_text(token_id)
            if entry is None:
                logprobs.append(token, None, None, self.text_offset[index])
            else:
                ranked = sorted(entry.items(), key=lambda item: -item[1])
                top = {self.server.token_text(t): clamp_logprob(lp) for t, lp in ranked}
                chosen = entry.get(token_id)
                logprobs.append(token, None if chosen is None else clamp_logprob(chosen), top,
                                self.text_offset[index])
            self.text_offset[index] += self.server.token_width(token_id)


class OpenAIServer:
    """Request handling for one replica: validation, engine submission, response assembly, metrics."""

    def __init__(self, engine: AsyncLLMEngine, settings: ServerSettings):
        self.engine = engine
        self.llm_engine = engine.engine
        self.tokenizer = self.llm_engine.tokenizer
        self.settings = settings
        self.auth = APIKeyChecker(list(settings.api_keys))
        self.metrics = ServerMetrics(self.llm_engine.stats, lambda: self.engine.num_pending)
        self.created = now_s()
        self._token_text_cache: dict[int, str] = {}

    # ---- helpers -------------------------------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        """A token as the logprobs object names it: its text, or (like OpenAI) ``bytes:\\xNN`` for a piece
        of a multi-byte character, so distinct tokens keep distinct keys in ``top_logprobs``."""
        text = self._token_text_cache.get(token_id)
        if text is None:
            text = _token_text(self.tokenizer, token_id)
            self._token_text_cache[token_id] = text
        return text

    def token_width(self, token_id: int) -> int:
        """Characters the token adds to the text (for ``text_offset``; a byte piece counts as one)."""
        return len(self.tokenizer.decode([token_id], skip_special_tokens=False))

    def prompt_text(self, prompt: _Prompt) -> str:
        if prompt.text is not None:
            return prompt.text
        return self.tokenizer.decode(prompt.token_ids, skip_special_tokens=False)

    def check_model(self, model: str) -> None:
        if model != self.settings.served_model_name:
            raise APIError(400, f"model {model!r} is not served here; this server serves "
                           f"{self.settings.served_model_name!r} (see GET /v1/models)", param="model",
                           code="model_not_found")

    def encode_prompts(self, prompt: PromptField, param: str) -> list[_Prompt]:
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif not prompt:
            raise bad_request(f"{param} must not be an empty list", param)
        elif all(isinstance(t, int) for t in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        prompts = []
        for item in items:
            if isinstance(item, str):
                prompts.append(_Prompt(item, self.tokenizer.encode(item)))
            else:
                prompts.append(_Prompt(None, list(item)))
        return prompts

    def validate_prompt(self, prompt: _Prompt, max_tokens: int, param: str, index: int, count: int) -> None:
        try:
            self.llm_engine.validate_prompt(prompt.token_ids, max_tokens)
        except ValueError as exc:
            where = f"{param}[{index}]: " if count > 1 else ""
            code = "context_length_exceeded" if "max_model_len" in str(exc) else None
            raise bad_request(f"{where}{exc}", param, code) from None

    def deadline(self, arrival: float) -> float | None:
        timeout = self.settings.request_timeout_s
        return None if timeout is None else arrival + timeout

    def engine_error(self, exc: EngineError) -> APIError:
        """The HTTP error for an engine exception raised by a submission or its stream."""
        if isinstance(exc, DeadlineExceeded):
            return request_timeout(self.settings.request_timeout_s or 0.0)
        if isinstance(exc, EngineDeadError):
            return engine_dead(str(exc))
        if isinstance(exc, QueueFullError):
            return queue_full(str(exc))
        return APIError(500, f"the engine failed this request: {exc}", error_type="server_error",
                        code="request_failed")

    def submit(self, requests: list[EngineRequest], arrival: float, param: str) -> RequestStream:
        try:
            return self.engine.submit_many(requests, self.deadline(arrival))
        except ValueError as exc:
            raise bad_request(str(exc), param) from None
        except ENGINE_ERRORS as exc:
            raise self.engine_error(exc) from None

    async def collect(self, stream: RequestStream, observer: TokenLatencyObserver) -> dict[int, RequestOutput]:
        finals: dict[int, RequestOutput] = {}
        try:
            async with stream:
                async for index, output in stream:
                    observer.observe(index, output)
                    if output.finished:
                        finals[index] = output
        except ENGINE_ERRORS as exc:
            raise self.engine_error(exc) from None
        return finals

    # ---- /v1/completions -----------------------------------------------------------------------------
    def sampling_params(self, body: CompletionRequest) -> SamplingParams:
        if body.max_tokens == 0 and not body.echo:
            raise bad_request("max_tokens must be >= 1 (0 is only allowed with echo=true, to score the prompt)",
                              "max_tokens")
        if body.best_of is not None and body.best_of != body.n:
            raise bad_request("best_of is not supported (only best_of == n)", "best_of")
        if body.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if body.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")
        if body.prompt_logprobs is not None:
            raise bad_request("prompt_logprobs is not a request field; use echo=true with logprobs", "prompt_logprobs")
        values = {name: getattr(body, name) for name in SAMPLING_FIELDS}
        values["max_tokens"] = body.max_tokens or 1
        values["prompt_logprobs"] = body.logprobs if body.echo and body.logprobs is not None else None
        try:
            return SamplingParams(**values)
        except SettingsError as exc:
            raise bad_request(str(exc), exc.field) from None

    async def completions(self, body: CompletionRequest, arrival: float) -> Response:
        self.check_model(body.model)
        params = self.sampling_params(body)
        prompts = self.encode_prompts(body.prompt, "prompt")
        prefill_only = body.max_tokens == 0  # echo=true: the prompt, scored, and nothing generated
        for index, prompt in enumerate(prompts):
            self.validate_prompt(prompt, 0 if prefill_only else params.max_tokens, "prompt", index, len(prompts))
        self.metrics.prompt_tokens.inc(sum(len(p.token_ids) for p in prompts))
        assembler = _CompletionAssembler(self, body, prompts, prefill_only)
        completion_id, created = new_completion_id(), now_s()
        requests: list[EngineRequest] = []
        if prefill_only and body.logprobs is None:
            pass  # nothing for the engine to compute: the answer is the prompt itself
        elif prefill_only:
            scoring = SamplingParams(max_tokens=1, prompt_logprobs=body.logprobs)
            requests = [EngineRequest(p.token_ids, scoring, prefill_only=True, logprob_start=1) for p in prompts]
        else:
            requests = [EngineRequest(p.token_ids, params, prompt=p.text) for p in prompts]
        stream = self.submit(requests, arrival, "prompt")
        observer = TokenLatencyObserver(self.metrics, arrival)

        if body.stream:
            return await self._stream_completion(body, prompts, stream, observer, assembler, completion_id, created,
                                                 arrival)
        finals = await self.collect(stream, observer)
        if not finals:  # echo-only
            finals = {slot: _echo_only_output(p) for slot, p in enumerate(prompts)}
        choices = [choice for slot in sorted(finals) for choice in assembler.deltas(slot, finals[slot])]
        choices.sort(key=lambda choice: choice.index)
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        self._finish_metrics(assembler, arrival)
        response = CompletionResponse(id=completion_id, created=created, model=self.settings.served_model_name,
                                      choices=choices, usage=Usage(prompt_tokens=prompt_tokens,
                                                                   completion_tokens=assembler.completion_tokens,
                                                                   total_tokens=prompt_tokens +
                                                                   assembler.completion_tokens))
        return JSONResponse(dump(response))

    def _finish_metrics(self, assembler: _CompletionAssembler, arrival: float) -> None:
        self.metrics.generation_tokens.inc(assembler.completion_tokens)
        self.metrics.request_latency.observe(time.monotonic() - arrival)

    async def _stream_completion(self, body: CompletionRequest, prompts: list[_Prompt], stream: RequestStream,
                                 observer: TokenLatencyObserver, assembler: _CompletionAssembler,
                                 completion_id: str, created: int, arrival: float) -> Response:
        if stream.has_unfinished:
            # The first update decides the status code: errors before it are proper HTTP errors.
            try:
                first = [await stream.__anext__()]
            except ENGINE_ERRORS as exc:
                raise self.engine_error(exc) from None
            observer.observe(*first[0])
        else:
            first = [(slot, _echo_only_output(p)) for slot, p in enumerate(prompts)]
        model = self.settings.served_model_name

        def event(payload: dict[str, Any]) -> str:
            return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

        def chunk(choices: list[CompletionChoice]) -> str:
            return event(dump(CompletionResponse(id=completion_id, created=created, model=model, choices=choices)))

        async def events() -> AsyncIterator[str]:
            try:
                for slot, output in first:
                    choices = assembler.deltas(slot, output)
                    if choices:
                        yield chunk(choices)
                async for slot, output in stream:
                    observer.observe(slot, output)
                    choices = assembler.deltas(slot, output)
                    if choices:
                        yield chunk(choices)
                if body.stream_options is not None and body.stream_options.include_usage:
                    prompt_tokens = sum(len(p.token_ids) for p in prompts)
                    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=assembler.completion_tokens,
                                  total_tokens=prompt_tokens + assembler.completion_tokens)
                    yield event(dump(CompletionResponse(id=completion_id, created=created, model=model, choices=[],
                                                        usage=usage)))
                self._finish_metrics(assembler, arrival)
            except ENGINE_ERRORS as exc:  # the status line is already sent: report in-band, as OpenAI does
                yield event(self.engine_error(exc).body())
            finally:
                stream.abort_unfinished()  # the client went away, or an error: free the engine slots
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- /v1/score -----------------------------------------------------------------------------------
    async def score(self, body: ScoreRequest, arrival: float) -> Response:
        self.check_model(body.model)
        if body.mode == "loglikelihood":
            return await self.loglikelihood(body, arrival)
        if body.input is None:
            raise bad_request("input is required (the texts to score)", "input")
        try:
            window, stride = self.llm_engine.score_window(body.window, body.stride)
        except ValueError as exc:
            raise bad_request(str(exc), param_from_message(str(exc), {"window", "stride"}, "window")) from None
        prompts = self.encode_prompts(body.input, "input")
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        try:
            scores = await self.engine.score([(self.prompt_text(p), p.token_ids) for p in prompts], window, stride,
                                             body.return_token_logprobs, self.deadline(arrival), body.perplexity)
        except ScoreItemError as exc:
            where = f"input[{exc.index}]: " if len(prompts) > 1 else ""
            code = "context_length_exceeded" if "max_model_len" in exc.message else None
            raise bad_request(f"{where}{exc.message}", "input", code) from None
        except ValueError as exc:
            raise bad_request(str(exc), "input") from None
        except ENGINE_ERRORS as exc:
            self.metrics.prompt_tokens.inc(prompt_tokens)  # it was accepted, then failed or timed out
            raise self.engine_error(exc) from None
        self.metrics.prompt_tokens.inc(prompt_tokens)
        results = []
        for index, out in enumerate(scores):
            results.append(ScoreResult(
                index=index, num_tokens=out.num_tokens, nll=finite_or_none(out.nll),
                perplexity=finite_or_none(out.perplexity), num_bytes=out.num_bytes,
                bits_per_byte=finite_or_none(out.bits_per_byte), num_words=out.num_words,
                word_perplexity=finite_or_none(out.word_perplexity),
                byte_perplexity=finite_or_none(out.byte_perplexity),
                token_logprobs=None if out.token_logprobs is None else [clamp_logprob(v) for v in out.token_logprobs]))
        self.metrics.request_latency.observe(time.monotonic() - arrival)
        return JSONResponse(dump(ScoreResponse(model=self.settings.served_model_name, data=results,
                                               usage=Usage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens))))

    async def loglikelihood(self, body: ScoreRequest, arrival: float) -> Response:
        """``mode="loglikelihood"``: the pairs tokenized as lm-eval does, the shared contexts computed once."""
        pairs = self.loglikelihood_pairs(body)
        encoded = [encode_pair(context, continuation, self.tokenizer.encode, self.llm_engine.eot_token_id)
                   for context, continuation in pairs]
        prompt_tokens = sum(len(c) + len(x) for c, x in encoded)
        try:
            outputs = await self.engine.loglikelihood(encoded, body.return_token_logprobs, self.deadline(arrival))
        except ScoreItemError as exc:
            where = f"pairs[{exc.index}]: " if len(pairs) > 1 else ""
            code = "context_length_exceeded" if "max_model_len" in exc.message else None
            raise bad_request(f"{where}{exc.message}", "pairs" if body.pairs is not None else "continuation",
                              code) from None
        except ENGINE_ERRORS as exc:
            self.metrics.prompt_tokens.inc(prompt_tokens)
            raise self.engine_error(exc) from None
        self.metrics.prompt_tokens.inc(prompt_tokens)
        results = [LoglikelihoodResult(
            index=index, logprob=finite_or_none(out.logprob), is_greedy=out.is_greedy, num_tokens=out.num_tokens,
            token_logprobs=None if out.token_logprobs is None else [clamp_logprob(v) for v in out.token_logprobs])
            for index, out in enumerate(outputs)]
        self.metrics.request_latency.observe(time.monotonic() - arrival)
        return JSONResponse(dump(ScoreResponse(model=self.settings.served_model_name, data=results,
                                               usage=Usage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens))))

    @staticmethod
    def loglikelihood_pairs(body: ScoreRequest) -> list[tuple[str, str]]:
        for name in ("input", "window", "stride"):
            if getattr(body, name) is not None:
                raise bad_request(f"{name} only applies to mode=perplexity; loglikelihood takes pairs, or "
                                  "context and continuation", name)
        if body.pairs is not None:
            if body.context is not None or body.continuation is not None:
                raise bad_request("give pairs, or context and continuation, not both", "pairs")
            pairs = list(body.pairs)
        elif body.context is None or body.continuation is None:
            raise bad_request("mode=loglikelihood needs pairs, or context and continuation (lists of strings)",
                              "pairs" if body.context is None and body.continuation is None else
                              "continuation" if body.continuation is None else "context")
        elif len(body.context) != len(body.continuation):
            raise bad_request(f"context has {len(body.context)} entries and continuation {len(body.continuation)}; "
                              "they must pair up", "continuation")
        else:
            pairs = list(zip(body.context, body.continuation, strict=True))
        if not pairs:
            raise bad_request("no pairs to score", "pairs")
        return pairs

    # ---- the rest ------------------------------------------------------------------------------------
    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.settings.served_model_name, created=self.created,
                                         max_model_len=self.llm_engine.max_model_len)])

    def check_health(self) -> None:
        try:
            self.engine.check_health()
        except EngineDeadError as exc:
            raise engine_dead(str(exc)) from None


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (printable stand-ins for the 256 byte values), inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    stand_ins, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            stand_ins[chr(byte)] = byte
        else:
            stand_ins[chr(256 + extra)] = byte
            extra += 1
    return stand_ins


_BYTE_LEVEL = _byte_level_alphabet()


def _token_text(tokenizer: Any, token_id: int) -> str:
    piece = tokenizer.id_to_token(token_id)
    if piece is None:  # the model's vocabulary is padded beyond the tokenizer's
        return f"<|token_id:{token_id}|>"
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    if "\ufffd" not in text:
        return text
    if all(char in _BYTE_LEVEL for char in piece):
        return "bytes:" + "".join(f"\\x{_BYTE_LEVEL[char]:02x}" for char in piece)
    return piece


def _echo_only_output(prompt: _Prompt) -> RequestOutput:
    return RequestOutput(request_id="", prompt=prompt.text, prompt_token_ids=prompt.token_ids, outputs=[],
                         finished=True)


def _route_label(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def create_app(server: OpenAIServer) -> FastAPI:
    """The FastAPI app: ``/health`` is open; everything else requires the API key when one is set."""
    app = FastAPI(title="neox-ray", description="OpenAI-compatible GPT-NeoX endpoint", docs_url=None,
                  redoc_url=None, openapi_url=None)
    install_error_handlers(app, lambda request, status: server.metrics.count_request(_route_label(request), status))

    async def require_api_key(authorization: str | None = Header(default=None)) -> None:
        server.auth.check(authorization)

    def counted(request: Request, response: Response) -> Response:
        server.metrics.count_request(_route_label(request), response.status_code)
        return response

    @app.get("/health")
    async def health(request: Request) -> Response:
        server.check_health()
        return counted(request, JSONResponse({"status": "ok"}))

    protected = APIRouter(dependencies=[Depends(require_api_key)])

    @protected.get("/v1/models")
    async def models(request: Request) -> Response:
        return counted(request, JSONResponse(dump(server.models())))

    @protected.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        return counted(request, await server.completions(body, arrival))

    @protected.post("/v1/score")
    async def score(body: ScoreRequest, request: Request) -> Response:
        arrival = time.monotonic()
        return counted(request, await server.score(body, arrival))

    @protected.get("/metrics")
    async def metrics(request: Request) -> Response:
        payload, content_type = server.metrics.exposition()
        return counted(request, Response(payload, media_type=content_type))

    from neox_ray.serve.chat_routes import ChatRoutes  # it builds on OpenAIServer: import after this module

    ChatRoutes(server, server.settings.chat_template).add_routes(protected, counted)
    app.include_router(protected)
    return app
