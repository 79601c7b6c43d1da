"""Engine core II: LLM.generate / LLM.score against transformers, preemption, prefix caching, sampling."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from checkpoints import VARIANTS, build_hf_checkpoint, load_hf_model

from neox_ray import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=36, ignore_eos=True)


def random_prompts(lengths: list[int], vocab: int = 400, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=generator).tolist() for n in lengths]


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_prompt_logprobs(hf_model, tokens: list[int]) -> list[float]:
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_model(torch.tensor([tokens])).logits[0].float(), dim=-1)
    return [float(logprobs[i - 1, tokens[i]]) for i in range(1, len(tokens))]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Path) -> LLM:
    return LLM(str(tiny_checkpoint), block_size=4, max_num_batched_tokens=96, max_num_seqs=16)


@pytest.fixture(scope="module")
def hf(tiny_checkpoint: Path):
    return load_hf_model(tiny_checkpoint)


@pytest.mark.parametrize("variant", ["pythia", "sequential_full_rotary", "no_bias_tied_theta",
                                     "head_dim_80_gelu_new", "dynamic_scaling"])
def test_greedy_generation_matches_transformers(tmp_path: Path, variant: str) -> None:
    directory = build_hf_checkpoint(tmp_path / variant, **VARIANTS[variant])
    hf_model = load_hf_model(directory)
    # Small token budget: long prompts are prefilled in chunks. Dynamic rope runs past its 32 positions.
    llm = LLM(str(directory), block_size=4, max_num_batched_tokens=48, max_model_len=128)
    prompts = random_prompts([3, 21, 1, 40, 9, 64])
    outputs = llm.generate(prompts, GREEDY)
    for prompt, output in zip(prompts, outputs, strict=False):
        assert output.prompt_token_ids == prompt
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, 36), variant
        assert output.outputs[0].finish_reason == "length"


def test_outputs_come_back_in_input_order_with_text(llm: LLM) -> None:
    prompts = ["hello world", "naïve café", "The quick brown fox", "日本語"]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert [o.prompt for o in outputs] == prompts
    for prompt, output in zip(prompts, outputs, strict=False):
        assert output.prompt_token_ids == llm.tokenizer.encode(prompt)
        completion = output.outputs[0]
        assert completion.text == llm.tokenizer.decode(completion.token_ids)


def test_prompt_logprobs_match_transformers(llm: LLM, hf) -> None:
    prompts = random_prompts([30, 7, 50], seed=4)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=3))
    for prompt, output in zip(prompts, outputs, strict=False):
        assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == len(prompt)
        ours = [entry[token] for entry, token in zip(output.prompt_logprobs[1:], prompt[1:], strict=False)]
        assert max(abs(a - b) for a, b in zip(ours, hf_prompt_logprobs(hf, prompt), strict=False)) < 1e-4
        assert all(len(entry) >= 3 for entry in output.prompt_logprobs[1:])


def test_generated_logprobs_are_raw_model_logprobs(llm: LLM, hf) -> None:
    prompt = random_prompts([12], seed=5)[0]
    output = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=5, logprobs=2, ignore_eos=True))[0]
    completion = output.outputs[0]
    full = prompt + completion.token_ids
    reference = hf_prompt_logprobs(hf, full)[len(prompt) - 1:]
    for entry, token, expected in zip(completion.logprobs, completion.token_ids, reference, strict=False):
        assert abs(entry[token] - expected) < 1e-4
        assert len(entry) >= 2
    assert completion.cumulative_logprob == pytest.approx(sum(reference), abs=1e-3)


def hf_sliding_window_nll(hf_model, tokens: list[int], window: int, stride: int) -> float:
    """The transformers perplexity-guide recipe over [eot] + tokens."""
    ids = torch.tensor([[0] + tokens])
    total, previous_end = 0.0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + window, ids.shape[1])
        target_len = end - max(previous_end, 1)
        window_ids = ids[:, begin:end]
        with torch.no_grad():
            logprobs = torch.log_softmax(hf_model(window_ids).logits[0], dim=-1)
        for position in range(end - target_len, end):
            total -= float(logprobs[position - begin - 1, ids[0, position]])
        previous_end = end
        if end == ids.shape[1]:
            break
    return total


def test_scoring_matches_transformers_sliding_window(llm: LLM, hf) -> None:
    documents = random_prompts([5, 37, 100, 13], seed=6)
    results = llm.score(documents, window=24, stride=10, return_token_logprobs=True)
    for tokens, result in zip(documents, results, strict=False):
        assert result.num_tokens == len(tokens) == len(result.token_logprobs)
        expected = hf_sliding_window_nll(hf, tokens, 24, 10)
        assert result.nll == pytest.approx(expected, rel=1e-5)
        assert result.perplexity == pytest.approx(math.exp(expected / len(tokens)), rel=1e-5)
    # One window covering the whole text gives exactly the prompt logprobs of [eot] + text.
    whole = llm.score(documents[1], return_token_logprobs=True)[0]
    reference = hf_prompt_logprobs(hf, [0] + documents[1])
    assert max(abs(a - b) for a, b in zip(whole.token_logprobs, reference, strict=False)) < 1e-4


def test_score_text_metrics_follow_lm_eval(llm: LLM) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    result = llm.score([text])[0]
    assert result.num_bytes == len(text.encode()) and result.num_words == 9
    assert result.bits_per_byte == pytest.approx(result.nll / (result.num_bytes * math.log(2)))
    assert result.word_perplexity == pytest.approx(math.exp(result.nll / 9))
    assert result.byte_perplexity == pytest.approx(math.exp(result.nll / result.num_bytes))
    assert result.token_logprobs is None


def test_long_document_scores_in_bounded_chunks(tmp_path: Path) -> None:
    directory = build_hf_checkpoint(tmp_path / "long", max_position_embeddings=4096)
    llm = LLM(str(directory), block_size=16, max_num_batched_tokens=512)
    tokens = random_prompts([3000], seed=8)[0]
    result = llm.score([tokens], window=2048, stride=1024)[0]
    assert result.num_tokens == 3000 and math.isfinite(result.nll)
    # Longer than max_model_len itself: the default window (= max_model_len) slides over it.
    longer = llm.score([random_prompts([9000], seed=9)[0]])[0]
    assert longer.num_tokens == 9000 and math.isfinite(longer.nll)


def test_tiny_kv_budget_preempts_and_matches_unconstrained(tiny_checkpoint: Path) -> None:
    prompts = random_prompts([20, 31, 9, 26, 14, 40], seed=9)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    roomy = LLM(str(tiny_checkpoint), block_size=4, enable_prefix_caching=False)
    tight = LLM(str(tiny_checkpoint), block_size=4, num_kv_blocks=18, enable_prefix_caching=False)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, params)]
    assert tight.engine.scheduler.stats.preemptions > 0
    assert got == expected


def test_prefix_caching_reuses_blocks_and_keeps_outputs(tiny_checkpoint: Path) -> None:
    system = random_prompts([32], seed=10)[0]
    prompts = [system + tail for tail in random_prompts([5, 9, 3, 12], seed=11)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    cached = LLM(str(tiny_checkpoint), block_size=4, enable_prefix_caching=True)
    plain = LLM(str(tiny_checkpoint), block_size=4, enable_prefix_caching=False)
    first = cached.generate(prompts[:1], params)
    rest = cached.generate(prompts[1:], params)
    assert cached.engine.block_manager.prefix_cache_hits >= 3 * 8  # 32-token shared prefix = 8 blocks each
    expected = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in first + rest] == expected


def test_prompt_logprobs_of_a_shared_step_equal_each_alone(llm: LLM) -> None:
    """Sequences of one step asking for logprobs are computed together, grouped by their number of top
    alternatives; each gets what it gets alone."""
    prompts = random_prompts([12, 30, 7, 21], seed=16)
    params = [SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=k) for k in (0, 3, 0, 1)]
    execute = llm.engine.executor.execute
    widest: list[int] = []

    def recording(step_input):
        widest.append(sum(1 for s in step_input.sequences if s.logprob_targets))
        return execute(step_input)

    llm.engine.executor.execute = recording
    try:
        together = llm.generate(prompts, params)
    finally:
        del llm.engine.executor.execute
    assert max(widest) == 4  # all four in one step (70 tokens within the 96-token budget)
    for prompt, param, shared in zip(prompts, params, together, strict=True):
        alone = llm.generate([prompt], param)[0]
        assert len(shared.prompt_logprobs) == len(prompt)
        for got, want in zip(shared.prompt_logprobs[1:], alone.prompt_logprobs[1:], strict=True):
            assert got.keys() == want.keys()
            assert all(abs(got[t] - want[t]) < 1e-5 for t in got)


def test_perplexity_windows_stay_out_of_the_prefix_cache(tiny_checkpoint: Path) -> None:
    """Scoring windows are never a later prompt's prefix: they publish no blocks (so they evict no cached
    prefix) and reuse their freed blocks; a generated prompt's prefix stays cached through them."""
    llm = LLM(str(tiny_checkpoint), block_size=4, enable_prefix_caching=True, max_num_seqs=2)
    system = random_prompts([32], seed=14)[0]
    llm.generate([system + [5]], SamplingParams(temperature=0.0, max_tokens=2))
    manager = llm.engine.block_manager
    published = dict(manager.hash_to_block)
    assert len(published) >= 8
    scores = llm.score(random_prompts([40, 70, 25, 90, 60], seed=15), window=32, stride=16)
    assert all(s.num_tokens > 0 for s in scores)
    assert manager.hash_to_block == published
    llm.generate([system + [6]], SamplingParams(temperature=0.0, max_tokens=2))
    assert manager.prefix_cache_hits >= 8


