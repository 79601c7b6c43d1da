"""The engine loop: requests in, one scheduled step at a time, outputs (with text) out.

``LLMEngine`` owns the tokenizer, the scheduler and an executor. ``add_request`` validates and queues a
request (``n`` samples become ``n`` sequences sharing the prompt's cached blocks); ``step`` schedules,
runs one forward pass through the executor, applies sampled tokens, detokenizes incrementally, checks
stop strings and returns the requests that changed; with ``async_scheduling`` the next forward pass runs
on a worker thread while that output processing happens. ``abort`` frees a request's blocks at once. A failure
that belongs to one request fails that request alone (``RequestOutput.error``; a failed forward pass is
rerun request by request to find out whose it is); only what cannot be pinned on a request raises.
``score`` fans texts out into prefill-only window requests (:mod:`neox_ray.engine.scoring`) and back;
``loglikelihood`` runs one prefill-only request per (context, continuation) pair, in two waves (the first
pair of each context, then the rest) so the prefix cache serves every shared context after computing it once.

Everything above it (``LLM`` for offline use, the Ray Data stage, the Serve deployment) drives this one
class; none has a generation loop of its own.
"""

from __future__ import annotations

import itertools
import logging
import operator
import time
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from neox_ray.config import ModelConfig
from neox_ray.engine.block_manager import BlockManager
from neox_ray.engine.engine_config import EngineConfig
from neox_ray.engine.executor import Executor, UniprocExecutor
from neox_ray.engine.outputs import CompletionOutput, RequestOutput, ScoreOutput
from neox_ray.engine.sampling_params import SamplingParams
from neox_ray.engine.scheduler import ScheduledSequence, Scheduler
from neox_ray.engine.scoring import (
    LoglikelihoodItems,
    LoglikelihoodOutput,
    LoglikelihoodPlan,
    ScoreItems,
    ScorePlan,
    plan_loglikelihood,
    plan_scores,
    validate_window,
)
from neox_ray.engine.sequence import Sequence
from neox_ray.engine.step import SAMPLING_KNOBS, SampleResult, SamplingRow, SequenceStep, StepInput, StepOutput
from neox_ray.hub import resolve_model
from neox_ray.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)

# Loglikelihood requests: prefill only; the top-1 alternative of each target says whether it is the argmax.
LOGLIKELIHOOD_PARAMS = SamplingParams(max_tokens=1, prompt_logprobs=1)

ExecutorFactory = Callable[[EngineConfig, ModelConfig, int], Executor]

# The sampler's knobs, read off a request's SamplingParams by name (no per-step validation).
_read_knobs = operator.attrgetter(*SAMPLING_KNOBS)


class RequestFailedError(RuntimeError):
    """The engine failed this request (and only it); the engine itself keeps serving others."""

    def __init__(self, request_id: str, error: str):
        super().__init__(error)
        self.request_id = request_id


@dataclass
class _LaunchedStep:
    """A scheduled step whose forward pass has started (or, without async_scheduling, already ran)."""
    scheduled: list[ScheduledSequence]
    runnable: list[SequenceStep]
    released: list[int]                  # ended sequences' ids this pass told the runner about
    result: Future[StepOutput]


@dataclass
class _SampleState:
    seq: Sequence
    detokenizer: IncrementalDetokenizer | None
    text: str = ""
    visible_len: int = 0                 # chars safe to show while running (a stop string may still match)
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    stop_reason: str | int | None = None


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_SampleState]
    prompt_logprobs: dict[int, dict[int, float]] | None = None  # position -> {token: logprob}
    logprob_start: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    aborted: bool = False

    @property
    def finished(self) -> bool:
        return all(s.seq.is_finished for s in self.samples)


