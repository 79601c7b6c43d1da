"""AsyncLLMEngine without Ray: merged request streams (deadline, early stop), scoring through the loop, and
fault isolation: a failure that belongs to one request fails that request alone.

A "poison" request (its prompt starts with token ``POISON``, which no other prompt holds) is made to fail
either in the forward pass (the executor raises whenever a step feeds it) or in output processing (the
engine's per-token step raises for it). Every other request finishes with exactly the tokens it gets
without the poison one, the engine stays healthy and serves later requests; through the HTTP app the
poison request is a 500 while the others get 200.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from neox_ray import LLM, SamplingParams
from neox_ray.engine.async_engine import (
    AsyncLLMEngine,
    DeadlineExceeded,
    EngineRequest,
    QueueFullError,
    RequestFailedError,
)
from neox_ray.engine.llm_engine import LLMEngine
from neox_ray.engine.scoring import ScoreItemError
from neox_ray.engine.step import StepInput

POISON = 7
GOOD_PROMPTS = [[20 + i, 31, 45, 52 + i, 60] for i in range(5)]
POISON_PROMPT = [POISON, 33, 40, 41]
PARAMS = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def _poison_forward(engine: LLMEngine) -> None:
    """Steps that feed the poison request fail (the whole forward pass, as a bad input would)."""
    execute = engine.executor.execute

    def faulty(step_input: StepInput):
        if any(POISON in step.new_token_ids for step in step_input.sequences):
            raise RuntimeError("poisoned forward pass")
        return execute(step_input)

    engine.executor.execute = faulty  # type: ignore[method-assign]


def _poison_detokenizer(engine: LLMEngine) -> None:
    """The poison request's per-token processing (detokenizing, stop checks) raises."""
    on_new_token = engine._on_new_token

    def faulty(state, sample, result) -> None:
        if state.prompt_token_ids[0] == POISON:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "poisoned detokenizer")
        on_new_token(state, sample, result)

    engine._on_new_token = faulty  # type: ignore[method-assign]


@pytest.fixture(params=[False, True], ids=["sync", "async_scheduling"])
def llm(tiny_checkpoint: Path, request: pytest.FixtureRequest) -> LLM:
    return LLM(str(tiny_checkpoint), block_size=4, async_scheduling=request.param)


@pytest.fixture()
def expected(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(GOOD_PROMPTS, PARAMS)]


def test_merged_stream_deadline_and_early_stop_abort_everything(llm: LLM, expected: list[list[int]]) -> None:
    import time

    engine = AsyncLLMEngine(llm.engine, max_queued_requests=4)
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    try:
        async def run() -> None:
            finals = await engine.submit_many([EngineRequest(p, PARAMS) for p in GOOD_PROMPTS[:3]]).collect()
            assert [finals[i].outputs[0].token_ids for i in range(3)] == expected[:3]
            with pytest.raises(QueueFullError):  # all or nothing: 5 > 4, so none of them is queued
                engine.submit_many([EngineRequest(p, PARAMS) for p in GOOD_PROMPTS])
            assert engine.num_pending == 0
            stream = engine.submit_many([EngineRequest(p, long) for p in GOOD_PROMPTS[:2]], time.monotonic() + 0.05)
            with pytest.raises(DeadlineExceeded):
                await stream.collect()
            async with engine.submit_many([EngineRequest(p, long) for p in GOOD_PROMPTS[:2]]) as stream:
                async for _index, output in stream:
                    if output.outputs[0].token_ids:
                        break  # the consumer stops: leaving the block aborts both

        aborted = llm.engine.num_aborted
        asyncio.run(run())
        for _ in range(100):
            if engine.num_pending == 0:
                break
            time.sleep(0.05)
        assert engine.num_pending == 0 and llm.engine.num_aborted == aborted + 4
        assert llm.engine.stats()["generated_tokens"] < 3 * 10 + 4 * 200
    finally:
        engine.shutdown()