def test_seeded_sampling_is_batch_invariant(llm: LLM) -> None:
    target = random_prompts([15], seed=12)[0]
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=20, seed=1234, ignore_eos=True)
    alone = llm.generate([target], params)[0].outputs[0].token_ids
    others = random_prompts([3 + i for i in range(20)], seed=13)
    batch = others[:7] + [target] + others[7:]
    mixed = llm.generate(batch, [SamplingParams(temperature=1.0, max_tokens=25, ignore_eos=True)] * 7 + [params]
                         + [SamplingParams(temperature=0.7, max_tokens=15, seed=i, ignore_eos=True)
                            for i in range(13)])
    assert mixed[7].outputs[0].token_ids == alone
    assert llm.generate([target], params)[0].outputs[0].token_ids == alone  # and on every run
    different_seed = llm.generate([target], SamplingParams(temperature=0.9, top_p=0.95, max_tokens=20, seed=99,
                                                           ignore_eos=True))[0].outputs[0].token_ids
    assert different_seed != alone


def test_top_k_1_is_greedy_and_n_samples_differ(llm: LLM) -> None:
    prompt = random_prompts([10], seed=14)[0]
    greedy = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    top1 = llm.generate([prompt], SamplingParams(temperature=1.5, top_k=1, max_tokens=12, ignore_eos=True))[0]
    assert top1.outputs[0].token_ids == greedy.outputs[0].token_ids
    many = llm.generate([prompt], SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=3, ignore_eos=True))[0]
    assert [c.index for c in many.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in many.outputs}) > 1


