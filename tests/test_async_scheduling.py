"""async_scheduling: the forward pass of step N+1 runs on a worker thread while step N's tokens are
detokenized and stop-checked. Everything a request gets must equal the synchronous engine's: tokens, text,
finish and stop reasons, logprobs, prompt logprobs, scores; a stop string or an abort that ends a sequence
while its next pass is in flight drops that pass's token; streamed updates arrive one token at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from neox_ray import LLM, SamplingParams
from neox_ray.engine.outputs import RequestOutput


def prompts(lengths: list[int], seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 400, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture(scope="module")
def engines(tiny_checkpoint: Path) -> dict[bool, LLM]:
    return {mode: LLM(str(tiny_checkpoint), block_size=4, max_num_batched_tokens=64, max_num_seqs=8,
                      async_scheduling=mode) for mode in (False, True)}


def summary(output: RequestOutput) -> list:
    """What a request gets, floats rounded: a sequence that a stop string ends keeps a row in the next pass
    (its token dropped), so batches and prefill chunks differ from the synchronous engine's and logprobs may
    differ in the last bits (tokens may not)."""
    def rounded(entries: list | None) -> list | None:
        return None if entries is None else [None if e is None else {t: round(v, 4) for t, v in e.items()}
                                             for e in entries]
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason, rounded(c.logprobs),
             None if c.cumulative_logprob is None else round(c.cumulative_logprob, 3))
            for c in output.outputs] + [rounded(output.prompt_logprobs)]


def test_outputs_equal_the_synchronous_engine(engines: dict[bool, LLM]) -> None:
    batch = prompts([8, 3, 17, 40, 5, 11, 29, 2, 9, 23], seed=1)
    base = engines[False].generate(batch[:1], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    text = base[0].outputs[0].text
    assert len(text) > 8
    params = [
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[text[4:7]]),  # a stop string
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20, seed=5, ignore_eos=True, n=2),
        SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=25, stop_token_ids=[base[0].outputs[0].token_ids[9]],
                       ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True, stop=["\n", text[10:12]],
                       include_stop_str_in_output=True),
        SamplingParams(temperature=1.0, max_tokens=16, seed=9, min_tokens=4, presence_penalty=0.5),
        SamplingParams(temperature=0.0, max_tokens=3),
        SamplingParams(temperature=0.0, max_tokens=18, ignore_eos=True, stop=[text[1:3]]),
        SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
    ]
    batch[0] = base[0].prompt_token_ids
    before = {mode: llm.engine.num_generated_tokens for mode, llm in engines.items()}
    results = {mode: llm.generate(batch, params) for mode, llm in engines.items()}
    for got, want in zip(results[True], results[False], strict=True):
        assert summary(got) == summary(want), (summary(got), summary(want))
    assert results[True][0].outputs[0].finish_reason == "stop"  # the stop string did end it early
    assert results[True][0].outputs[0].stop_reason == text[4:7]
    generated = {mode: llm.engine.num_generated_tokens - before[mode] for mode, llm in engines.items()}
    assert generated[True] == generated[False] == sum(len(c.token_ids) for o in results[True] for c in o.outputs)
    assert not engines[True].engine.has_unfinished()
    assert engines[True].engine.block_manager.num_free_blocks == engines[True].engine.block_manager.num_blocks


def test_scores_equal_the_synchronous_engine(engines: dict[bool, LLM]) -> None:
    texts = prompts([50, 7, 130, 3], seed=2)
    scores = {mode: llm.score(texts, window=32, stride=16) for mode, llm in engines.items()}
    assert [s.num_tokens for s in scores[True]] == [s.num_tokens for s in scores[False]]
    assert [s.nll for s in scores[True]] == pytest.approx([s.nll for s in scores[False]], rel=1e-6)


def test_a_stop_string_found_while_the_next_pass_runs_drops_its_token(engines: dict[bool, LLM]) -> None:
    """Step by step: the pass after the one that completed the stop string was already launched; the request
    still finishes with the synchronous engine's tokens, and its blocks are free once that pass is collected."""
    llm = engines[True]
    engine = llm.engine
    prompt = prompts([6], seed=3)[0]
    free = engine.block_manager.num_free_blocks
    text = engines[False].generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    stop = text[0].outputs[0].text[5:8]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[stop])
    expected = engines[False].generate([prompt], params)[0].outputs[0]
    execute = engine.executor.execute
    fed: list[int] = []

    def counting(step_input):
        fed.extend(len(s.new_token_ids) for s in step_input.sequences)
        return execute(step_input)

    engine.executor.execute = counting
    request_id = engine.add_request(prompt, params)
    updates: list[RequestOutput] = []
    try:
        while engine.has_unfinished():
            updates.extend(o for o in engine.step() if o.request_id == request_id)
    finally:
        del engine.executor.execute
    final = updates[-1]
    assert len(fed) == len(expected.token_ids) + 1  # prefill, a pass per token but the last, and one dropped
    assert final.finished and summary(final)[0][:4] == (expected.token_ids, expected.text, "stop", stop)
    assert [len(u.outputs[0].token_ids) for u in updates] == list(range(1, len(expected.token_ids) + 1))
    assert engine.block_manager.num_free_blocks == free


