"""One schema for sampling and engine settings: every surface is derived from it, and its bounds hold on each.

The HTTP request, the batch job's per-row override columns and CLI flags, the serve CLI's engine flags and
the engine's per-step ``SamplingRow`` all come from ``SamplingParams`` / ``EngineConfig``; an out-of-range
value is an error naming the field on every surface (``SamplingParams(...)``, a completion request, a batch
row), and the extremes the schema admits (seed 2**64-1, a huge top_k) generate fine.
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import pyarrow as pa
import pytest

from neox_ray import LLM, SamplingParams
from neox_ray.engine.engine_config import EngineConfig, flag_fields
from neox_ray.engine.sampler import generator_seed
from neox_ray.engine.sampling_params import MAX_SEED, MAX_TOP_K
from neox_ray.engine.schema import SettingsError
from neox_ray.engine.step import PER_SEQUENCE_FIELDS, SAMPLING_KNOBS, SamplingRow


# ---- derivation ------------------------------------------------------------------------------------------
def test_request_carries_every_sampling_field_with_the_same_rules() -> None:
    from neox_ray.serve.protocol import SAMPLING_REQUEST_FIELDS, CompletionRequest
    from neox_ray.serve.server import SAMPLING_FIELDS

    assert set(SAMPLING_REQUEST_FIELDS) == set(SamplingParams.model_fields)
    assert set(SamplingParams.model_fields) - {"prompt_logprobs"} == SAMPLING_FIELDS  # echo + logprobs sets it
    for name in SAMPLING_REQUEST_FIELDS:
        request_field, engine_field = CompletionRequest.model_fields[name], SamplingParams.model_fields[name]
        assert request_field.annotation == engine_field.annotation, name
        assert request_field.get_default(call_default_factory=True) == \
            engine_field.get_default(call_default_factory=True), name
        if name != "max_tokens":  # the request allows 0 with echo=true
            assert request_field.metadata == engine_field.metadata, name


def test_batch_override_columns_and_flags_come_from_the_schema() -> None:
    from neox_ray.batch import cli as batch_cli
    from neox_ray.batch.stages import OVERRIDE_COLUMNS

    assert SamplingParams.row_override_fields() == OVERRIDE_COLUMNS
    assert {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop"} <= set(OVERRIDE_COLUMNS)
    parser = batch_cli.build_generate_parser(argparse.ArgumentParser())
    flags = {option: action for action in parser._actions for option in action.option_strings}
    for spec in SamplingParams.specs("flag"):
        assert spec.flag in flags and flags[spec.flag].help.replace("%%", "%").startswith(spec.description), spec.name
        assert batch_cli._GENERATE_FLAGS[spec.name] == f"sampling.{spec.name}"
    assert batch_cli._GENERATE_FLAGS["seed"] == "seed"  # --seed is the job seed
    for spec in flag_fields():
        assert batch_cli._COMMON_FLAGS[spec.name] == f"engine.{spec.name}"
        assert flags[spec.flag].help.replace("%%", "%").startswith(spec.description)
    derived = {s.name for s in flag_fields()}
    assert {"dtype", "device", "max_model_len", "tensor_parallel_size", "quantization"} <= derived

    args = parser.parse_args(["--min-p", "0.1", "--stop", "\n\n", "END", "--ignore-eos", "--max-model-len", "128",
                              "--stop-token-ids", "3", "7", "--no-skip-special-tokens"])
    assert batch_cli.overrides_from_args("generate", args) == {
        "sampling.min_p": 0.1, "sampling.stop": ["\n\n", "END"], "sampling.ignore_eos": True,
        "sampling.stop_token_ids": [3, 7], "sampling.skip_special_tokens": False, "engine.max_model_len": 128}


def test_serve_engine_flags_come_from_the_schema() -> None:
    from neox_ray.serve.cli import add_parser, resolve_config

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", "/m", "--max-num-seqs", "8", "--dtype", "float32",
                              "--max-model-len", "512"])
    engine = resolve_config(args)["applications"][0]["args"]["engine"]
    assert engine == {"max_num_seqs": 8, "dtype": "float32", "max_model_len": 512}
    with pytest.raises(SystemExit):  # choices come from the Literal type
        parser.parse_args(["serve", "--dtype", "int3"])
    args = parser.parse_args(["serve", "--model", "/m", "--quantization", "int8", "--async-scheduling"])
    assert resolve_config(args)["applications"][0]["args"]["engine"] == {"quantization": "int8",
                                                                         "async_scheduling": True}
    serve_parser = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    assert "18-36% slower" in " ".join(serve_parser.format_help().split())  # a description's % is not a format


def test_sampling_row_copies_knobs_by_name() -> None:
    assert set(SAMPLING_KNOBS) <= set(SamplingParams.model_fields)
    assert set(SAMPLING_KNOBS) | PER_SEQUENCE_FIELDS == {f for f in SamplingRow.__dataclass_fields__}
    params = SamplingParams(temperature=0.5, top_k=7, min_p=0.1, repetition_penalty=1.3, logprobs=2)
    row = SamplingRow(**{name: getattr(params, name) for name in SAMPLING_KNOBS})
    assert (row.temperature, row.top_k, row.min_p, row.repetition_penalty, row.logprobs) == (0.5, 7, 0.1, 1.3, 2)


def test_params_are_plain_values() -> None:
    params = SamplingParams(stop="x", top_k=-1, seed=MAX_SEED)
    assert params.stop == ["x"] and params.top_k == 0
    assert pickle.loads(pickle.dumps(params)) == params
    assert SamplingParams(**json.loads(params.model_dump_json())) == params
    assert params.with_overrides(temperature=0.5, top_p=None).temperature == 0.5
    assert SamplingParams(temperature=1).temperature == 1.0  # an int is a fine float
    config = EngineConfig.from_kwargs("/m", dtype="float32")
    assert pickle.loads(pickle.dumps(config)) == config


# ---- bounds, on every surface ----------------------------------------------------------------------------
BAD_VALUES = [
    ({"seed": 2**64}, "seed"), ({"seed": -1}, "seed"), ({"top_k": MAX_TOP_K + 1}, "top_k"),
    ({"top_k": -5}, "top_k"), ({"n": 129}, "n"), ({"max_tokens": 2**20 + 1}, "max_tokens"),
    ({"logprobs": 21}, "logprobs"), ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"repetition_penalty": 1e9}, "repetition_penalty"), ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"temperature": float("inf")}, "temperature"), ({"stop": ["s"] * 17}, "stop"), ({"stop": ["x" * 600]}, "stop"),
    ({"stop": ["ok", "\ud800"]}, "stop"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": [1] * 257}, "stop_token_ids"), ({"temperature": "1"}, "temperature"),
    ({"max_tokens": True}, "max_tokens"), ({"ignore_eos": 1}, "ignore_eos"), ({"top_k": 2.0}, "top_k"),
]


@pytest.mark.parametrize("values, field", BAD_VALUES, ids=[f for _, f in BAD_VALUES])
def test_sampling_params_bounds_name_the_field(values: dict, field: str) -> None:
    with pytest.raises(SettingsError) as info:
        SamplingParams(**values)
    message = str(info.value)
    assert info.value.field == field and message.startswith(field) and "\n" not in message and len(message) < 160


def test_lone_surrogate_message_is_clear() -> None:
    with pytest.raises(ValueError, match=r"stop\[1\] is not valid Unicode \(lone surrogate"):
        SamplingParams(stop=["ok", "a\udc80"])


def test_engine_config_is_strict_and_names_the_field() -> None:
    with pytest.raises(TypeError, match="unknown engine option\\(s\\): block_sise"):
        EngineConfig.from_kwargs("/m", block_sise=8)
    for kwargs, field in [({"max_num_seqs": "4"}, "max_num_seqs"), ({"allow_pickle": 1}, "allow_pickle"),
                          ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"), ({"dtype": "int3"}, "dtype"),
                          ({"seed": 2**64}, "seed"), ({"device": "gpu"}, "device"),
                          ({"async_scheduling": "sometimes"}, "async_scheduling")]:
        with pytest.raises(SettingsError) as info:
            EngineConfig.from_kwargs("/m", **kwargs)
        assert info.value.field == field and str(info.value).startswith(field)
    with pytest.raises(ValueError, match="not both"):
        EngineConfig.from_kwargs("/m", num_kv_blocks=4, kv_cache_memory=1024)


def test_bad_override_row_is_an_error_naming_the_field(tiny_checkpoint: Path) -> None:
    from neox_ray.batch.stages import prepare_generation

    batch = pa.table({
        "prompt": ["hi"] * 6,
        "seed": pa.array([None, 2.0**70, None, None, None, None], pa.float64()),
        "top_k": pa.array([None, None, -5, None, None, 10**18], pa.int64()),
        "temperature": pa.array([None, None, None, "hot", None, None], pa.string()),
        "min_p": pa.array([None, None, None, None, 1.5, None], pa.float64()),
        "id": [f"r{i}" for i in range(6)],
    })
    out = prepare_generation(batch, model=str(tiny_checkpoint), prompt_column="prompt", sampling={"max_tokens": 4},
                             job_seed=0, max_model_len=256)
    errors = out.column("error").to_pylist()
    assert errors[0] is None and errors[5] is None
    for row, field in [(1, "seed"), (2, "top_k"), (3, "temperature"), (4, "min_p")]:
        assert errors[row].startswith(f"invalid per-row override: {field} must be"), errors[row]


# ---- the extremes the schema admits work in the engine ---------------------------------------------------
def test_extreme_seed_and_top_k_generate(tiny_checkpoint: Path) -> None:
    llm = LLM(str(tiny_checkpoint), block_size=4, max_num_seqs=8)
    params = SamplingParams(temperature=0.9, max_tokens=6, seed=MAX_SEED, top_k=10**18, n=2, ignore_eos=True)
    first = llm.generate([[5, 6, 7]], params)[0]
    again = llm.generate([[9, 9], [5, 6, 7]], [SamplingParams(max_tokens=3), params])[1]
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]  # reproducible
    assert all(len(o.token_ids) == 6 for o in first.outputs)
    capped = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.9, max_tokens=6, seed=3, top_k=MAX_TOP_K,
                                                      ignore_eos=True, logprobs=20))[0].outputs[0]
    unfiltered = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.9, max_tokens=6, seed=3,
                                                          ignore_eos=True))[0].outputs[0]
    assert capped.token_ids == unfiltered.token_ids  # top_k >= vocab is no filter
    tiny_temperature = llm.generate([[5, 6, 7]], SamplingParams(temperature=1e-30, max_tokens=6, ignore_eos=True))
    greedy = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    assert tiny_temperature[0].outputs[0].token_ids == greedy[0].outputs[0].token_ids


def test_generator_seeds_fit_torch_and_differ() -> None:
    seeds = {generator_seed(seed, position) for seed in (0, 1, MAX_SEED, MAX_SEED + 7919) for position in range(4)}
    assert len(seeds) == 16 and all(0 <= s < 2**63 for s in seeds)


# ---- the HTTP surface (in process: FastAPI's test client over the real app) -------------------------------
@pytest.fixture(scope="module")
def client(tiny_checkpoint: Path):
    from fastapi.testclient import TestClient

    from neox_ray.engine.async_engine import AsyncLLMEngine
    from neox_ray.serve.server import OpenAIServer, ServerSettings, create_app

    llm = LLM(str(tiny_checkpoint), block_size=4, max_num_seqs=8)
    engine = AsyncLLMEngine(llm.engine)
    with TestClient(create_app(OpenAIServer(engine, ServerSettings(served_model_name="tiny")))) as test_client:
        yield test_client
    engine.shutdown()


REQUEST_BAD_VALUES = BAD_VALUES + [({"prompt_logprobs": 2}, "prompt_logprobs"), ({"n": "2"}, "n"),
                                   ({"stop": {"a": 1}}, "stop")]


@pytest.mark.parametrize("values, field", REQUEST_BAD_VALUES, ids=[f for _, f in REQUEST_BAD_VALUES])
def test_request_bounds_are_400_naming_the_field(client, values: dict, field: str) -> None:
    body = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 2, **values})
    response = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"], error
    assert len(error["message"]) < 200  # never the whole input echoed back


def test_request_extremes_and_echo_still_work(client) -> None:
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 3,
                                                    "seed": MAX_SEED, "top_k": 10**18, "stop": None})
    assert response.status_code == 200, response.text
    echo = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 0, "echo": True})
    assert echo.status_code == 200 and echo.json()["choices"][0]["text"] == "hello"
    long_prompt = client.post("/v1/completions", json={"model": "tiny", "prompt": {"text": "x" * 10_000}})
    assert long_prompt.status_code == 400 and len(long_prompt.text) < 400  # the input is not echoed back