def test_top_p_and_min_p_exclude_the_tail() -> None:
    from neox_ray.engine.sampler import Sampler
    from neox_ray.engine.step import SamplingRow

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(400, 1)
    sampler = Sampler(0)
    top_p = [r.token_id for r in sampler(logits, [SamplingRow(top_p=0.75)] * 400)]
    assert set(top_p) == {0, 1}  # 0.5 + 0.3 reaches 0.75: tokens 2, 3 never drawn
    assert 0.5 < top_p.count(0) / 400 < 0.75  # renormalized 0.625
    min_p = [r.token_id for r in sampler(logits, [SamplingRow(min_p=0.25)] * 400)]
    assert set(min_p) == {0, 1, 2}  # 0.05 < 0.25 * 0.5
    plain = [r.token_id for r in sampler(logits[:1].repeat(2000, 1), [SamplingRow()] * 2000)]
    assert abs(plain.count(3) / 2000 - 0.05) < 0.02  # unfiltered sampling follows p


def test_penalties_change_the_distribution() -> None:
    from neox_ray.engine.sampler import Sampler
    from neox_ray.engine.step import SamplingRow

    logits = torch.tensor([[2.0, 1.9, -1.0]])
    sampler = Sampler(0)
    assert sampler(logits, [SamplingRow(temperature=0.0)])[0].token_id == 0
    penalized = SamplingRow(temperature=0.0, repetition_penalty=2.0, prompt_token_ids=[0])
    assert sampler(logits, [penalized])[0].token_id == 1
    frequency = SamplingRow(temperature=0.0, frequency_penalty=0.2, output_token_ids=[0])
    assert sampler(logits, [frequency])[0].token_id == 1
    presence = SamplingRow(temperature=0.0, presence_penalty=0.05, output_token_ids=[0, 0, 0])
    assert sampler(logits, [presence])[0].token_id == 0  # presence counts once: 1.95 > 1.9


