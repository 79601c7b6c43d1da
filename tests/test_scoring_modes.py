"""Scoring modes against lm-eval's definitions with transformers as the numerical oracle: loglikelihood of
(context, continuation) pairs (tokenization, empty context, trailing whitespace, truncation, is_greedy,
prefix-cache reuse of shared contexts) and lm-eval's rolling perplexity windows."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from checkpoints import load_hf_model

from neox_ray import LLM
from neox_ray.engine.scoring import plan_rolling_windows

MAX_LEN = 32


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Path) -> LLM:
    return LLM(str(tiny_checkpoint), block_size=4, max_num_batched_tokens=64, max_num_seqs=8,
               max_model_len=MAX_LEN)


@pytest.fixture(scope="module")
def hf(tiny_checkpoint: Path):
    return load_hf_model(tiny_checkpoint)


def lm_eval_pair(llm: LLM, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's own tokenization of a pair (its ``_encode_pair``; the empty-context branch of ``loglikelihood``)."""
    encode = llm.tokenizer.encode
    eot = llm.engine.eot_token_id
    if context == "":
        continuation_enc = encode(continuation)
        return ([eot], continuation_enc) if continuation_enc[0] != eot else (continuation_enc[:1], continuation_enc[1:])
    model = pytest.importorskip("lm_eval.api.model")
    fake_lm = SimpleNamespace(backend="causal", tok_encode=lambda text, **_: encode(text))
    return model.TemplateLM._encode_pair(fake_lm, context, continuation)


def hf_loglikelihood(hf_model, context_enc: list[int], continuation_enc: list[int],
                     max_length: int) -> tuple[float, bool]:
    """lm-eval's HFLM._loglikelihood_tokens for one pair (causal): truncate from the left, score the tail."""
    inp = (context_enc + continuation_enc)[-(max_length + 1):][:-1]
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_model(torch.tensor([inp])).logits[0].float(), dim=-1)
    rows = logprobs[len(inp) - len(continuation_enc):len(inp)]
    targets = torch.tensor(continuation_enc)
    greedy = bool((rows.argmax(-1) == targets).all())
    return float(rows.gather(1, targets[:, None]).sum()), greedy


PAIRS = [
    ("The quick brown fox", " jumps over the lazy dog."),
    ("The quick brown fox ", "jumps"),            # trailing whitespace moves to the continuation
    ("Question: what is two plus two?\nAnswer:", " four"),
    ("", "Hello world"),                           # empty context: conditioned on the end-of-text token
    ("A very long context " * 20, " that is truncated from the left"),  # over max_model_len
]


def test_loglikelihood_matches_lm_eval_and_transformers(llm: LLM, hf) -> None:
    results = llm.loglikelihood(PAIRS, return_token_logprobs=True)
    for (context, continuation), result in zip(PAIRS, results, strict=True):
        context_enc, continuation_enc = lm_eval_pair(llm, context, continuation)
        assert llm.encode_pair(context, continuation) == (context_enc, continuation_enc)
        expected, greedy = hf_loglikelihood(hf, context_enc, continuation_enc, MAX_LEN)
        assert result.num_tokens == len(continuation_enc) == len(result.token_logprobs)
        assert result.logprob == pytest.approx(expected, rel=1e-4)
        assert math.fsum(result.token_logprobs) == pytest.approx(result.logprob)
        assert result.is_greedy == greedy
    assert len(llm.tokenizer.encode(PAIRS[-1][0])) > MAX_LEN


def test_trailing_whitespace_and_empty_context_tokenization(llm: LLM) -> None:
    encode = llm.tokenizer.encode
    context_enc, continuation_enc = llm.encode_pair("Hello ", "world")
    assert context_enc == encode("Hello") and context_enc + continuation_enc == encode("Hello world")
    assert llm.encode_pair("", "world") == ([llm.engine.eot_token_id], encode("world"))


