"""The engine loop: requests in, one scheduled step at a time, outputs (with text) out.

``LLMEngine`` owns the tokenizer, the scheduler and an executor. ``add_request`` validates and queues a
request (``n`` samples become ``n`` sequences sharing the prompt's cached blocks); ``step`` schedules,
runs one forward pass through the executor, applies sampled tokens, detokenizes incrementally, checks
stop strings and returns the requests that changed. ``abort`` frees a request's blocks at once.

Everything above it (``LLM`` for offline use, the Ray Data stage, the Serve deployment) drives this one
class; none has a generation loop of its own.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from neox_ray.config import ModelConfig
from neox_ray.engine.block_manager import BlockManager
from neox_ray.engine.engine_config import EngineConfig
from neox_ray.engine.executor import Executor, UniprocExecutor
from neox_ray.engine.outputs import CompletionOutput, RequestOutput
from neox_ray.engine.sampling_params import SamplingParams
from neox_ray.engine.scheduler import ScheduledSequence, Scheduler
from neox_ray.engine.scoring import validate_window
from neox_ray.engine.sequence import Sequence, SequenceStatus
from neox_ray.engine.step import SamplingRow, SequenceStep, StepInput, StepOutput
from neox_ray.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)

ExecutorFactory = Callable[[EngineConfig, ModelConfig, int], Executor]


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
        self._request_counter = itertools.count()
        self.num_generated_tokens = 0
        self.num_aborted = 0

    # ---- requests ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    def validate_token_ids(self, token_ids: list[int]) -> None:
        """Raises ValueError for an out-of-vocabulary (or non-integer) token id."""
        for token in token_ids:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < self.vocab_size:
                raise ValueError(f"token id {token!r} is outside the vocabulary [0, {self.vocab_size})")

    def validate_prompt(self, prompt_token_ids: list[int], max_tokens: int) -> None:
        """Raises ValueError for an empty prompt, an out-of-vocabulary id, or no room for max_tokens."""
        if not prompt_token_ids:
            raise ValueError("prompt is empty")
        self.validate_token_ids(prompt_token_ids)
        if len(prompt_token_ids) + max_tokens > self.max_model_len:
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

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    prompt: str | None = None, prefill_only: bool = False,
                    logprob_start: int | None = None) -> str:
        """Queues a request. ``prefill_only`` runs the prompt without generating (scoring / prompt logprobs);
        ``logprob_start`` asks for the logprob of every prompt token from that position on."""
        request_id = request_id if request_id is not None else f"req-{next(self._request_counter)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        prompt_token_ids = list(prompt_token_ids)
        self.validate_prompt(prompt_token_ids, 0 if prefill_only else params.max_tokens)
        if params.prompt_logprobs is not None and logprob_start is None:
            logprob_start = 1
        state = _RequestState(request_id, prompt, prompt_token_ids, params, samples=[],
                              prompt_logprobs={} if logprob_start is not None else None,
                              logprob_start=logprob_start)
        num_samples = 1 if prefill_only else params.n
        for index in range(num_samples):
            seed = None if params.seed is None else params.seed + index * 7919  # distinct per sample, fixed
            seq = Sequence(request_id, prompt_token_ids, params, sample_index=index, seed=seed,
                           prefill_only=prefill_only, logprob_start=logprob_start if index == 0 else None)
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
        state = self.requests.pop(request_id, None)
        if state is None:
            return False
        for sample in state.samples:
            self.scheduler.finish(sample.seq, "abort")
            self._seq_to_request.pop(sample.seq.seq_id, None)
        self.num_aborted += 1
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- one step ------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        step_output = self.executor.execute(self._build_step(scheduled))
        sampled = {seq_id: r.token_id for seq_id, r in step_output.samples.items()}
        self._record_prompt_logprobs(scheduled, step_output)
        self.num_generated_tokens += sum(1 for item in scheduled if item.completes_prompt and not item.seq.prefill_only)
        changed = self.scheduler.update(scheduled, sampled)
        touched: dict[str, _RequestState] = {}
        now = time.monotonic()
        for seq in changed:
            entry = self._seq_to_request.get(seq.seq_id)
            if entry is None:
                continue
            state, sample = entry
            if state.first_token_time is None and not seq.prefill_only:
                state.first_token_time = now
            if not seq.prefill_only and seq.num_output_tokens and seq.seq_id in step_output.samples:
                self._on_new_token(state, sample, step_output.samples[seq.seq_id])
            touched[state.request_id] = state
        outputs = [self._make_output(state) for state in touched.values()]
        for output in outputs:
            if output.finished:
                state = self.requests.pop(output.request_id)
                for sample in state.samples:
                    self._seq_to_request.pop(sample.seq.seq_id, None)
        return outputs

    def _build_step(self, scheduled: list[ScheduledSequence]) -> StepInput:
        steps = []
        for item in scheduled:
            seq = item.seq
            start = seq.num_computed_tokens
            step = SequenceStep(seq.seq_id, seq.token_ids[start:start + item.num_new_tokens], start,
                                list(seq.block_table))
            if item.completes_prompt and not seq.prefill_only:
                step.sampling = self._sampling_row(seq)
            if seq.logprob_start is not None:
                first = max(start, seq.logprob_start - 1)
                end = min(start + item.num_new_tokens, seq.num_prompt_tokens - 1)
                if end > first:
                    step.first_logprob_row = first - start
                    step.logprob_targets = seq.token_ids[first + 1:end + 1]
                    step.num_top_logprobs = seq.params.prompt_logprobs or 0
            steps.append(step)
        return StepInput(steps)

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        params = seq.params
        banned: list[int] = []
        if seq.num_output_tokens < params.min_tokens:
            banned = sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else self.scheduler.eos_token_ids))
        row = SamplingRow(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                          min_p=params.min_p, repetition_penalty=params.repetition_penalty,
                          presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                          seed=seq.seed, output_position=seq.num_output_tokens, num_logprobs=params.logprobs,
                          banned_token_ids=banned)
        if row.needs_history:  # token history only travels when a penalty needs it
            row.output_token_ids = seq.output_token_ids
            if params.repetition_penalty != 1.0:
                row.prompt_token_ids = seq.token_ids[:seq.num_prompt_tokens]
        return row

    def _record_prompt_logprobs(self, scheduled: list[ScheduledSequence], step_output: StepOutput) -> None:
        for item in scheduled:
            result = step_output.prompt_logprobs.get(item.seq.seq_id)
            entry = self._seq_to_request.get(item.seq.seq_id)
            if result is None or entry is None:
                continue
            state, _ = entry
            seq = item.seq
            first_position = max(seq.num_computed_tokens, seq.logprob_start - 1) + 1  # position of first target
            for k, logprob in enumerate(result.logprobs):
                position = first_position + k
                entry_dict = {seq.token_ids[position]: logprob}
                if result.top_logprobs is not None:
                    entry_dict.update((t, lp) for t, lp in result.top_logprobs[k] if t not in entry_dict)
                state.prompt_logprobs[position] = entry_dict

    def _on_new_token(self, state: _RequestState, sample: _SampleState, result) -> None:
        seq = sample.seq
        token = seq.token_ids[-1]
        if sample.logprobs is not None and result.logprob is not None:
            entry = {token: result.logprob}
            entry.update((t, lp) for t, lp in (result.top_logprobs or []) if t not in entry)
            sample.logprobs.append(entry)
            sample.cumulative_logprob += result.logprob
        ended_by_token = seq.finish_reason == "stop"  # eos or a stop token id (stop strings come below)
        if ended_by_token:
            sample.stop_reason = token if token in state.params.stop_token_ids else None
        if not ended_by_token or state.params.include_stop_str_in_output:
            sample.text += sample.detokenizer.add_token(token)
        if seq.is_finished:
            sample.text += sample.detokenizer.flush()
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
                "aborted_requests": self.num_aborted}

    def shutdown(self) -> None:
        self.executor.shutdown()