def test_stop_strings_stop_tokens_and_min_tokens(llm: LLM) -> None:
    prompt = random_prompts([8], seed=15)[0]
    base = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    assert len(base.text) > 6
    stop = base.text[3:6]
    cut = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, stop=[stop], ignore_eos=True))
    completion = cut[0].outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    assert completion.text == base.text[:base.text.index(stop)]
    kept = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, stop=[stop], ignore_eos=True,
                                                 include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == base.text[:base.text.index(stop) + len(stop)]
    stop_id = base.token_ids[4]
    by_id = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[stop_id],
                                                  ignore_eos=True))[0].outputs[0]
    assert by_id.token_ids == base.token_ids[:base.token_ids.index(stop_id) + 1]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == stop_id
    held = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, min_tokens=10,
                                                 stop_token_ids=[stop_id], ignore_eos=True))[0].outputs[0]
    assert stop_id not in held.token_ids[:10] and len(held.token_ids) >= 10


def test_eos_finishes_with_stop(tiny_checkpoint: Path) -> None:
    llm = LLM(str(tiny_checkpoint))
    prompt = random_prompts([6], seed=16)[0]
    base = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    # Make the 3rd greedy token the eos of a fresh engine: the request then ends there with "stop".
    llm.engine.scheduler.eos_token_ids = frozenset({base.token_ids[2]})
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20))[0].outputs[0]
    assert out.token_ids == base.token_ids[:3] and out.finish_reason == "stop"


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"stop": [""]}, "stop"), ({"n": 0}, "n"), ({"top_k": -2}, "top_k"), ({"min_p": 2.0}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"logprobs": 50}, "logprobs"),
    ({"seed": -1}, "seed"), ({"presence_penalty": 3.0}, "presence_penalty"), ({"max_tokens": 1.5}, "max_tokens"),
])
def test_sampling_params_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_name_their_index_before_any_compute(llm: LLM) -> None:
    steps_before = llm.engine.scheduler.stats.steps
    with pytest.raises(ValueError, match="prompt 1: prompt is empty"):
        llm.generate(["fine", ""], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match=r"prompt 2: token id 99999 is outside the vocabulary"):
        llm.generate([[1, 2], [3], [4, 99999]], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="prompt 0: prompt has 250 tokens; with max_tokens=10 it exceeds"):
        llm.generate([[5] * 250], SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="text 1: text is empty"):
        llm.score(["ok", ""])
    with pytest.raises(ValueError, match="stride"):
        llm.score(["ok"], window=8, stride=8)
    assert llm.engine.scheduler.stats.steps == steps_before
    assert not llm.engine.has_unfinished()


