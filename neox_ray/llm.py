"""``LLM``: the offline entry point, shaped like vLLM's (``generate``, ``score``) plus lm-eval's
``loglikelihood`` of (context, continuation) pairs.

A thin driver over :class:`LLMEngine`: it validates every input up front (so a bad item fails before any
compute, naming its index), queues all requests, steps the engine until they finish and returns results
in input order (scoring's window fan-out is the engine's). A request the engine fails raises
:class:`RequestFailedError` naming its index; the others are aborted. Picking the executor is the only place
``tensor_parallel_size > 1`` brings in Ray.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from neox_ray.engine.engine_config import EngineConfig
from neox_ray.engine.llm_engine import LLMEngine, RequestFailedError
from neox_ray.engine.outputs import RequestOutput, ScoreOutput
from neox_ray.engine.sampling_params import SamplingParams
from neox_ray.engine.scoring import LoglikelihoodOutput, encode_pair

PromptInput = str | Sequence[int]


def make_executor_factory(config: EngineConfig):
    if config.tensor_parallel_size == 1:
        return None
    from neox_ray.ray.shard_group import RayShardGroupExecutor

    return RayShardGroupExecutor


class LLM:
    def __init__(self, model: str, **engine_kwargs: Any):
        config = EngineConfig.from_kwargs(str(model), **engine_kwargs)
        self.engine = LLMEngine(config, make_executor_factory(config))
        self.tokenizer = self.engine.tokenizer

    # ---- generation ----------------------------------------------------------------------------------
    def generate(self, prompts: PromptInput | Sequence[PromptInput],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        encoded = []
        for index, (prompt, params) in enumerate(zip(prompt_list, params_list, strict=False)):
            try:
                text, ids = self._encode(prompt)
                self.engine.validate_prompt(ids, params.max_tokens)
            except ValueError as exc:
                raise ValueError(f"prompt {index}: {exc}") from None
            encoded.append((text, ids))
        order = {}
        for index, ((text, ids), params) in enumerate(zip(encoded, params_list, strict=False)):
            order[self.engine.add_request(ids, params, prompt=text)] = index
        return self._run(order, use_tqdm)

    def _encode(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _run(self, order: dict[str, int], use_tqdm: bool) -> list[RequestOutput]:
        progress = _Progress(len(order)) if use_tqdm else None
        start_tokens = self.engine.num_generated_tokens

        def on_finished(output: RequestOutput) -> None:
            if progress:
                progress.update(self.engine.num_generated_tokens - start_tokens)

        try:
            finals = self.engine.run_until_finished(order, on_finished)
        except RequestFailedError as exc:
            raise RequestFailedError(exc.request_id, f"prompt {order[exc.request_id]}: {exc}") from None
        finally:
            if progress:
                progress.close()
        results: list[RequestOutput | None] = [None] * len(order)
        for request_id, index in order.items():
            results[index] = finals[request_id]
        return results  # type: ignore[return-value]

    # ---- scoring -------------------------------------------------------------------------------------
    def score(self, texts: PromptInput | Sequence[PromptInput], window: int | None = None,
              stride: int | None = None, return_token_logprobs: bool = False,
              use_tqdm: bool = False, perplexity: str = "sliding") -> list[ScoreOutput]:
        """Per-text NLL / perplexity with every token scored once (see :mod:`neox_ray.engine.scoring`):
        ``perplexity="sliding"`` (overlapping windows, more context per token) or ``"rolling"`` (lm-eval's
        ``loglikelihood_rolling``: disjoint windows of up to ``window`` tokens; what lm-eval reports)."""
        encoded: list[tuple[str | None, list[int]]] = []
        for index, item in enumerate(_as_prompt_list(texts)):
            try:
                text, ids = self._encode(item)
                if text is None:  # token ids: bytes and words are counted on their decoding
                    self.engine.validate_token_ids(ids)
                    text = self.tokenizer.decode(ids)
            except ValueError as exc:
                raise ValueError(f"text {index}: {exc}") from None
            encoded.append((text, ids))
        plan = self.engine.plan_scores(encoded, window, stride, perplexity)
        plan.raise_first_error()  # before the progress bar opens
        if not use_tqdm:
            return self.engine.run_score_plan(plan, return_token_logprobs)
        progress = _Progress(len(plan.requests()))
        try:
            return self.engine.run_score_plan(plan, return_token_logprobs, lambda output: progress.update(0))
        finally:
            progress.close()

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's tokenization of one pair (see :func:`neox_ray.engine.scoring.encode_pair`)."""
        return encode_pair(context, continuation, self.tokenizer.encode, self.engine.eot_token_id)

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], return_token_logprobs: bool = False
                      ) -> list[LoglikelihoodOutput]:
        """lm-eval's ``loglikelihood``: for each (context, continuation), the summed natural-log probability
        of the continuation's tokens and whether each is the argmax. Pairs sharing a context compute it once
        (the prefix cache serves it to the others)."""
        encoded = []
        for index, pair in enumerate(pairs):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
                raise ValueError(f"pair {index}: expected (context, continuation) strings, got {pair!r}")
            encoded.append(self.encode_pair(pair[0], pair[1]))
        return self.engine.loglikelihood(encoded, return_token_logprobs)

    def shutdown(self) -> None:
        self.engine.shutdown()


def _as_prompt_list(prompts: Any) -> list[PromptInput]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]  # one prompt given as token ids
        return list(prompts)
    raise ValueError(f"prompts must be a string, a list of strings or a list of token-id lists, "
                     f"got {type(prompts).__name__}")


def _as_params_list(params: Any, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling_params for {count} prompts")
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise ValueError(f"sampling_params[{i}] is not a SamplingParams")
    return params


class _Progress:
    """Requests done and generated tokens/s on a tqdm bar."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="Generating", unit="req", dynamic_ncols=True)
        self.start = time.monotonic()

    def update(self, generated_tokens: int) -> None:
        self.bar.update(1)
        elapsed = max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{generated_tokens / elapsed:.1f} tok/s")

    def close(self) -> None:
        self.bar.close()