def test_is_greedy_on_the_models_own_continuation(llm: LLM, hf) -> None:
    context = llm.tokenizer.encode("Once upon a time")
    with torch.no_grad():
        out = hf.generate(torch.tensor([context]), max_new_tokens=5, do_sample=False, pad_token_id=0)
    greedy = out[0, len(context):].tolist()
    wrong = greedy[:-1] + [(greedy[-1] + 1) % 400]
    first, second = llm.engine.loglikelihood([(context, greedy), (context, wrong)])
    assert first.is_greedy and not second.is_greedy
    assert first.logprob > second.logprob


def test_bad_pairs_are_item_errors(llm: LLM) -> None:
    plan = llm.engine.plan_loglikelihood([([1, 2], []), ([1], list(range(2, 2 + MAX_LEN + 1))), ([1], [2])])
    assert set(plan.errors) == {0, 1} and set(plan.tasks) == {2}
    assert "continuation is empty" in plan.errors[0] and "max_model_len" in plan.errors[1]


def test_shared_contexts_are_served_from_the_prefix_cache(tiny_checkpoint: Path, hf) -> None:
    contexts = ["Passage one is about the sea and ships and sailors who cross it. Question:",
                "Passage two is about mountains, snow and the people who climb them. Question:"]
    choices = [" yes", " no", " maybe", " never"]
    pairs = [(context, choice) for context in contexts for choice in choices]
    outputs = {}
    for caching in (True, False):
        llm = LLM(str(tiny_checkpoint), block_size=4, max_num_batched_tokens=256, max_num_seqs=8,
                  max_model_len=128, enable_prefix_caching=caching)
        before = llm.engine.stats()["prefix_cache_hit_blocks"]
        outputs[caching] = llm.loglikelihood(pairs)
        hits = llm.engine.stats()["prefix_cache_hit_blocks"] - before
        if caching:  # each context's later 3 choices reuse all its full blocks but the one holding a target
            context_blocks = [(len(llm.encode_pair(c, choices[0])[0]) - 1) // 4 for c in contexts]
            assert hits >= sum(3 * (blocks - 1) for blocks in context_blocks) > 0
        else:
            assert hits == 0
    for pair, cached, uncached in zip(pairs, outputs[True], outputs[False], strict=True):
        context_enc, continuation_enc = llm.encode_pair(*pair)
        expected, _ = hf_loglikelihood(hf, context_enc, continuation_enc, 128)
        assert cached.logprob == pytest.approx(expected, rel=1e-4)
        assert cached.logprob == pytest.approx(uncached.logprob, rel=1e-5)


# ---- rolling perplexity ----------------------------------------------------------------------------

def lm_eval_rolling_windows(tokens: list[int], eot: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    utils = pytest.importorskip("lm_eval.utils")
    return [utils.make_disjoint_window(w) for w in
            utils.get_rolling_token_windows(token_list=tokens, prefix_token=eot, max_seq_len=max_len, context_len=1)]


def hf_rolling_nll(hf_model, windows: list[tuple[list[int], list[int]]]) -> float:
    total = 0.0
    for context, predicted in windows:  # lm-eval scores the last len(predicted) logits of (context + predicted)[:-1]
        inp = (context + predicted)[:-1]
        with torch.no_grad():
            logprobs = torch.log_softmax(hf_model(torch.tensor([inp])).logits[0].float(), dim=-1)
        rows = logprobs[len(inp) - len(predicted):]
        total -= float(rows.gather(1, torch.tensor(predicted)[:, None]).sum())
    return total


@pytest.mark.parametrize("length", [1, 20, MAX_LEN, MAX_LEN + 1, 3 * MAX_LEN + 7])
def test_rolling_windows_are_lm_evals(length: int) -> None:
    tokens = list(range(10, 10 + length))
    full = [0] + tokens
    ours = [(full[w.begin:w.first_target], full[w.first_target:w.end]) for w in plan_rolling_windows(length, MAX_LEN)]
    theirs = lm_eval_rolling_windows(tokens, 0, MAX_LEN)
    assert [p for _, p in ours] == [p for _, p in theirs]
    # lm-eval's disjoint context is the input minus the predicted overlap: the same model input.
    assert [(c + p)[:-1][-MAX_LEN:] for c, p in ours] == [(c + p)[:-1][-MAX_LEN:] for c, p in theirs]


def test_rolling_perplexity_matches_lm_eval(llm: LLM, hf) -> None:
    generator = torch.Generator().manual_seed(3)
    documents = [torch.randint(2, 400, (n,), generator=generator).tolist() for n in (5, MAX_LEN, 90)]
    results = llm.score(documents, perplexity="rolling", return_token_logprobs=True)
    sliding = llm.score(documents)
    for tokens, result, slid in zip(documents, results, sliding, strict=True):
        expected = hf_rolling_nll(hf, lm_eval_rolling_windows(tokens, 0, MAX_LEN))
        assert result.num_tokens == len(tokens) == len(result.token_logprobs)
        assert result.nll == pytest.approx(expected, rel=1e-4)
        if len(tokens) <= MAX_LEN - 1:  # one window either way
            assert result.nll == pytest.approx(slid.nll, rel=1e-5)
    with pytest.raises(ValueError, match="perplexity must be one of"):
        llm.score(documents, perplexity="chunked")


# ---- batch: config, stages in-process, one small job on the session's Ray ------------------------------

def test_score_config_modes() -> None:
    from neox_ray.batch.config import JobConfigError, validate_job_config

    base = {"model": "m", "input": "i", "output": "o"}
    config = validate_job_config("score", {**base, "mode": "loglikelihood", "context_column": "q"})
    assert config.mode == "loglikelihood" and config.context_column == "q"
    assert validate_job_config("score", base).mode == "perplexity"
    assert validate_job_config("score", {**base, "perplexity": "rolling"}).perplexity == "rolling"
    with pytest.raises(JobConfigError, match="only apply to mode=perplexity"):
        validate_job_config("score", {**base, "mode": "loglikelihood", "window": 16})
    with pytest.raises(JobConfigError, match="stride only applies"):
        validate_job_config("score", {**base, "perplexity": "rolling", "stride": 4})
    with pytest.raises(JobConfigError, match="mode"):
        validate_job_config("score", {**base, "mode": "accuracy"})


def test_cli_score_flags_map_to_config_keys() -> None:
    import argparse

    from neox_ray.batch.cli import build_score_parser, overrides_from_args

    args = build_score_parser(argparse.ArgumentParser()).parse_args(
        ["--mode", "loglikelihood", "--context-column", "q", "--continuation-column", "a", "--token-logprobs"])
    assert overrides_from_args("score", args) == {"mode": "loglikelihood", "context_column": "q",
                                                  "continuation_column": "a", "token_logprobs": True}
    args = build_score_parser(argparse.ArgumentParser()).parse_args(["--perplexity", "rolling"])
    assert overrides_from_args("score", args) == {"perplexity": "rolling"}


def test_loglikelihood_stage_rows_match_llm(llm: LLM, tiny_checkpoint: Path) -> None:
    import pyarrow as pa

    from neox_ray.batch.stages import ScoreEngineStage, format_scores, prepare_loglikelihood

    contexts = [p[0] for p in PAIRS] + [None, "ok"]
    continuations = [p[1] for p in PAIRS] + ["x", ""]
    batch = pa.table({"id": [f"r{i}" for i in range(len(contexts))], "context": contexts,
                      "continuation": continuations})
    prepared = prepare_loglikelihood(batch, model=str(tiny_checkpoint), context_column="context",
                                     continuation_column="continuation")
    stage = ScoreEngineStage(str(tiny_checkpoint), {"block_size": 4, "max_model_len": MAX_LEN}, "text", None, None,
                             mode="loglikelihood", token_logprobs=True)
    try:
        rows = format_scores(stage(prepared)).to_pylist()
    finally:
        stage.engine.shutdown()
    expected = llm.loglikelihood(PAIRS, return_token_logprobs=True)
    for row, result in zip(rows, expected, strict=False):
        assert row["error"] is None and row["num_tokens"] == result.num_tokens
        assert row["is_greedy"] == result.is_greedy
        assert row["logprob"] == pytest.approx(result.logprob, rel=1e-5)
        assert row["token_logprobs"] == pytest.approx(result.token_logprobs, rel=1e-5)
    assert rows[-2]["error"] == "context is null" and rows[-1]["error"] == "continuation is empty"
    assert rows[-1]["logprob"] is None and set(rows[0]) == {"id", "context", "continuation", "logprob",
                                                           "is_greedy", "num_tokens", "token_logprobs", "error"}


def test_rolling_stage_rows_match_llm(llm: LLM, tiny_checkpoint: Path) -> None:
    import pyarrow as pa

    from neox_ray.batch.stages import ScoreEngineStage, format_scores, prepare_scoring

    texts = ["The quick brown fox jumps over the lazy dog. " * 4, "short one"]
    prepared = prepare_scoring(pa.table({"id": ["a", "b"], "text": texts}), model=str(tiny_checkpoint),
                               text_column="text")
    stage = ScoreEngineStage(str(tiny_checkpoint), {"block_size": 4, "max_model_len": MAX_LEN}, "text", None, None,
                             perplexity="rolling", token_logprobs=True)
    try:
        rows = format_scores(stage(prepared)).to_pylist()
    finally:
        stage.engine.shutdown()
    for row, result in zip(rows, llm.score(texts, perplexity="rolling"), strict=True):
        assert row["nll"] == pytest.approx(result.nll, rel=1e-5) and len(row["token_logprobs"]) == result.num_tokens


@pytest.mark.slow
def test_loglikelihood_job_end_to_end(ray_session, tiny_checkpoint: Path, llm: LLM, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from neox_ray.batch.config import validate_job_config
    from neox_ray.batch.runner import run_job
    from neox_ray.batch.sink import read_output

    questions = [f"Question {i}: which word comes next in the fox sentence?" for i in range(6)]
    choices = [" the", " quick", " brown", " fox"]
    pairs = [(q, c) for q in questions for c in choices]
    contexts: list = [p[0] for p in pairs]
    contexts[1] = None
    pq.write_table(pa.table({"q": contexts, "a": [p[1] for p in pairs]}), tmp_path / "mc.parquet")
    raw = {"model": str(tiny_checkpoint), "input": str(tmp_path / "mc.parquet"), "output": str(tmp_path / "out"),
           "mode": "loglikelihood", "context_column": "q", "continuation_column": "a",
           "engine": {"device": "cpu", "dtype": "float32", "max_model_len": MAX_LEN, "block_size": 4},
           "replicas": {"num_replicas": 1, "num_cpus": 0.5, "batch_size": 8}, "rows_per_file": 12,
           "progress_interval_s": 1000.0}
    summary = run_job(validate_job_config("score", raw), log=lambda line: None)
    rows = {r["id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    expected = llm.loglikelihood([p for i, p in enumerate(pairs) if i != 1])
    ok = [i for i in range(len(pairs)) if i != 1]
    assert rows["mc.parquet:1"]["error"] == "context is null"
    for i, result in zip(ok, expected, strict=True):
        assert rows[f"mc.parquet:{i}"]["logprob"] == pytest.approx(result.logprob, rel=1e-5)
    assert summary["mode"] == "loglikelihood" and summary["rows_ok"] == len(ok) and summary["rows_failed"] == 1
    assert summary["logprob"] == pytest.approx(sum(r.logprob for r in expected), rel=1e-6)
    assert summary["greedy_rows"] == sum(r.is_greedy for r in expected)
    assert summary["num_tokens"] == sum(r.num_tokens for r in expected)
    again = run_job(validate_job_config("score", raw), log=lambda line: None)  # complete: nothing to redo
    assert again["logprob"] == summary["logprob"]


# ---- generation logprobs in batch outputs --------------------------------------------------------------

def test_generate_config_and_flags_for_logprobs() -> None:
    import argparse

    from neox_ray.batch.cli import build_generate_parser, overrides_from_args
    from neox_ray.batch.config import validate_job_config

    base = {"model": "m", "input": "i", "output": "o"}
    assert validate_job_config("generate", base).output_top_logprobs is None
    config = validate_job_config("generate", {**base, "logprobs": True})
    assert config.output_top_logprobs == 0 and config.engine_sampling == {"max_tokens": 64, "logprobs": 0}
    assert validate_job_config("generate", {**base, "top_logprobs": 3}).engine_sampling["logprobs"] == 3
    args = build_generate_parser(argparse.ArgumentParser()).parse_args(["--logprobs", "--top-logprobs", "2"])
    assert overrides_from_args("generate", args) == {"logprobs": True, "top_logprobs": 2}


@pytest.mark.parametrize("top", [0, 3])
def test_generation_stage_logprobs_match_the_engine(tiny_checkpoint: Path, top: int) -> None:
    import pyarrow as pa

    from neox_ray import SamplingParams
    from neox_ray.batch.stages import GenerateEngineStage, format_generation, prepare_generation

    prompts = ["The quick brown fox", "Once upon a time"]
    batch = pa.table({"id": ["a", "b"], "prompt": prompts})
    sampling = {"max_tokens": 5, "temperature": 0.7, "logprobs": top}
    prepared = prepare_generation(batch, model=str(tiny_checkpoint), prompt_column="prompt", sampling=sampling,
                                  job_seed=1, max_model_len=MAX_LEN)
    stage = GenerateEngineStage(str(tiny_checkpoint), {"block_size": 4})
    try:
        rows = format_generation(stage(prepared), 1, top).to_pylist()
        seeds = [SamplingParams.model_validate_json(p).seed for p in prepared.column("__neox_sampling").to_pylist()]
        expected = stage.llm.generate(prompts, [SamplingParams(**sampling, seed=seed) for seed in seeds])
    finally:
        stage.engine.shutdown()
    for row, output in zip(rows, expected, strict=True):
        sample = output.outputs[0]
        assert row["token_ids"] == sample.token_ids and row["generated_text"] == sample.text
        assert row["token_logprobs"] == pytest.approx([e[t] for t, e in zip(sample.token_ids, sample.logprobs,
                                                                             strict=True)])
        assert row["cumulative_logprob"] == pytest.approx(sample.cumulative_logprob)
        assert math.fsum(row["token_logprobs"]) == pytest.approx(row["cumulative_logprob"])
        if top:
            for step, entry in zip(row["top_logprobs"], sample.logprobs, strict=True):
                assert len(step) == top
                likeliest = sorted(entry.items(), key=lambda item: -item[1])[:top]
                assert [(s["token_id"], pytest.approx(s["logprob"])) for s in step] == \
                    [(t, lp) for t, lp in likeliest]
        else:
            assert "top_logprobs" not in row


# ---- /v1/score, in process -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def score_client(tiny_checkpoint: Path):
    from fastapi.testclient import TestClient

    from neox_ray.engine.async_engine import AsyncLLMEngine
    from neox_ray.serve.server import OpenAIServer, ServerSettings, create_app

    # Its own engine: the loop thread steps it, so it must not be the one the `llm` fixture steps itself.
    engine = AsyncLLMEngine(LLM(str(tiny_checkpoint), block_size=4, max_num_batched_tokens=64, max_num_seqs=8,
                                max_model_len=MAX_LEN).engine)
    try:
        yield TestClient(create_app(OpenAIServer(engine, ServerSettings("tiny"))))
    finally:
        engine.shutdown()


def test_score_route_loglikelihood_and_rolling_match_llm(score_client, llm: LLM) -> None:
    expected = llm.loglikelihood(PAIRS, return_token_logprobs=True)
    bodies = [{"pairs": [list(p) for p in PAIRS]},
              {"context": [p[0] for p in PAIRS], "continuation": [p[1] for p in PAIRS]}]
    for body in bodies:
        response = score_client.post("/v1/score", json={"model": "tiny", "mode": "loglikelihood",
                                                        "return_token_logprobs": True, **body})
        assert response.status_code == 200, response.text
        for got, want in zip(response.json()["data"], expected, strict=True):
            assert got["object"] == "loglikelihood" and got["is_greedy"] == want.is_greedy
            assert got["logprob"] == pytest.approx(want.logprob, rel=1e-5)
            assert got["token_logprobs"] == pytest.approx(want.token_logprobs, rel=1e-5)
    text = "The quick brown fox jumps over the lazy dog. " * 3
    rolling = score_client.post("/v1/score", json={"model": "tiny", "input": text, "perplexity": "rolling"})
    assert rolling.status_code == 200, rolling.text
    assert rolling.json()["data"][0]["nll"] == pytest.approx(llm.score(text, perplexity="rolling")[0].nll, rel=1e-5)


@pytest.mark.parametrize("body, param", [
    ({"mode": "loglikelihood"}, "pairs"),
    ({"mode": "loglikelihood", "context": ["a"]}, "continuation"),
    ({"mode": "loglikelihood", "context": ["a", "b"], "continuation": ["c"]}, "continuation"),
    ({"mode": "loglikelihood", "pairs": [["a", "b"]], "input": "x"}, "input"),
    ({"mode": "loglikelihood", "pairs": [["a", ""]]}, "pairs"),
    ({}, "input"),
])
def test_score_route_bad_loglikelihood_bodies_are_400(score_client, body: dict, param: str) -> None:
    response = score_client.post("/v1/score", json={"model": "tiny", **body})
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_llm_loglikelihood_names_the_bad_pair(llm: LLM) -> None:
    from neox_ray.engine.scoring import ScoreItemError

    with pytest.raises(ScoreItemError, match="pair 1: continuation is empty"):
        llm.loglikelihood([("a", "b"), ("a", "")])
    with pytest.raises(ValueError, match="pair 0: expected"):
        llm.loglikelihood([("a",)])  # type: ignore[list-item]


def test_loglikelihood_preflight_checks_both_columns(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from neox_ray.batch.config import validate_job_config
    from neox_ray.batch.runner import JobError, job_identity, preflight
    from neox_ray.batch.source import InputError

    def config(**columns):
        pq.write_table(pa.table(columns), tmp_path / "in.parquet")
        return validate_job_config("score", {"model": str(tiny_checkpoint), "input": str(tmp_path / "in.parquet"),
                                             "output": str(tmp_path / "out"), "mode": "loglikelihood"})

    good = config(context=["a"], continuation=["b"])
    assert job_identity(good, preflight(good))["mode"] == "loglikelihood"
    with pytest.raises(JobError, match="no column 'context'"):
        preflight(config(question=["a"], continuation=["b"]))
    with pytest.raises(JobError, match="must hold strings"):
        preflight(config(context=[1], continuation=["b"]))
    with pytest.raises(InputError, match="continuation"):
        preflight(config(context=["a"], answer=["b"]))


def test_async_loglikelihood_serves_shared_contexts_from_the_cache(tiny_checkpoint: Path, hf) -> None:
    import asyncio

    from neox_ray.engine.async_engine import AsyncLLMEngine

    llm = LLM(str(tiny_checkpoint), block_size=4, max_num_batched_tokens=256, max_model_len=128)
    context = llm.tokenizer.encode("A shared multiple-choice question about the sea, ships and sailors?")
    items = [(context, llm.tokenizer.encode(choice)) for choice in (" yes", " no", " maybe", " never")]
    engine = AsyncLLMEngine(llm.engine)
    try:
        outputs = asyncio.run(engine.loglikelihood(items))
    finally:
        engine.shutdown()
    assert llm.engine.stats()["prefix_cache_hit_blocks"] >= 3 * ((len(context) - 1) // 4)
    for (context_ids, continuation_ids), output in zip(items, outputs, strict=True):
        expected, _ = hf_loglikelihood(hf, context_ids, continuation_ids, 128)
        assert output.logprob == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_generate_job_with_top_logprobs_end_to_end(ray_session, tiny_checkpoint: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from neox_ray import SamplingParams
    from neox_ray.batch.config import validate_job_config
    from neox_ray.batch.runner import run_job
    from neox_ray.batch.sink import read_output

    prompts: list = ["the quick brown fox", None, "ray data reads parquet", "a lazy dog"]
    pq.write_table(pa.table({"prompt": prompts}), tmp_path / "p.parquet")
    raw = {"model": str(tiny_checkpoint), "input": str(tmp_path / "p.parquet"), "output": str(tmp_path / "out"),
           "sampling": {"max_tokens": 4, "temperature": 0.0, "ignore_eos": True}, "top_logprobs": 2,
           "engine": {"device": "cpu", "dtype": "float32"}, "rows_per_file": 2, "progress_interval_s": 1000.0,
           "replicas": {"num_replicas": 1, "num_cpus": 0.5, "batch_size": 2}}
    run_job(validate_job_config("generate", raw), log=lambda line: None)
    rows = {r["id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    assert rows["p.parquet:1"]["error"] == "prompt is null" and rows["p.parquet:1"]["top_logprobs"] is None
    reference = LLM(str(tiny_checkpoint), device="cpu", dtype="float32")
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=2)
    for index in (0, 2, 3):
        row, sample = rows[f"p.parquet:{index}"], reference.generate(prompts[index], params)[0].outputs[0]
        assert row["token_ids"] == sample.token_ids
        assert row["token_logprobs"] == pytest.approx([e[t] for t, e in zip(sample.token_ids, sample.logprobs,
                                                                             strict=True)], rel=1e-5)
        assert row["cumulative_logprob"] == pytest.approx(sample.cumulative_logprob, rel=1e-5)
        assert [[s["token_id"] for s in step] for step in row["top_logprobs"]] == \
            [[t for t, _ in sorted(e.items(), key=lambda item: -item[1])[:2]] for e in sample.logprobs]


def test_logprob_rows_split_into_chunks_give_the_same_scores(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step's logprob rows go through the LM head LOGPROB_CHUNK_ROWS at a time; chunk edges inside a sequence
    and between sequences change nothing (scores, loglikelihoods and the is-greedy alternative)."""
    from neox_ray.engine import model_runner

    docs = [[(7 * i + 3 * j) % 200 + 5 for j in range(n)] for i, n in enumerate((29, 5, 17, 2))]
    pairs = [([11, 12, 13], [14, 15, 16, 17]), ([20], [21])]
    whole = llm.score(docs), llm.engine.loglikelihood(pairs)
    monkeypatch.setattr(model_runner, "LOGPROB_CHUNK_ROWS", 3)
    chunked = llm.score(docs), llm.engine.loglikelihood(pairs)
    assert [r.nll for r in chunked[0]] == pytest.approx([r.nll for r in whole[0]], abs=1e-5)
    assert [(r.logprob, r.is_greedy) for r in chunked[1]] == [(pytest.approx(r.logprob, abs=1e-5), r.is_greedy)
                                                              for r in whole[1]]