def test_request_larger_than_the_kv_cache_fails_before_any_is_queued(tiny_checkpoint: Path) -> None:
    small = LLM(str(tiny_checkpoint), block_size=4, num_kv_blocks=8)  # 32 tokens of cache
    with pytest.raises(ValueError, match="prompt 1: prompt of 20 tokens \\+ max_tokens=16 needs 9 KV cache blocks"):
        small.generate([[5] * 4, [6] * 20], SamplingParams(max_tokens=16))
    assert not small.engine.has_unfinished()
    assert len(small.generate([[5] * 4], SamplingParams(max_tokens=16))[0].outputs[0].token_ids) >= 1


def test_progress_bar_runs(llm: LLM, capsys) -> None:
    llm.generate(["a", "b"], SamplingParams(max_tokens=3), use_tqdm=True)
    assert "tok/s" in capsys.readouterr().err


def test_async_engine_shares_one_loop_and_reports_death(tiny_checkpoint: Path) -> None:
    import asyncio

    from neox_ray.engine.async_engine import AsyncLLMEngine, EngineDeadError, QueueFullError

    llm = LLM(str(tiny_checkpoint), block_size=4)
    prompts = random_prompts([5, 9, 13, 7], seed=20)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    # Offline reference first: once the async loop owns the engine, only its thread may step it.
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    engine = AsyncLLMEngine(llm.engine, max_queued_requests=8)
    try:

        async def stream_all() -> list[list[int]]:
            async def one(prompt: list[int]) -> list[int]:
                last = None
                async for output in engine.stream(prompt, params):
                    last = output
                return last.outputs[0].token_ids
            return await asyncio.gather(*(one(p) for p in prompts))

        streamed = asyncio.run(stream_all())
        assert streamed == expected
        assert llm.engine.scheduler.stats.shared_decode_steps > 0
        with pytest.raises(ValueError, match="outside the vocabulary"):
            engine.submit_and_wait([10**6], params)
        import threading

        release = threading.Event()

        def failing_device(step):  # holds the step until the queue is full, then fails like a dead GPU
            release.wait(30)
            raise RuntimeError("simulated device failure")

        llm.engine.executor.execute = failing_device
        futures = [engine.submit_and_wait([5] * 8, params) for _ in range(8)]
        with pytest.raises(QueueFullError):
            engine.submit_and_wait([5] * 8, params)
        release.set()
        for future in futures:
            with pytest.raises(EngineDeadError, match="simulated device failure"):
                future.result(timeout=30)
        with pytest.raises(EngineDeadError):
            engine.check_health()
    finally:
        engine.shutdown()