def test_async_scoring_equals_offline_scoring(llm: LLM) -> None:
    texts = [[5 + (i % 50) for i in range(n)] for n in (3, 40, 17)]
    items = [(llm.tokenizer.decode(t), t) for t in texts]
    expected = llm.score(texts, window=16, stride=6, return_token_logprobs=True)
    engine = AsyncLLMEngine(llm.engine)
    try:
        scored = asyncio.run(engine.score(items, window=16, stride=6, keep_token_logprobs=True))
        assert scored == expected
        futures = engine.score_futures(items[:1] + [("", [])] + items[1:], window=16, stride=6)
        assert futures[0].result(timeout=60).nll == expected[0].nll
        with pytest.raises(ScoreItemError, match="text 1: text is empty") as info:
            futures[1].result(timeout=60)
        assert info.value.index == 1 and info.value.message.startswith("text is empty")
        assert [f.result(timeout=60).nll for f in futures[2:]] == [e.nll for e in expected[1:]]
        with pytest.raises(ScoreItemError, match="text 1: token id 99999"):
            asyncio.run(engine.score([items[0], ("x", [99999])]))
        assert engine.num_pending == 0
    finally:
        engine.shutdown()


@pytest.mark.parametrize("poison", [_poison_forward, _poison_detokenizer], ids=["forward", "detokenizer"])
def test_async_engine_fails_only_the_faulting_request(llm: LLM, expected: list[list[int]], poison) -> None:
    poison(llm.engine)
    engine = AsyncLLMEngine(llm.engine)
    try:
        async def run_all() -> list[list[int] | BaseException]:
            async def one(prompt: list[int]) -> list[int]:
                last = None
                async for output in engine.stream(prompt, PARAMS):
                    last = output
                assert last is not None and last.finished
                return last.outputs[0].token_ids

            prompts = GOOD_PROMPTS[:2] + [POISON_PROMPT] + GOOD_PROMPTS[2:]
            return await asyncio.gather(*(one(p) for p in prompts), return_exceptions=True)

        results = asyncio.run(run_all())
        failed = results.pop(2)
        assert isinstance(failed, RequestFailedError), failed
        assert "poisoned" in str(failed)
        assert results == expected
        engine.check_health()
        # Alone, the poison request still fails (after the engine has shown it works without it) ...
        with pytest.raises(RequestFailedError, match="poisoned"):
            engine.submit_and_wait(POISON_PROMPT, PARAMS).result(timeout=60)
        # ... and the engine goes on serving.
        again = engine.submit_and_wait(GOOD_PROMPTS[0], PARAMS).result(timeout=60)
        assert again.outputs[0].token_ids == expected[0]
        engine.check_health()
        stats = llm.engine.stats()
        assert stats["failed_requests"] == 2 and stats["num_running"] == 0 and stats["num_waiting"] == 0
        assert engine.num_pending == 0
    finally:
        engine.shutdown()


def test_offline_generate_and_score_name_the_failing_item(llm: LLM, expected: list[list[int]]) -> None:
    _poison_forward(llm.engine)
    with pytest.raises(RequestFailedError, match="prompt 1: .*poisoned"):
        llm.generate([GOOD_PROMPTS[0], POISON_PROMPT, GOOD_PROMPTS[1]], PARAMS)
    with pytest.raises(RequestFailedError, match="text 1: .*poisoned"):
        llm.score([GOOD_PROMPTS[0], POISON_PROMPT])
    assert not llm.engine.has_unfinished()
    assert [o.outputs[0].token_ids for o in llm.generate(GOOD_PROMPTS, PARAMS)] == expected


def test_every_request_failing_alone_still_kills_the_engine(llm: LLM) -> None:
    """A broken device fails every request, alone too: that is the engine's failure, not theirs."""
    from neox_ray.engine.async_engine import EngineDeadError

    def broken(step_input: StepInput):
        raise RuntimeError("device lost")

    llm.engine.executor.execute = broken  # type: ignore[method-assign]
    engine = AsyncLLMEngine(llm.engine)
    try:
        futures = [engine.submit_and_wait(p, PARAMS) for p in GOOD_PROMPTS[:3]]
        errors = []
        for future in futures:
            with pytest.raises((EngineDeadError, RequestFailedError)) as info:
                future.result(timeout=60)
            errors.append(info.value)
        # At most a lone first request can be blamed before the engine is shown to be broken.
        assert sum(isinstance(e, EngineDeadError) for e in errors) >= len(futures) - 1
        with pytest.raises(EngineDeadError, match="device lost"):
            engine.check_health()
    finally:
        engine.shutdown()


