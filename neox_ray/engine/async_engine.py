"""One continuous-batching loop shared by many concurrent callers.

:class:`AsyncLLMEngine` runs :meth:`LLMEngine.step` on a background thread. Callers on any thread or
event loop submit requests and receive every update as it is produced: an async iterator for the Serve
deployment (streaming; :meth:`AsyncLLMEngine.submit_many` merges several requests into one
:class:`RequestStream` of ``(index, output)`` with a deadline), a future for the Ray Data stage. Scoring
fans a text out into window requests and back (:meth:`score` for event loops, :meth:`score_futures` for
threads); :meth:`loglikelihood_futures` submits the first pair of each shared context at once and the others
when it finished, so they reuse its cached blocks. New requests join the running batch at the next step; a
consumer that stops early (a client that disconnected, a deadline, an error) aborts its unfinished requests,
freeing their KV blocks at once.

A failure the engine can pin on one request (see :meth:`LLMEngine.step`) fails only that request: its
caller gets :class:`RequestFailedError` and the loop goes on. If a step raises, the engine is marked
dead, every waiting caller gets the error, and :meth:`check_health` raises so the hosting replica or
actor can be replaced.

The engine object itself is only ever touched by the loop thread (validation aside, which reads only
fixed sizes); callers talk to it through a command queue, so there are no locks around model code.
What the updates mean to a client (HTTP bodies, metrics, rows) is the caller's business.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from neox_ray.engine.llm_engine import LOGLIKELIHOOD_PARAMS, LLMEngine, RequestFailedError
from neox_ray.engine.outputs import RequestOutput, ScoreOutput
from neox_ray.engine.sampling_params import SamplingParams
from neox_ray.engine.scoring import (
    LoglikelihoodItems,
    LoglikelihoodOutput,
    LoglikelihoodPlan,
    LoglikelihoodTask,
    ScoreItemError,
    ScoreItems,
    ScoreTask,
)

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLMEngine", "DeadlineExceeded", "EngineDeadError", "EngineRequest", "QueueFullError",
           "RequestFailedError", "RequestStream"]

Sink = Callable[[RequestOutput | None, BaseException | None], None]


class EngineDeadError(RuntimeError):
    """The engine loop stopped after an error; the hosting process should be replaced."""


class QueueFullError(RuntimeError):
    """More requests are waiting than ``max_queued_requests`` allows; retry later."""


class DeadlineExceeded(TimeoutError):
    """A :class:`RequestStream` passed its deadline; its unfinished requests were aborted."""


@dataclass(frozen=True)
class EngineRequest:
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    prefill_only: bool = False
    logprob_start: int | None = None
    request_id: str | None = None
    cache_prefix: bool = True  # False: its blocks stay out of the prefix cache (perplexity windows)


_WINDOW_PARAMS = SamplingParams(max_tokens=1)  # scoring windows: prefill only, nothing sampled


@dataclass
class _Add:
    request_id: str
    request: EngineRequest
    sink: Sink


class RequestStream:
    """Several engine requests read back as one async stream of ``(index, output)``, in arrival order.

    Made by :meth:`AsyncLLMEngine.submit_many`, which has already queued every request (or none). The
    stream raises :class:`DeadlineExceeded` past its deadline and re-raises a request's error; in either
    case, and whenever the consumer stops early (use ``async with``, or call :meth:`abort_unfinished` in
    ``finally``), every unfinished request is aborted.
    """

    def __init__(self, engine: AsyncLLMEngine, deadline: float | None):
        self._engine = engine
        self.deadline = deadline
        self._loop = asyncio.get_running_loop()
        self._updates: asyncio.Queue = asyncio.Queue()
        self._request_ids: list[str] = []
        self._unfinished: set[int] = set()

    def _sink(self, index: int) -> Sink:
        def sink(output: RequestOutput | None, error: BaseException | None) -> None:
            self._loop.call_soon_threadsafe(self._updates.put_nowait, (index, output, error))
        return sink

    def _add(self, request_id: str) -> None:
        self._unfinished.add(len(self._request_ids))
        self._request_ids.append(request_id)

    @property
    def has_unfinished(self) -> bool:
        return bool(self._unfinished)

    def abort_unfinished(self) -> None:
        for index in self._unfinished:
            self._engine.abort(self._request_ids[index])
        self._unfinished.clear()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self._unfinished:
            raise StopAsyncIteration
        try:
            timeout = None if self.deadline is None else self.deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                raise DeadlineExceeded()
            try:
                index, output, error = await asyncio.wait_for(self._updates.get(), timeout)
            except asyncio.TimeoutError:
                raise DeadlineExceeded() from None
            if error is not None:
                self._unfinished.discard(index)
                raise error
        except BaseException:  # deadline, a request's error, the consumer cancelled
            self.abort_unfinished()
            raise
        if output.finished:
            self._unfinished.discard(index)
        return index, output

    async def collect(self) -> dict[int, RequestOutput]:
        """Every request's final output, by index."""
        finals: dict[int, RequestOutput] = {}
        async with self:
            async for index, output in self:
                if output.finished:
                    finals[index] = output
        return finals

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.abort_unfinished()


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_queued_requests: int | None = None):
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self._commands: queue.Queue = queue.Queue()
        self._sinks: dict[str, Sink] = {}
        self._wakeup = threading.Event()
        self._stopped = False
        self.error: BaseException | None = None
        self._num_pending = 0  # submitted, not yet finished; changed by callers and the loop thread
        self._pending_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="neox-ray-engine", daemon=True)
        self._thread.start()

    # ---- caller side ---------------------------------------------------------------------------------
    def check_health(self) -> None:
        if self.error is not None:
            raise EngineDeadError(f"engine loop died: {self.error!r}") from self.error
        if not self._thread.is_alive():
            raise EngineDeadError("engine loop is not running")

    @property
    def num_pending(self) -> int:
        return self._num_pending

    def _validate(self, request: EngineRequest) -> None:
        self.engine.validate_prompt(list(request.prompt_token_ids),
                                    0 if request.prefill_only else request.params.max_tokens, request.prefill_only)

    def _reserve(self, count: int) -> None:
        """Counts ``count`` more pending requests, all or none (QueueFullError past the limit)."""
        with self._pending_lock:
            limit = self.max_queued_requests
            if limit is not None and self._num_pending + count > limit:
                raise QueueFullError(f"{self._num_pending} requests pending (limit {limit})")
            self._num_pending += count

    def _enqueue(self, request: EngineRequest, sink: Sink) -> str:
        request_id = request.request_id or uuid.uuid4().hex
        self._commands.put(_Add(request_id, request, sink))
        self._wakeup.set()
        return request_id

    def submit(self, prompt_token_ids: list[int], params: SamplingParams, sink: Sink,
               request_id: str | None = None, prompt: str | None = None, prefill_only: bool = False,
               logprob_start: int | None = None) -> str:
        """Validates (raising ValueError in the caller), then queues. ``sink`` gets every update, and
        ``(None, error)`` if the request fails."""
        request = EngineRequest(list(prompt_token_ids), params, prompt, prefill_only, logprob_start, request_id)
        self.check_health()
        self._validate(request)
        self._reserve(1)
        return self._enqueue(request, sink)

    def submit_many(self, requests: Sequence[EngineRequest], deadline: float | None = None) -> RequestStream:
        """Queues every request or none (ValueError, QueueFullError, EngineDeadError raise here, before
        anything runs) and returns their merged stream; call from the event loop that will read it.
        ``deadline`` is a ``time.monotonic()`` instant."""
        stream = RequestStream(self, deadline)
        self.check_health()
        for request in requests:
            self._validate(request)
        self._reserve(len(requests))
        for index, request in enumerate(requests):
            stream._add(self._enqueue(request, stream._sink(index)))
        return stream

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wakeup.set()

    def submit_and_wait(self, prompt_token_ids: list[int], params: SamplingParams, **kwargs) -> \
            concurrent.futures.Future:
        """A future resolved with the final :class:`RequestOutput` (for threaded callers)."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def sink(output: RequestOutput | None, error: BaseException | None) -> None:
            if error is not None:
                if not future.done():
                    future.set_exception(error)
            elif output is not None and output.finished and not future.done():
                future.set_result(output)

        self.submit(prompt_token_ids, params, sink, **kwargs)
        return future

    async def stream(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                     **kwargs) -> AsyncIterator[RequestOutput]:
        """Yields each update of one request; cancelling the consumer aborts the request."""
        request = EngineRequest(list(prompt_token_ids), params, request_id=request_id, **kwargs)
        async with self.submit_many([request]) as updates:
            async for _, output in updates:
                yield output

    # ---- scoring -------------------------------------------------------------------------------------
    async def score(self, items: ScoreItems, window: int | None = None,
                    stride: int | None = None, keep_token_logprobs: bool = False,
                    deadline: float | None = None, perplexity: str = "sliding") -> list[ScoreOutput]:
        """:meth:`LLMEngine.score` for an event loop: raises ValueError for a bad window/stride and
        :class:`ScoreItemError` for a text that cannot be scored (before anything runs), then the
        errors of :meth:`submit_many` and of its stream."""
        plan = self.engine.plan_scores(items, window, stride, perplexity)
        plan.raise_first_error()
        windows = plan.requests()
        finals = await self.submit_many([EngineRequest(w.token_ids, _WINDOW_PARAMS, prefill_only=True,
                                                       logprob_start=w.logprob_start, cache_prefix=False)
                                         for w in windows],
                                        deadline).collect()
        results = plan.assemble([finals[k].prompt_logprobs for k in range(len(windows))], keep_token_logprobs)
        return [results[item] for item in range(plan.num_items)]

    def score_futures(self, items: ScoreItems, window: int | None = None,
                      stride: int | None = None,
                      keep_token_logprobs: bool = False,
                      perplexity: str = "sliding") -> list[concurrent.futures.Future]:
        """One future per text (for threaded callers), resolved with its :class:`ScoreOutput` or failed
        with its own error (:class:`ScoreItemError` if it cannot be scored); a bad window/stride raises."""
        plan = self.engine.plan_scores(items, window, stride, perplexity)
        futures = []
        for item in range(plan.num_items):
            future: concurrent.futures.Future = concurrent.futures.Future()
            if item in plan.errors:
                future.set_exception(ScoreItemError(item, plan.errors[item]))
            else:
                try:
                    self._submit_score_task(plan.tasks[item], keep_token_logprobs, future)
                except Exception as exc:
                    future.set_exception(exc)
            futures.append(future)
        return futures

    async def loglikelihood(self, items: LoglikelihoodItems, keep_token_logprobs: bool = False,
                            deadline: float | None = None) -> list[LoglikelihoodOutput]:
        """:meth:`LLMEngine.loglikelihood` for an event loop: :class:`ScoreItemError` for the first bad pair
        (before anything runs), else every pair's result, or the first request's error; past ``deadline``
        (``time.monotonic()``) :class:`DeadlineExceeded` (the prefill-only requests already queued finish)."""
        plan = self.engine.plan_loglikelihood(items)
        plan.raise_first_error()
        futures = self.loglikelihood_futures(items, keep_token_logprobs, plan)
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            return list(await asyncio.wait_for(asyncio.gather(*(asyncio.wrap_future(f) for f in futures)), timeout))
        except asyncio.TimeoutError:
            raise DeadlineExceeded() from None

    def loglikelihood_futures(self, items: LoglikelihoodItems, keep_token_logprobs: bool = False,
                              plan: LoglikelihoodPlan | None = None) -> list[concurrent.futures.Future]:
        """One future per (context ids, continuation ids) pair, resolved with its
        :class:`LoglikelihoodOutput` or failed with its own error. The first pair of each shared context
        is submitted at once, the others when it finished, so the prefix cache serves them its context."""
        plan = plan if plan is not None else self.engine.plan_loglikelihood(items)
        futures: list[concurrent.futures.Future] = [concurrent.futures.Future() for _ in range(plan.num_items)]
        for item, message in plan.errors.items():
            futures[item].set_exception(ScoreItemError(item, message, "pair"))
        for group in plan.groups():
            first, rest = group[0], group[1:]
            self._submit_loglikelihood(plan.tasks[first], keep_token_logprobs, futures[first])

            def submit_rest(_: concurrent.futures.Future, rest: list[int] = rest) -> None:
                for item in rest:  # whether the first succeeded or not: each pair has its own outcome
                    self._submit_loglikelihood(plan.tasks[item], keep_token_logprobs, futures[item])
            futures[first].add_done_callback(submit_rest)
        return futures

    def _submit_loglikelihood(self, task: LoglikelihoodTask, keep_token_logprobs: bool,
                              future: concurrent.futures.Future) -> None:
        def sink(output: RequestOutput | None, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            elif output is not None and output.finished:
                try:
                    future.set_result(task.finish(output.prompt_logprobs or [], keep_token_logprobs))
                except Exception as exc:
                    future.set_exception(exc)
        try:
            self.submit(task.token_ids, LOGLIKELIHOOD_PARAMS, sink, prefill_only=True,
                        logprob_start=task.logprob_start)
        except Exception as exc:
            future.set_exception(exc)

    def _submit_score_task(self, task: ScoreTask, keep_token_logprobs: bool,
                           future: concurrent.futures.Future) -> None:
        windows = task.requests()
        self.check_health()
        self._reserve(len(windows))
        finals: list[RequestOutput | None] = [None] * len(windows)
        request_ids: list[str] = []

        def sink_for(k: int) -> Sink:  # sinks run on the loop thread only
            def sink(output: RequestOutput | None, error: BaseException | None) -> None:
                if future.done():
                    return
                if error is not None:
                    future.set_exception(error)
                    for request_id in request_ids:
                        self.abort(request_id)
                    return
                if output is None or not output.finished:
                    return
                finals[k] = output
                if all(f is not None for f in finals):
                    try:
                        future.set_result(task.finish([f.prompt_logprobs or [] for f in finals if f is not None],
                                                      keep_token_logprobs))
                    except Exception as exc:
                        future.set_exception(exc)
            return sink

        for k, (token_ids, logprob_start) in enumerate(windows):
            request = EngineRequest(token_ids, _WINDOW_PARAMS, prefill_only=True, logprob_start=logprob_start,
                                    cache_prefix=False)
            request_ids.append(self._enqueue(request, sink_for(k)))

    def shutdown(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=10)

    # ---- loop thread ---------------------------------------------------------------------------------
    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                request = command.request
                try:
                    self.engine.add_request(request.prompt_token_ids, request.params, command.request_id,
                                            request.prompt, request.prefill_only, request.logprob_start,
                                            request.cache_prefix)
                    self._sinks[command.request_id] = command.sink
                except Exception as exc:  # validation raced with a config change, duplicate id, ...
                    self._release_pending()
                    self._deliver(command.request_id, command.sink, None, exc)
            else:
                _, request_id = command
                if self.engine.abort(request_id):
                    self._release_pending()
                self._sinks.pop(request_id, None)

    def _deliver(self, request_id: str, sink: Sink, output: RequestOutput | None,
                 error: BaseException | None) -> None:
        """Calls a caller's sink; one that raises (its event loop closed: the caller is gone) loses its
        request, never the loop."""
        try:
            sink(output, error)
        except Exception:
            logger.warning("the caller of request %s is gone; aborting it", request_id, exc_info=True)
            if self._sinks.pop(request_id, None) is not None and self.engine.abort(request_id):
                self._release_pending()

    def _release_pending(self) -> None:
        with self._pending_lock:
            self._num_pending -= 1

    def _loop(self) -> None:
        try:
            while not self._stopped:
                self._drain_commands()
                if not self.engine.has_unfinished():
                    self._wakeup.wait(timeout=0.5)
                    self._wakeup.clear()
                    continue
                for output in self.engine.step():
                    sink = self._sinks.get(output.request_id)
                    if output.finished:
                        self._sinks.pop(output.request_id, None)
                        self._release_pending()
                    if sink is None:
                        continue
                    if output.error is not None:  # this request failed; the engine goes on
                        self._deliver(output.request_id, sink, None,
                                      RequestFailedError(output.request_id, output.error))
                    else:
                        self._deliver(output.request_id, sink, output, None)
        except BaseException as exc:  # the engine is unusable now: fail everyone waiting
            logger.exception("engine loop died")
            self.error = exc
            dead = EngineDeadError(f"engine loop died: {exc!r}")
            for request_id, sink in list(self._sinks.items()):
                self._deliver(request_id, sink, None, dead)
            self._sinks.clear()
            while True:  # fail requests submitted but never added
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                if isinstance(command, _Add):
                    self._deliver(command.request_id, command.sink, None, dead)