def test_default_cpu_kv_cache_is_capped_by_bytes_and_available_memory(tiny_checkpoint: Path, monkeypatch,
                                                                       caplog) -> None:
    """Without num_kv_blocks / kv_cache_memory the CPU cache is sized for max_num_seqs x max_model_len tokens
    (at most 128k), no larger than CPU_DEFAULT_CACHE_BYTES (4 GiB) and than half of the memory available
    after loading (a big model's 128k tokens would not fit a laptop)."""
    from neox_ray.engine import model_runner
    roomy = LLM(str(tiny_checkpoint), block_size=4, max_num_seqs=2, max_model_len=64)
    assert roomy.engine.executor.num_kv_blocks == 2 * 64 // 4
    bytes_per_block = roomy.engine.executor.runner.kv_bytes_per_block
    monkeypatch.setattr(model_runner, "CPU_DEFAULT_CACHE_BYTES", 24 * bytes_per_block)
    with caplog.at_level("INFO", logger="neox_ray.engine.model_runner"):
        by_bytes = LLM(str(tiny_checkpoint), block_size=4, max_num_seqs=2, max_model_len=64)
    assert by_bytes.engine.executor.num_kv_blocks == 24
    assert "the CPU default of" in caplog.text and "kv_cache_memory or num_kv_blocks sets it" in caplog.text
    caplog.clear()
    monkeypatch.setattr(model_runner, "available_memory_bytes", lambda: 20 * bytes_per_block)
    with caplog.at_level("INFO", logger="neox_ray.engine.model_runner"):
        capped = LLM(str(tiny_checkpoint), block_size=4, max_num_seqs=2, max_model_len=64)
    assert capped.engine.executor.num_kv_blocks == 10
    assert "half of the memory available" in caplog.text
    explicit = LLM(str(tiny_checkpoint), block_size=4, num_kv_blocks=16)  # an explicit size is the user's call
    assert explicit.engine.executor.num_kv_blocks == 16
    assert len(capped.generate([[5] * 4], SamplingParams(max_tokens=4, ignore_eos=True))[0].outputs[0].token_ids) == 4


def test_cpu_kv_cache_is_not_touched_at_load(tiny_checkpoint: Path) -> None:
    """The CPU KV cache is reserved, not written: its pages are mapped in as requests first write them, so a
    large cache costs neither load time nor resident memory up front (zero-filling pythia-160m's default
    cache took 13 s here). Generation then reads only what it wrote."""
    import resource
    probe = LLM(str(tiny_checkpoint), block_size=16, num_kv_blocks=4)
    blocks = (256 << 20) // probe.engine.executor.runner.kv_bytes_per_block  # a 256 MiB cache
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    llm = LLM(str(tiny_checkpoint), block_size=16, num_kv_blocks=blocks)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < (64 << 20) // 4096, f"{faults} page faults while loading: the cache was written"
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    reference = probe.generate([[5, 6, 7] * 5], greedy)[0].outputs[0].token_ids
    assert llm.generate([[5, 6, 7] * 5], greedy)[0].outputs[0].token_ids == reference


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
@pytest.mark.parametrize("decode_kernel", [True, False])
def test_unwritten_kv_cache_slots_are_never_read(tiny_checkpoint: Path, monkeypatch, decode_kernel: bool,
                                                 kv_cache_dtype: str) -> None:
    """A cache full of NaN (what unwritten memory could hold; for an int8 cache, NaN scales beside values of
    127) gives the same greedy tokens and finite logprobs as a zeroed one: prefill, chunked prefill over cached
    context, prefix-cache hits and decode (C kernel and per-sequence views) read only the slots their sequence
    wrote."""
    from neox_ray.kernels import cpu_paged_attention
    if not decode_kernel:
        monkeypatch.setattr(cpu_paged_attention, "available", lambda *dtypes: False)
    prompts = [[5, 6, 7] * 9, [5, 6, 7] * 9 + [9, 10], [11] * 3, list(range(40, 77))]
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=1, ignore_eos=True)
    results = []
    for fill in (0.0, float("nan")):
        llm = LLM(str(tiny_checkpoint), block_size=4, num_kv_blocks=96, max_num_batched_tokens=16,
                  kv_cache_dtype=kv_cache_dtype)
        runner = llm.engine.executor.runner
        assert runner.decode_path == ("kernel" if decode_kernel else "views")
        if kv_cache_dtype == "int8":
            runner.kv_cache.fill_(0 if fill == 0 else 127)
            runner.kv_scales.fill_(fill)
        else:
            runner.kv_cache.fill_(fill)
        outputs = llm.generate(prompts, params)
        for output in outputs:
            assert all(math.isfinite(v) for entry in output.outputs[0].logprobs for v in entry.values())
        results.append([output.outputs[0].token_ids for output in outputs])
    assert results[0] == results[1]