def test_http_app_returns_500_for_the_failing_request_only(llm: LLM, expected: list[list[int]]) -> None:
    from fastapi.testclient import TestClient

    from neox_ray.serve.server import OpenAIServer, ServerSettings, create_app

    _poison_forward(llm.engine)
    engine = AsyncLLMEngine(llm.engine, max_queued_requests=16)
    try:
        server = OpenAIServer(engine, ServerSettings(served_model_name="tiny", request_timeout_s=60))
        with TestClient(create_app(server)) as client:
            body = {"model": "tiny", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
            bad = client.post("/v1/completions", json={**body, "prompt": POISON_PROMPT})
            assert bad.status_code == 500, bad.text
            assert bad.json()["error"]["code"] == "request_failed"
            streamed = client.post("/v1/completions", json={**body, "prompt": POISON_PROMPT, "stream": True})
            assert streamed.status_code == 500, streamed.text
            good = client.post("/v1/completions", json={**body, "prompt": GOOD_PROMPTS})
            assert good.status_code == 200, good.text
            assert len(good.json()["choices"]) == len(GOOD_PROMPTS)
            score = client.post("/v1/score", json={"model": "tiny", "input": [GOOD_PROMPTS[0], POISON_PROMPT]})
            assert score.status_code == 500 and "poisoned" in score.json()["error"]["message"]
            assert client.get("/health").status_code == 200
            assert engine.num_pending == 0
    finally:
        engine.shutdown()


def test_batch_stages_turn_a_failing_request_into_an_error_row(tiny_checkpoint: Path) -> None:
    """The Ray Data engine stages, called in-process: the poison row gets ``error``, the others their results."""
    import json

    import pyarrow as pa

    from neox_ray.batch.stages import SAMPLING, TEXTS, TOKEN_IDS, GenerateEngineStage, ScoreEngineStage

    ids = pa.array([GOOD_PROMPTS[0], POISON_PROMPT, GOOD_PROMPTS[1]], pa.list_(pa.int32()))
    scorer = ScoreEngineStage(str(tiny_checkpoint), {"block_size": 4}, "text", window=16, stride=8)
    expected_scores = scorer.llm.score([GOOD_PROMPTS[0], GOOD_PROMPTS[1]], window=16, stride=8)
    _poison_forward(scorer.llm.engine)
    try:
        scored = scorer(pa.table({"text": ["a", "b", "c"], "id": ["r0", "r1", "r2"], TOKEN_IDS: ids,
                                  "error": pa.array([None, None, None], pa.string())}))
    finally:
        scorer.engine.shutdown()
    errors = scored.column("error").to_pylist()
    assert errors[0] is None and errors[2] is None and "poisoned" in errors[1], errors
    assert scored.column("nll").to_pylist()[::2] == [s.nll for s in expected_scores]

    generator = GenerateEngineStage(str(tiny_checkpoint), {"block_size": 4})
    _poison_forward(generator.llm.engine)
    params = json.dumps({"temperature": 0.0, "max_tokens": 10, "ignore_eos": True})
    try:
        generated = generator(pa.table({"prompt": ["a", "b", "c"], "id": ["r0", "r1", "r2"], TOKEN_IDS: ids,
                                        SAMPLING: [params] * 3, "error": pa.array([None] * 3, pa.string())}))
    finally:
        generator.engine.shutdown()
    errors = generated.column("error").to_pylist()
    assert errors[0] is None and errors[2] is None and "poisoned" in errors[1], errors
    texts = generated.column(TEXTS).to_pylist()
    assert texts[1] is None and texts[0] and texts[2]
