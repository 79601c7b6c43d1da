"""The OpenAI-compatible FastAPI app over one shared :class:`AsyncLLMEngine`.

Every HTTP request becomes one or more engine requests (one per prompt; scoring fans out into windows
inside the engine) that join the engine's running batch. Their updates come back as the engine's merged
:class:`RequestStream`, which aborts whatever is unfinished the moment the HTTP request ends early
(client disconnect, timeout, error); here they are turned into OpenAI-shaped bodies or server-sent
events, and engine errors into HTTP statuses: ``max_queued_requests`` (503 + ``Retry-After``, the
engine's own pending count), ``request_timeout_s`` (408), a request the engine failed (500).

Hostile or careless input is answered before it costs anything: the body size (413, in
:mod:`neox_ray.serve.request_body`), then the prompt count, prompt characters, ``n`` and a request that
could never fit the queue (400, before tokenization); tokenization and prompt validation run on a small
thread pool, so a large prompt never stalls other clients' streams. A client that goes away mid-stream
ends its response quietly (its requests are aborted; no 500, no traceback).

No Ray import: the same app runs inside a Serve replica (:mod:`neox_ray.serve.deployment`) or in-process.
Generation, stop strings and detokenization are the engine's; schemas are :mod:`neox_ray.serve.protocol`'s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from neox_ray.engine.async_engine import (
    AsyncLLMEngine,
    DeadlineExceeded,
    EngineDeadError,
    EngineRequest,
    QueueFullError,
    RequestFailedError,
    RequestStream,
)
from neox_ray.engine.outputs import CompletionOutput, RequestOutput
from neox_ray.engine.sampling_params import SamplingParams
from neox_ray.engine.schema import SettingsError, short_repr
from neox_ray.engine.scoring import ScoreItemError, encode_pair
from neox_ray.serve.auth import APIKeyChecker
from neox_ray.serve.errors import (
    APIError,
    bad_request,
    engine_dead,
    install_error_handlers,
    param_from_message,
    queue_full,
    request_timeout,
)
from neox_ray.serve.metrics import ServerMetrics, TokenLatencyObserver
from neox_ray.serve.protocol import (
    SAMPLING_REQUEST_FIELDS,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    FinishReason,
    LoglikelihoodResult,
    ModelCard,
    ModelList,
    PromptField,
    ScoreRequest,
    ScoreResponse,
    ScoreResult,
    Usage,
    clamp_logprob,
    dump,
    finite_or_none,
    new_completion_id,
    now_s,
)
from neox_ray.serve.request_body import RequestBodyMiddleware

logger = logging.getLogger(__name__)

# Request fields copied into the engine's SamplingParams: derived from the schema, never listed here.
# prompt_logprobs is not one: echo=true with logprobs sets it (the response has no other place for them).
SAMPLING_FIELDS = frozenset(SAMPLING_REQUEST_FIELDS) - {"prompt_logprobs"}


# What the engine raises for one HTTP request's submission or stream; each maps onto an HTTP error.
EngineError = DeadlineExceeded | EngineDeadError | QueueFullError | RequestFailedError
ENGINE_ERRORS = (DeadlineExceeded, EngineDeadError, QueueFullError, RequestFailedError)


# Per-request limits (None: no limit of the server's own). OpenAI documents 2048 inputs per embeddings
# request and none for completions; vLLM sets none. These defaults stay far below what would hurt one replica.
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024      # 413 beyond it, before the body is parsed
DEFAULT_MAX_PROMPT_CHARS = 1024 * 1024        # characters of text prompts, summed over one request
DEFAULT_MAX_PROMPTS_PER_REQUEST = 256         # prompts (completions) or texts (score) in one request
TOKENIZER_THREADS = 4

# A code point in U+D800..U+DFFF: JSON can spell one alone ("\ud800"), but it is not text.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


T = TypeVar("T")

@dataclass
class ServerSettings:
    served_model_name: str
    request_timeout_s: float | None = None
    api_keys: tuple[str, ...] = ()
    chat_template: str | None = None   # a jinja file overriding the checkpoint's chat template
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES
    max_prompt_chars: int | None = DEFAULT_MAX_PROMPT_CHARS
    max_prompts_per_request: int | None = DEFAULT_MAX_PROMPTS_PER_REQUEST
    max_n: int | None = None                  # a cap below the schema's own bound on ``n``


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

    def __init__(self, server: OpenAIServer, body: CompletionRequest, prompts: list[_Prompt], prefill_only: bool):
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
            choices.append(CompletionChoice(index=index, text=text, logprobs=logprobs,
                                            finish_reason=cast(FinishReason | None, finish_reason)))
        return choices

    def _finish_reason(self, sample: CompletionOutput | None, output: RequestOutput) -> str | None:
        if sample is None:
            return "length" if output.finished else None  # echo with max_tokens=0
        return sample.finish_reason

    def _add_logprobs(self, logprobs: CompletionLogprobs, index: int, token_ids: list[int],
                      entries: Sequence[dict[int, float] | None] | None) -> None:
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
        self._tokenizer_pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="neox-ray-tokenize")

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
            raise APIError(400, f"model {short_repr(model[:64])} is not served here; this server serves "
                           f"{self.settings.served_model_name!r} (see GET /v1/models)", param="model",
                           code="model_not_found")

    @staticmethod
    def prompt_items(prompt: PromptField, param: str) -> list[str | list[int]]:
        """The request's prompts, one item each (a text, or a list of token ids)."""
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise bad_request(f"{param} must not be an empty list", param)
        if all(isinstance(t, int) for t in prompt):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]

    def check_request_size(self, body: BaseModel, items: list[str | list[int]], param: str,
                           sequences: int) -> None:
        """The limits a request is held to before tokenization: any lone surrogate in its text fields, the
        number of prompts, their characters, and ``sequences`` (what it would queue) against the queue."""
        check_text_fields(body)
        settings = self.settings
        if settings.max_prompts_per_request is not None and len(items) > settings.max_prompts_per_request:
            raise bad_request(f"{param} holds {len(items)} prompts; this server accepts at most "
                              f"{settings.max_prompts_per_request} per request (max_prompts_per_request)", param)
        chars = sum(len(item) for item in items if isinstance(item, str))
        if settings.max_prompt_chars is not None and chars > settings.max_prompt_chars:
            raise bad_request(f"{param} holds {chars} characters; this server accepts at most "
                              f"{settings.max_prompt_chars} per request (max_prompt_chars)", param,
                              "context_length_exceeded")
        limit = self.engine.max_queued_requests
        if limit is not None and sequences > limit:
            raise bad_request(f"this request needs {sequences} sequences (prompts x n), more than this server "
                              f"ever queues (max_queued_requests={limit}); split it into smaller requests",
                              "n" if sequences > len(items) else param)

    def check_n(self, n: int) -> None:
        if self.settings.max_n is not None and n > self.settings.max_n:
            raise bad_request(f"n must be <= {self.settings.max_n} on this server, got {n}", "n")

    async def on_tokenizer_threads(self, function: Callable[..., T], *args: Any) -> T:
        """Runs ``function(*args)`` on the tokenizer threads, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, function, *args)

    async def prepare_prompts(self, items: list[str | list[int]], param: str, max_tokens: int | None,
                              decode_ids: bool = False) -> list[_Prompt]:
        """Tokenizes and validates on the tokenizer threads (the event loop keeps serving other clients).
        ``max_tokens`` set: each prompt must leave room for it (completions); unset: only token ids are
        checked (scoring windows long texts itself). ``decode_ids``: token-id prompts get their text too."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_pool, self._prepare_prompts, items, param, max_tokens,
                                          decode_ids)

    def _prepare_prompts(self, items: list[str | list[int]], param: str, max_tokens: int | None,
                         decode_ids: bool) -> list[_Prompt]:
        texts = [item for item in items if isinstance(item, str)]
        encoded = iter(self.tokenizer.encode_batch(texts) if texts else [])  # encode_batch releases the GIL
        prompts = []
        for index, item in enumerate(items):
            prompt = _Prompt(item, next(encoded)) if isinstance(item, str) else _Prompt(None, list(item))
            where = f"{param}[{index}]: " if len(items) > 1 else ""
            try:
                if max_tokens is not None:
                    self.llm_engine.validate_prompt(prompt.token_ids, max_tokens)
                else:
                    self.llm_engine.validate_token_ids(prompt.token_ids)
            except ValueError as exc:
                code = "context_length_exceeded" if "max_model_len" in str(exc) else None
                raise bad_request(f"{where}{exc}", param, code) from None
            if decode_ids and prompt.text is None:
                prompt.text = self.prompt_text(prompt)
            prompts.append(prompt)
        return prompts

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
        self.check_n(body.n)
        items = self.prompt_items(body.prompt, "prompt")
        prefill_only = body.max_tokens == 0  # echo=true: the prompt, scored, and nothing generated
        # What the engine would queue: n samples per prompt; echo scores each prompt once (a plain echo: nothing).
        samples = body.n if not prefill_only else 1 if body.logprobs is not None else 0
        sequences = len(items) * samples
        self.check_request_size(body, items, "prompt", sequences)
        prompts = await self.prepare_prompts(items, "prompt", 0 if prefill_only else params.max_tokens)
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

        event = sse_event

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

        return EventStreamResponse(events(), media_type="text/event-stream",
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
        items = self.prompt_items(body.input, "input")
        self.check_request_size(body, items, "input", len(items))
        prompts = await self.prepare_prompts(items, "input", None, decode_ids=True)
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        score_items = [(p.text or "", p.token_ids) for p in prompts]
        # Counted before the engine slices any window (rolling windows are disjoint: one per `window` tokens).
        self.check_score_windows(prompts, window, window if body.perplexity == "rolling" else stride)
        try:
            scores = await self.engine.score(score_items, window, stride, body.return_token_logprobs,
                                             self.deadline(arrival), body.perplexity)
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

    def check_score_windows(self, prompts: list[_Prompt], window: int, stride: int) -> None:
        """A 400 if the texts need more windows than the queue ever holds (counted, not built)."""
        limit = self.engine.max_queued_requests
        windows = sum(score_window_count(len(p.token_ids), window, stride) for p in prompts)
        if limit is not None and windows > limit:
            raise bad_request(f"these texts need {windows} scoring windows, more than this server ever queues "
                              f"(max_queued_requests={limit}); send fewer or shorter texts, or a larger stride",
                              "input")

    async def loglikelihood(self, body: ScoreRequest, arrival: float) -> Response:
        """``mode="loglikelihood"``: the pairs tokenized as lm-eval does, the shared contexts computed once."""
        pairs = self.loglikelihood_pairs(body)
        param = "pairs" if body.pairs is not None else "continuation"
        self.check_request_size(body, [context + continuation for context, continuation in pairs], param, len(pairs))
        encoded = await self.on_tokenizer_threads(
            lambda: [encode_pair(context, continuation, self.tokenizer.encode, self.llm_engine.eot_token_id)
                     for context, continuation in pairs])
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
            pairs = [(context, continuation) for context, continuation in body.pairs]
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


class EventStreamResponse(StreamingResponse):
    """Server-sent events whose client may leave mid-stream: that ends the response quietly (the events
    generator is closed at once, aborting its engine requests), not as a 500 with a traceback. Servers say
    so in different ways: ``http.disconnect`` (uvicorn), a failing ``send`` (ASGI 2.4), a failing ``receive``
    (Ray Serve's replica raises ``TaskCancelledError`` there); the last is read as a disconnect."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def receive_or_disconnect() -> Message:
            try:
                return await receive()
            except Exception:  # only used to listen for a disconnect: a client we cannot hear from is gone
                logger.debug("receive failed mid-stream; treating it as a disconnect", exc_info=True)
                return {"type": "http.disconnect"}

        try:
            await super().__call__(scope, receive_or_disconnect, send)
        except (ClientDisconnect, OSError):
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


def sse_event(payload: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON payload (compact, as OpenAI's streams send it)."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def score_window_count(num_text_tokens: int, window: int, stride: int) -> int:
    """``len(plan_windows(num_text_tokens, window, stride))`` (:mod:`neox_ray.engine.scoring`) without building
    them: windows start every ``stride`` tokens of the text plus its leading end-of-text token, until one
    reaches the end."""
    total = num_text_tokens + 1
    if total < 2:
        return 0
    return 1 if total <= window else 1 + -(-(total - window) // stride)


def check_text_fields(body: BaseModel) -> None:
    """400 naming the field if a text field holds a lone surrogate (JSON can spell one: ``"\\ud800"``), which
    no tokenizer or JSON encoder accepts. Lists of token ids are not walked."""
    for name in body.model_fields_set:
        if _has_lone_surrogate(getattr(body, name)):
            raise bad_request(f"{name} holds a lone UTF-16 surrogate (U+D800..U+DFFF), which is not valid text",
                              name)


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return _LONE_SURROGATE.search(value) is not None
    if isinstance(value, list):  # homogeneous by the schema: texts, or token ids (never walked)
        return bool(value) and not isinstance(value[0], int) and any(_has_lone_surrogate(item) for item in value)
    if isinstance(value, dict):
        return any(_has_lone_surrogate(key) or _has_lone_surrogate(item) for key, item in value.items())
    if isinstance(value, BaseModel):
        return any(_has_lone_surrogate(getattr(value, name)) for name in value.model_fields_set)
    return False


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


def _path_label(app: FastAPI, scope: Scope) -> str:
    """The route label of a request answered before routing (by the body middleware)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    path = path[len(root):] if root and path.startswith(root) else path
    return path if path in _route_paths(app.routes) else "unmatched"


def _route_paths(routes: Sequence[Any]) -> set[str]:
    """Every route's path, including those of included routers (FastAPI may keep those nested)."""
    paths: set[str] = set()
    for route in routes:
        path = getattr(route, "path", None)
        if isinstance(path, str):
            paths.add(path)
        nested = getattr(getattr(route, "original_router", None), "routes", None)
        if nested:
            paths |= _route_paths(nested)
    return paths


def create_app(server: OpenAIServer) -> FastAPI:
    """The FastAPI app: ``/health`` is open; everything else requires the API key when one is set."""
    app = FastAPI(title="neox-ray", description="OpenAI-compatible GPT-NeoX endpoint", docs_url=None,
                  redoc_url=None, openapi_url=None)
    install_error_handlers(app, lambda request, status: server.metrics.count_request(_route_label(request), status))
    app.add_middleware(RequestBodyMiddleware, max_body_bytes=server.settings.max_body_bytes,
                       on_rejected=lambda scope, status: server.metrics.count_request(_path_label(app, scope), status))

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
        """This replica's Prometheus series only; the service-wide view is Ray's metrics export (README, Metrics)."""
        payload, content_type = server.metrics.exposition()
        return counted(request, Response(payload, media_type=content_type))

    from neox_ray.serve.chat_routes import ChatRoutes  # it builds on OpenAIServer: import after this module

    ChatRoutes(server, server.settings.chat_template).add_routes(protected, counted)
    app.include_router(protected)
    return app