def test_abort_while_a_pass_is_in_flight(engines: dict[bool, LLM]) -> None:
    engine = engines[True].engine
    free = engine.block_manager.num_free_blocks
    keep, drop = prompts([5, 9], seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = engines[False].generate([keep], params)[0].outputs[0].token_ids
    kept_id, dropped_id = engine.add_request(keep, params), engine.add_request(drop, params)
    engine.step()
    engine.step()  # a pass holding both is in flight now
    assert engine._in_flight is not None
    assert engine.abort(dropped_id)
    finals = engine.run_until_finished([kept_id])
    assert finals[kept_id].outputs[0].token_ids == expected
    assert engine.block_manager.num_free_blocks == free
    assert not engine.has_unfinished()


def test_shutdown_waits_for_the_pass_in_flight(tiny_checkpoint: Path) -> None:
    llm = LLM(str(tiny_checkpoint), block_size=4, async_scheduling=True)
    llm.engine.add_request([5, 6, 7], SamplingParams(max_tokens=5))
    llm.engine.step()
    assert llm.engine._in_flight is not None
    llm.shutdown()
    assert llm.engine._worker is not None and llm.engine._worker._shutdown


def test_a_sample_stopped_by_a_string_while_its_sibling_runs_on(engines: dict[bool, LLM]) -> None:
    """n=2: a stop string ends one sample while the other keeps generating; the stopped sample's extra token
    is dropped, not appended and not counted."""
    prompt = prompts([7], seed=6)[0]
    free = SamplingParams(temperature=1.0, max_tokens=24, seed=11, n=2, ignore_eos=True)
    texts = [c.text for c in engines[False].generate([prompt], free)[0].outputs]
    stop = next(texts[0][i:i + 2] for i in range(3, len(texts[0]) - 2) if texts[0][i:i + 2] not in texts[1])
    params = SamplingParams(temperature=1.0, max_tokens=24, seed=11, n=2, ignore_eos=True, stop=[stop])
    before = {mode: llm.engine.num_generated_tokens for mode, llm in engines.items()}
    results = {mode: llm.generate([prompt], params)[0] for mode, llm in engines.items()}
    assert summary(results[True]) == summary(results[False])
    stopped, running = results[True].outputs
    assert stopped.stop_reason == stop and running.finish_reason == "length"
    assert len(stopped.token_ids) < len(running.token_ids) == 24
    generated = {mode: llm.engine.num_generated_tokens - before[mode] for mode, llm in engines.items()}
    assert generated[True] == generated[False] == len(stopped.token_ids) + 24