class LLMEngine:
    def __init__(self, config: EngineConfig, executor_factory: ExecutorFactory | None = None):
        # A hub id is resolved to its local snapshot once, here; everything below (and every shard-group
        # rank, on this node) reads that directory.
        self.model_dir = resolve_model(config.model, config.revision, config.allow_pickle)
        config = config.model_copy(update={"model": self.model_dir, "revision": None})
        self.config = config
        self.model_config = ModelConfig.from_pretrained(config.model)
        self.tokenizer = Tokenizer.from_pretrained(config.model)
        self.max_model_len = self.model_config.resolve_max_model_len(config.max_model_len)
        if self.max_model_len > self.model_config.default_max_model_len:
            logger.warning("max_model_len %d exceeds what the model was trained for (%d positions): expect "
                           "degraded output past that", self.max_model_len, self.model_config.default_max_model_len)
        factory = executor_factory or UniprocExecutor
        self.executor = factory(config, self.model_config, self.max_model_len)
        self.block_manager = BlockManager(self.executor.num_kv_blocks, config.block_size,
                                          config.enable_prefix_caching,
                                          prefer_contiguous=self.executor.prefers_contiguous_kv)
        eos = set(self.model_config.eos_token_ids) | set(self.tokenizer.eos_token_ids)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, eos)
        self.requests: dict[str, _RequestState] = {}
        self._seq_to_request: dict[int, tuple[_RequestState, _SampleState]] = {}
        # The runner's copy of each block table: (the sequence's preemption count, blocks sent) by seq_id;
        # steps send only what was appended since. Ended sequences are released with the next step.
        self._blocks_sent: dict[int, tuple[int, int]] = {}
        self._released_seq_ids: list[int] = []
        self._request_counter = itertools.count()
        self.num_generated_tokens = 0
        self.num_aborted = 0
        self.num_failed = 0
        self._failed: list[RequestOutput] = []               # failed requests' outputs, for the next return
        # async_scheduling: forward passes run on this thread, one at a time, while this one processes outputs.
        self._worker = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="neox-ray-forward")
                        if config.async_scheduling else None)
        self._in_flight: _LaunchedStep | None = None
        self._suspects: dict[str, RequestOutput] = {}        # failed alone; held until the engine works again

    # ---- requests ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    def validate_token_ids(self, token_ids: list[int]) -> None:
        """Raises ValueError for an out-of-vocabulary (or non-integer) token id."""
        for token in token_ids:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < self.vocab_size:
                raise ValueError(f"token id {token!r} is outside the vocabulary [0, {self.vocab_size})")

    def validate_prompt(self, prompt_token_ids: list[int], max_tokens: int, prefill_only: bool = False) -> None:
        """Raises ValueError for an empty prompt, an out-of-vocabulary id, or no room for max_tokens. A
        prefill-only prompt may hold max_model_len + 1 tokens: its last token is only a logprob target."""
        if not prompt_token_ids:
            raise ValueError("prompt is empty")
        self.validate_token_ids(prompt_token_ids)
        if prefill_only and len(prompt_token_ids) > self.max_model_len + 1:
            raise ValueError(f"prompt has {len(prompt_token_ids)} tokens; a prefill-only prompt (its last token "
                             f"only scored) may have at most max_model_len + 1 = {self.max_model_len + 1}")
        if not prefill_only and len(prompt_token_ids) + max_tokens > self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_token_ids)} tokens; with max_tokens={max_tokens} it exceeds "
                             f"max_model_len={self.max_model_len}")
        blocks = self.block_manager.blocks_needed(len(prompt_token_ids) + max_tokens)
        if blocks > self.block_manager.num_blocks:
            raise ValueError(f"prompt of {len(prompt_token_ids)} tokens + max_tokens={max_tokens} needs {blocks} KV "
                             f"cache blocks but the cache has {self.block_manager.num_blocks}")

    @property
    def eot_token_id(self) -> int:
        """The end-of-text token scoring conditions a text's first token on."""
        eot = self.tokenizer.eos_token_id
        eot = eot if eot is not None else self.model_config.eos_token_id
        if eot is None:
            raise ValueError("scoring needs an end-of-text token id; neither the tokenizer nor config.json has one")
        return eot

    def score_window(self, window: int | None, stride: int | None) -> tuple[int, int]:
        """Fills the defaults (window = max_model_len, stride = half of it) and validates."""
        window = window if window is not None else self.max_model_len
        stride = stride if stride is not None else max(1, window // 2)
        validate_window(window, stride, self.max_model_len)
        return window, stride

    def plan_scores(self, items: ScoreItems, window: int | None = None,
                    stride: int | None = None, perplexity: str = "sliding") -> ScorePlan:
        """(text, token ids) -> the window requests that score them; a bad window/stride raises ValueError,
        a text that cannot be scored becomes a per-item error of the plan. ``perplexity="rolling"`` plans
        lm-eval's rolling windows (``window + 1`` tokens each, the last only a target; stride unused)."""
        window, stride = self.score_window(window, stride)
        rolling = perplexity == "rolling"
        return plan_scores(items, self.eot_token_id, window, stride,
                           lambda ids: self.validate_prompt(ids, 0, prefill_only=rolling), perplexity)

    def plan_loglikelihood(self, items: LoglikelihoodItems) -> LoglikelihoodPlan:
        """(context ids, continuation ids) -> one prefill-only request per pair (lm-eval's truncation to
        max_model_len); a pair that cannot be scored becomes a per-item error of the plan."""
        return plan_loglikelihood(items, self.max_model_len,
                                  lambda ids: self.validate_prompt(ids, 0, prefill_only=True))

    def loglikelihood(self, items: LoglikelihoodItems, keep_token_logprobs: bool = False,
                      on_finished: Callable[[RequestOutput], None] | None = None) -> list[LoglikelihoodOutput]:
        """Scores every pair synchronously; raises :class:`ScoreItemError` for the first bad pair first."""
        return self.run_loglikelihood_plan(self.plan_loglikelihood(items), keep_token_logprobs, on_finished)

    def run_loglikelihood_plan(self, plan: LoglikelihoodPlan, keep_token_logprobs: bool = False,
                               on_finished: Callable[[RequestOutput], None] | None = None
                               ) -> list[LoglikelihoodOutput]:
        """Runs the plan in its two waves (each shared context is computed once, then served from the prefix
        cache); the pairs' results in item order."""
        plan.raise_first_error()
        results: dict[int, LoglikelihoodOutput] = {}
        for wave in plan.waves():
            request_ids = {self.add_request(plan.tasks[item].token_ids, LOGLIKELIHOOD_PARAMS, prefill_only=True,
                                            logprob_start=plan.tasks[item].logprob_start): item for item in wave}
            try:
                finals = self.run_until_finished(request_ids, on_finished)
            except RequestFailedError as exc:
                raise RequestFailedError(exc.request_id, f"pair {request_ids[exc.request_id]}: {exc}") from None
            for request_id, item in request_ids.items():
                results[item] = plan.tasks[item].finish(finals[request_id].prompt_logprobs or [],
                                                        keep_token_logprobs)
        return [results[item] for item in range(plan.num_items)]

    def score(self, items: ScoreItems, window: int | None = None,
              stride: int | None = None, keep_token_logprobs: bool = False,
              on_finished: Callable[[RequestOutput], None] | None = None,
              perplexity: str = "sliding") -> list[ScoreOutput]:
        """Scores every text synchronously (stepping this engine); raises :class:`ScoreItemError` for the
        first text that cannot be scored, before any compute."""
        return self.run_score_plan(self.plan_scores(items, window, stride, perplexity), keep_token_logprobs,
                                   on_finished)

    def run_score_plan(self, plan: ScorePlan, keep_token_logprobs: bool = False,
                       on_finished: Callable[[RequestOutput], None] | None = None) -> list[ScoreOutput]:
        """Runs the plan's window requests; the texts' metrics in item order. Raises
        :class:`ScoreItemError` first if the plan holds a text that cannot be scored."""
        plan.raise_first_error()
        window_params = SamplingParams(max_tokens=1)
        windows = plan.requests()
        # Perplexity windows are never a later prompt's prefix: kept out of the prefix cache.
        request_ids = [self.add_request(w.token_ids, window_params, prefill_only=True, logprob_start=w.logprob_start,
                                        cache_prefix=False) for w in windows]
        try:
            finals = self.run_until_finished(request_ids, on_finished)
        except RequestFailedError as exc:
            item = windows[request_ids.index(exc.request_id)].item
            raise RequestFailedError(exc.request_id, f"text {item}: {exc}") from None
        results = plan.assemble([finals[request_id].prompt_logprobs for request_id in request_ids],
                                keep_token_logprobs)
        return [results[item] for item in range(plan.num_items)]

    def run_until_finished(self, request_ids: Collection[str],
                           on_finished: Callable[[RequestOutput], None] | None = None) -> dict[str, RequestOutput]:
        """Steps until every one of ``request_ids`` finished; their final outputs by id. If one of them
        fails (:class:`RequestFailedError`), a step raises or the caller is interrupted, all the others
        are aborted first."""
        wanted = set(request_ids)
        finals: dict[str, RequestOutput] = {}
        try:
            while len(finals) < len(wanted):
                for output in self.step():
                    if output.finished and output.request_id in wanted:
                        if output.error is not None:
                            raise RequestFailedError(output.request_id, output.error)
                        finals[output.request_id] = output
                        if on_finished is not None:
                            on_finished(output)
        except BaseException:
            for request_id in wanted:
                self.abort(request_id)
            raise
        return finals

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    prompt: str | None = None, prefill_only: bool = False,
                    logprob_start: int | None = None, cache_prefix: bool = True) -> str:
        """Queues a request. ``prefill_only`` runs the prompt without generating (scoring / prompt logprobs);
        ``logprob_start`` asks for the logprob of every prompt token from that position on; ``cache_prefix=False``
        keeps its blocks out of the prefix cache (it may still read cached ones)."""
        request_id = request_id if request_id is not None else f"req-{next(self._request_counter)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        prompt_token_ids = list(prompt_token_ids)
        self.validate_prompt(prompt_token_ids, 0 if prefill_only else params.max_tokens, prefill_only)
        if params.prompt_logprobs is not None and logprob_start is None:
            logprob_start = 1
        state = _RequestState(request_id, prompt, prompt_token_ids, params, samples=[],
                              prompt_logprobs={} if logprob_start is not None else None,
                              logprob_start=logprob_start)
        num_samples = 1 if prefill_only else params.n
        for index in range(num_samples):
            seed = None if params.seed is None else params.seed + index * 7919  # distinct per sample, fixed
            seq = Sequence(request_id, prompt_token_ids, params, sample_index=index, seed=seed,
                           prefill_only=prefill_only, logprob_start=logprob_start if index == 0 else None,
                           cache_prefix=cache_prefix)
            detok = None if prefill_only else IncrementalDetokenizer(self.tokenizer, prompt_token_ids,
                                                                     params.skip_special_tokens)
            sample = _SampleState(seq, detok, logprobs=[] if params.logprobs is not None else None)
            state.samples.append(sample)
        for sample in state.samples:
            self.scheduler.add(sample.seq)
            self._seq_to_request[sample.seq.seq_id] = (state, sample)
        self.requests[request_id] = state
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stops a request now and frees its KV blocks. Returns False if it is unknown or already done."""
        if self._suspects.pop(request_id, None) is not None:
            self.num_aborted += 1
            return True
        state = self.requests.pop(request_id, None)
        if state is None:
            return False
        for sample in state.samples:
            self.scheduler.finish(sample.seq, "abort")
            self._forget(sample.seq.seq_id)
        self.num_aborted += 1
        return True

    def _forget(self, seq_id: int) -> None:
        """Drops an ended sequence; the runner drops its block table with the next step."""
        self._seq_to_request.pop(seq_id, None)
        if self._blocks_sent.pop(seq_id, None) is not None:
            self._released_seq_ids.append(seq_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._suspects) or self._in_flight is not None

    # ---- one step ------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedules and runs one forward pass; returns the requests that changed.

        A failure that belongs to one request (building its inputs, its part of a failed forward pass,
        recording its logprobs, detokenizing, stop checks, its output) finishes that request with
        ``error`` set and the step goes on for the others. What cannot be pinned on a request raises:
        the engine itself is broken.

        With ``async_scheduling`` the forward pass runs on a worker thread: a call collects the pass
        launched by the previous call, appends its tokens (eos, stop ids and max_tokens end sequences
        here), launches the next pass, and only then detokenizes, checks stop strings and builds the
        outputs of the collected one while the next runs. A sequence a stop string (or an abort) ends in
        that window has one more token computed, which is dropped.
        """
        if self._worker is None:
            launched = self._launch()
            if launched is None:
                self._blame_suspects()  # nothing else will run to tell a broken engine from a bad request
                return self._take_failed()
            step_output = self._collect(launched)
            return self._finish_step(self._apply(launched, step_output), step_output)
        collected, self._in_flight = self._in_flight, None
        changed: list[Sequence] = []
        step_output = StepOutput()
        if collected is not None:
            step_output = self._collect(collected)
            changed = self._apply(collected, step_output)
        self._in_flight = self._launch()
        if collected is None and self._in_flight is None:
            self._blame_suspects()
        return self._finish_step(changed, step_output)

    def _launch(self) -> _LaunchedStep | None:
        """Schedules a step, builds its inputs (failing requests whose inputs cannot be built) and starts
        the forward pass: on the worker thread with ``async_scheduling``, else here. None: nothing to run."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return None
        steps: list[SequenceStep] = []
        for item in scheduled:
            entry = self._seq_to_request.get(item.seq.seq_id)
            try:
                steps.append(self._sequence_step(item))
            except Exception as exc:
                if entry is None:
                    raise
                self._fail_request(entry[0], exc)
        runnable = [step for step in steps if step.seq_id in self._seq_to_request]
        result: Future[StepOutput] = Future()
        if not runnable:  # the releases wait for a pass that runs
            result.set_result(StepOutput())
            return _LaunchedStep(scheduled, runnable, [], result)
        released, self._released_seq_ids = self._released_seq_ids, []
        if self._worker is not None:
            result = self._worker.submit(self.executor.execute, StepInput(runnable, released))
        else:
            try:
                result.set_result(self.executor.execute(StepInput(runnable, released)))
            except Exception as exc:
                result.set_exception(exc)
        return _LaunchedStep(scheduled, runnable, released, result)

    def _collect(self, launched: _LaunchedStep) -> StepOutput:
        """The launched pass's output. If it failed, the step is split by request and rerun in halves
        (bisection: a few extra passes find the faulty request among many); requests that fail alone fail,
        the others' results are kept. If every request of a batch of several fails alone, or a lone request
        fails again while an earlier lone failure is still unexplained, the engine is broken and the first
        error is raised."""
        try:
            step_output = launched.result.result()
        except Exception as exc:
            first_error = exc
            self._released_seq_ids[:0] = launched.released  # sent again with the next step (idempotent)
        else:
            if launched.runnable:
                self._blame_suspects()  # the engine works without them
            return step_output
        # Requests that ended while the pass ran (async_scheduling: a stop string, an abort) are not rerun.
        steps = [step for step in launched.runnable if step.seq_id in self._seq_to_request]
        if not steps:
            return StepOutput()
        by_request: dict[str, list[SequenceStep]] = {}
        for step in steps:
            by_request.setdefault(self._seq_to_request[step.seq_id][0].request_id, []).append(step)
        logger.warning("a step of %d requests failed (%r); rerunning it split by request", len(by_request),
                       first_error)
        merged = StepOutput()
        failures: list[tuple[_RequestState, Exception]] = []
        groups = list(by_request.values())
        if len(groups) == 1:
            self._run_bisecting(groups, merged, failures)
        else:
            self._run_bisecting(groups[:len(groups) // 2], merged, failures)
            self._run_bisecting(groups[len(groups) // 2:], merged, failures)
        if len(failures) < len(groups):
            self._blame_suspects()
            for failed_state, failure in failures:
                self._fail_request(failed_state, failure)
            return merged
        if len(groups) > 1 or self._suspects:
            raise first_error
        # One request, failing alone: it or the engine. Hold its verdict until another forward pass runs.
        self._fail_request(*failures[0], hold=True)
        return merged

    def _apply(self, launched: _LaunchedStep, step_output: StepOutput) -> list[Sequence]:
        """Records prompt logprobs and appends sampled tokens (ending sequences on eos, a stop id or
        max_tokens); returns the sequences that changed."""
        scheduled = launched.scheduled
        for item in scheduled:
            entry = self._seq_to_request.get(item.seq.seq_id)
            if entry is None:
                continue
            try:
                self._record_prompt_logprobs(item, step_output)
            except Exception as exc:
                self._fail_request(entry[0], exc)
        ran = {step.seq_id for step in launched.runnable}
        scheduled = [item for item in scheduled if item.seq.seq_id in ran]
        sampled = {seq_id: r.token_id for seq_id, r in step_output.samples.items()}
        # Not a sequence that ended while its pass ran (async_scheduling: a stop string, with samples of its
        # request still running): update drops that token.
        self.num_generated_tokens += sum(1 for item in scheduled if item.completes_prompt and not item.seq.prefill_only
                                         and not item.seq.is_finished and item.seq.seq_id in self._seq_to_request)
        return self.scheduler.update(scheduled, sampled)

    def _finish_step(self, changed: list[Sequence], step_output: StepOutput) -> list[RequestOutput]:
        """Detokenizes the new tokens, checks stop strings and builds the changed requests' outputs."""
        touched: dict[str, _RequestState] = {}
        now = time.monotonic()
        for seq in changed:
            entry = self._seq_to_request.get(seq.seq_id)
            if entry is None:
                continue
            state, sample = entry
            try:
                if state.first_token_time is None and not seq.prefill_only:
                    state.first_token_time = now
                if not seq.prefill_only and seq.num_output_tokens and seq.seq_id in step_output.samples:
                    self._on_new_token(state, sample, step_output.samples[seq.seq_id])
            except Exception as exc:
                self._fail_request(state, exc)
                continue
            touched[state.request_id] = state
        outputs = []
        for state in touched.values():
            if state.request_id not in self.requests:
                continue  # failed after it was touched (another of its samples)
            try:
                outputs.append(self._make_output(state))
            except Exception as exc:
                self._fail_request(state, exc)
        for output in outputs:
            if output.finished:
                state = self.requests.pop(output.request_id)
                for sample in state.samples:
                    self._forget(sample.seq.seq_id)
        return outputs + self._take_failed()

    def _run_bisecting(self, groups: list[list[SequenceStep]], merged: StepOutput,
                       failures: list[tuple[_RequestState, Exception]]) -> None:
        """Runs the groups (one per request) together; on failure, each half on its own, down to single
        requests, whose failures are collected."""
        try:
            output = self.executor.execute(StepInput([step for group in groups for step in group]))
        except Exception as exc:
            if len(groups) == 1:
                failures.append((self._seq_to_request[groups[0][0].seq_id][0], exc))
                return
            self._run_bisecting(groups[:len(groups) // 2], merged, failures)
            self._run_bisecting(groups[len(groups) // 2:], merged, failures)
            return
        merged.samples.update(output.samples)
        merged.prompt_logprobs.update(output.prompt_logprobs)

    def _fail_request(self, state: _RequestState, exc: BaseException, hold: bool = False) -> None:
        """Ends a request that failed on its own: frees its blocks and queues its error output (or, with
        ``hold``, keeps it as a suspect until the engine is shown to work without it)."""
        if self.requests.pop(state.request_id, None) is None:
            return
        logger.warning("request %s failed: %r", state.request_id, exc)
        for sample in state.samples:
            self.scheduler.finish(sample.seq, "abort")
            self._forget(sample.seq.seq_id)
        output = RequestOutput(
            state.request_id, state.prompt, state.prompt_token_ids,
            [CompletionOutput(index=s.seq.sample_index, text="", token_ids=list(s.seq.output_token_ids),
                              finish_reason="abort") for s in state.samples],
            finished=True, error=f"{type(exc).__name__}: {exc}")
        if hold:
            self._suspects[state.request_id] = output
        else:
            self._failed.append(output)
            self.num_failed += 1

    def _blame_suspects(self) -> None:
        """The held failures were the requests' own: release them as failed outputs."""
        self._failed.extend(self._suspects.values())
        self.num_failed += len(self._suspects)
        self._suspects.clear()

    def _take_failed(self) -> list[RequestOutput]:
        failed, self._failed = self._failed, []
        return failed

    def _sequence_step(self, item: ScheduledSequence) -> SequenceStep:
        seq = item.seq
        start = seq.num_computed_tokens
        preemptions, sent = self._blocks_sent.get(seq.seq_id, (seq.num_preemptions, 0))
        if preemptions != seq.num_preemptions:
            sent = 0  # preempted since: its blocks were freed and it holds a new table
        step = SequenceStep(seq.seq_id, seq.token_ids[start:start + item.num_new_tokens], start,
                            seq.block_table[sent:], block_table_start=sent)
        self._blocks_sent[seq.seq_id] = (seq.num_preemptions, len(seq.block_table))
        if item.completes_prompt and not seq.prefill_only:
            step.sampling = self._sampling_row(seq)
        if seq.logprob_start is not None:
            first = max(start, seq.logprob_start - 1)
            end = min(start + item.num_new_tokens, seq.num_prompt_tokens - 1)
            if end > first:
                step.first_logprob_row = first - start
                step.logprob_targets = seq.token_ids[first + 1:end + 1]
                step.num_top_logprobs = seq.params.prompt_logprobs or 0
        return step

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        params = seq.params
        banned: list[int] = []
        if seq.num_output_tokens < params.min_tokens:
            banned = sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else self.scheduler.eos_token_ids))
        row = SamplingRow(**dict(zip(SAMPLING_KNOBS, _read_knobs(params), strict=False)), seed=seq.seed,
                          output_position=seq.num_output_tokens, banned_token_ids=banned)
        if row.needs_history:  # token history only travels when a penalty needs it
            row.output_token_ids = seq.output_token_ids
            if params.repetition_penalty != 1.0:
                row.prompt_token_ids = seq.token_ids[:seq.num_prompt_tokens]
        return row

    def _record_prompt_logprobs(self, item: ScheduledSequence, step_output: StepOutput) -> None:
        result = step_output.prompt_logprobs.get(item.seq.seq_id)
        entry = self._seq_to_request.get(item.seq.seq_id)
        seq = item.seq
        if result is None or entry is None or seq.logprob_start is None or entry[0].prompt_logprobs is None:
            return
        recorded = entry[0].prompt_logprobs
        first_position = max(seq.num_computed_tokens, seq.logprob_start - 1) + 1  # position of first target
        for k, logprob in enumerate(result.logprobs):
            position = first_position + k
            entry_dict = {seq.token_ids[position]: logprob}
            if result.top_logprobs is not None:
                entry_dict.update((t, lp) for t, lp in result.top_logprobs[k] if t not in entry_dict)
            recorded[position] = entry_dict

    def _on_new_token(self, state: _RequestState, sample: _SampleState, result: SampleResult) -> None:
        seq = sample.seq
        token = seq.token_ids[-1]
        detokenizer = sample.detokenizer
        assert detokenizer is not None  # only prefill-only sequences have none, and they get no tokens
        if sample.logprobs is not None and result.logprob is not None:
            entry = {token: result.logprob}
            entry.update((t, lp) for t, lp in (result.top_logprobs or []) if t not in entry)
            sample.logprobs.append(entry)
            sample.cumulative_logprob += result.logprob
        ended_by_token = seq.finish_reason == "stop"  # eos or a stop token id (stop strings come below)
        if ended_by_token:
            sample.stop_reason = token if token in state.params.stop_token_ids else None
        if not ended_by_token or state.params.include_stop_str_in_output:
            sample.text += detokenizer.add_token(token)
        if seq.is_finished:
            sample.text += detokenizer.flush()
        stops = state.params.stop
        if stops and not ended_by_token:
            self._check_stop_strings(state, sample)
        if seq.is_finished:
            sample.visible_len = len(sample.text)
        else:
            hold_back = max((len(s) for s in stops), default=1) - 1
            sample.visible_len = max(sample.visible_len, len(sample.text) - hold_back)

    def _check_stop_strings(self, state: _RequestState, sample: _SampleState) -> None:
        params = state.params
        longest = max(len(s) for s in params.stop)
        # Only the tail can hold a new match: the last token's text plus a stop string's length.
        search_from = max(0, sample.visible_len - longest)
        best: tuple[int, str] | None = None
        for stop in params.stop:
            at = sample.text.find(stop, search_from)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return
        at, stop = best
        sample.text = sample.text[:at + len(stop)] if params.include_stop_str_in_output else sample.text[:at]
        sample.stop_reason = stop
        sample.visible_len = len(sample.text)
        if not sample.seq.is_finished:
            self.scheduler.finish(sample.seq, "stop")
        else:
            sample.seq.finish_reason = "stop"

    def _make_output(self, state: _RequestState) -> RequestOutput:
        completions = []
        for sample in state.samples:
            seq = sample.seq
            completions.append(CompletionOutput(
                index=seq.sample_index, text=sample.text[:sample.visible_len], token_ids=seq.output_token_ids,
                finish_reason=seq.finish_reason, stop_reason=sample.stop_reason,
                logprobs=sample.logprobs, cumulative_logprob=sample.cumulative_logprob
                if sample.logprobs is not None else None))
        prompt_logprobs = None
        if state.prompt_logprobs is not None and state.finished:
            start = state.logprob_start or 1
            prompt_logprobs = [None] * start + [state.prompt_logprobs.get(p) for p in
                                                range(start, len(state.prompt_token_ids))]
        metrics = {"arrival_time": state.arrival_time}
        if state.first_token_time is not None:
            metrics["first_token_time"] = state.first_token_time
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, completions,
                             finished=state.finished, prompt_logprobs=prompt_logprobs, metrics=metrics)

    # ---- introspection -------------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        s = self.scheduler.stats
        return {"steps": s.steps, "preemptions": s.preemptions, "max_running": s.max_running,
                "shared_decode_steps": s.shared_decode_steps,
                "prefix_cache_hit_blocks": self.block_manager.prefix_cache_hits,
                "prefix_cache_queried_blocks": self.block_manager.prefix_cache_queries,
                "kv_cache_usage": self.block_manager.usage, "num_waiting": self.scheduler.num_waiting,
                "num_running": len(self.scheduler.running), "generated_tokens": self.num_generated_tokens,
                "aborted_requests": self.num_aborted, "failed_requests": self.num_failed}

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)  # a pass in flight ends before its runner goes
        self.executor.shutdown()
