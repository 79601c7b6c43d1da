"""One continuous-batching loop shared by many concurrent callers.

:class:`AsyncLLMEngine` runs :meth:`LLMEngine.step` on a background thread. Callers on any thread or
event loop submit requests and receive every update as it is produced: an async iterator for the Serve
deployment (streaming), a future for the Ray Data stage. New requests join the running batch at the
next step; a cancelled caller (a client that disconnected) aborts its request, freeing its KV blocks at
once. If a step raises, the engine is marked dead, every waiting caller gets the error, and
:meth:`check_health` raises so the hosting replica or actor can be replaced.

The engine object itself is only ever touched by the loop thread; callers talk to it through a command
queue, so there are no locks around model code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from neox_ray.engine.llm_engine import LLMEngine
from neox_ray.engine.outputs import RequestOutput
from neox_ray.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

Sink = Callable[[RequestOutput | None, BaseException | None], None]


class EngineDeadError(RuntimeError):
    """The engine loop stopped after an error; the hosting process should be replaced."""


class QueueFullError(RuntimeError):
    """More requests are waiting than ``max_queued_requests`` allows; retry later."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    prefill_only: bool
    logprob_start: int | None
    sink: Sink


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

    def submit(self, prompt_token_ids: list[int], params: SamplingParams, sink: Sink,
               request_id: str | None = None, prompt: str | None = None, prefill_only: bool = False,
               logprob_start: int | None = None) -> str:
        """Validates (raising ValueError in the caller), then queues. ``sink`` gets every update, and
        ``(None, error)`` if the request fails."""
        self.check_health()
        self.engine.validate_prompt(list(prompt_token_ids), 0 if prefill_only else params.max_tokens)
        with self._pending_lock:
            if self.max_queued_requests is not None and self._num_pending >= self.max_queued_requests:
                raise QueueFullError(f"{self._num_pending} requests pending (limit {self.max_queued_requests})")
            self._num_pending += 1
        request_id = request_id or uuid.uuid4().hex
        self._commands.put(_Add(request_id, list(prompt_token_ids), params, prompt, prefill_only, logprob_start, sink))
        self._wakeup.set()
        return request_id

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
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()

        def sink(output: RequestOutput | None, error: BaseException | None) -> None:
            loop.call_soon_threadsafe(updates.put_nowait, (output, error))

        request_id = self.submit(prompt_token_ids, params, sink, request_id=request_id, **kwargs)
        finished = False
        try:
            while True:
                output, error = await updates.get()
                if error is not None:
                    raise error
                yield output
                if output.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

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
                try:
                    self.engine.add_request(command.prompt_token_ids, command.params, command.request_id,
                                            command.prompt, command.prefill_only, command.logprob_start)
                    self._sinks[command.request_id] = command.sink
                except Exception as exc:  # validation raced with a config change, duplicate id, ...
                    self._release_pending()
                    command.sink(None, exc)
            else:
                _, request_id = command
                if self.engine.abort(request_id):
                    self._release_pending()
                self._sinks.pop(request_id, None)

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
                    if sink is not None:
                        sink(output, None)
        except BaseException as exc:  # the engine is unusable now: fail everyone waiting
            logger.exception("engine loop died")
            self.error = exc
            dead = EngineDeadError(f"engine loop died: {exc!r}")
            for sink in self._sinks.values():
                sink(None, dead)
            self._sinks.clear()
            while True:  # fail requests submitted but never added
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                if isinstance(command, _Add):
                    command.sink(None, dead)
