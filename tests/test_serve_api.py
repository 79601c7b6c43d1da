"""The online endpoint end to end: a real Ray Serve instance on 127.0.0.1 serving the tiny checkpoint.

Three small applications share one Serve instance: ``main`` (API key from a file, generous limits),
``queue`` (max_queued_requests=2) and ``timeout`` (request_timeout_s=0.3, API key from an environment
variable). Each has its own route prefix and app name so other tests' Serve apps are left alone.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    import httpx
except ImportError:  # openai >= 3 depends on httpx's successor, which keeps its API under a new name
    import httpx2 as httpx

from neox_ray.engine.sampling_params import SamplingParams
from neox_ray.serve.metrics import parse_exposition

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

API_KEY = "sk-test-main"
ENV_API_KEY = "sk-test-from-env"
MODEL_NAME = "tiny-pythia"
# max_model_len beyond the checkpoint's 256 positions (rotary has no table to run out of) lets a request
# run long enough (~1 s) to be timed out or disconnected mid-generation on a fast machine.
ENGINE = {"dtype": "float32", "device": "cpu", "max_num_seqs": 32, "max_model_len": 1024}
PROMPT = "The quick brown fox"


@dataclass
class App:
    base_url: str       # ends with /v1
    root_url: str       # the app's route prefix, for /health and /metrics
    api_key: str

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@dataclass
class Endpoint:
    main: App
    queue: App
    timeout: App


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint(ray_session, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    from ray import serve

    from neox_ray.serve.deployment import ServeArgs, build_application

    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config  # another test module may have started Serve first
    host = "127.0.0.1" if http.host in ("0.0.0.0", "127.0.0.1", "localhost") else http.host
    key_file = tmp_path_factory.mktemp("keys") / "api-keys"
    key_file.write_text(f"{API_KEY}\nsk-second-key\n")
    common = dict(model=str(tiny_checkpoint), served_model_name=MODEL_NAME, engine=ENGINE, replica_num_cpus=0.25)
    apps = {
        "main": (ServeArgs(**common, api_key_file=str(key_file), max_queued_requests=64, request_timeout_s=120),
                 {}, API_KEY),
        "queue": (ServeArgs(**common, api_key_file=str(key_file), max_queued_requests=2, request_timeout_s=120),
                  {}, API_KEY),
        "timeout": (ServeArgs(**common, api_key_env="NEOX_SERVE_TEST_KEY", request_timeout_s=0.3),
                    {"ray_actor_options": {"num_cpus": 0.25,
                                           "runtime_env": {"env_vars": {"NEOX_SERVE_TEST_KEY": ENV_API_KEY}}}},
                    ENV_API_KEY),
    }
    names = []
    urls = {}
    for name, (args, options, key) in apps.items():
        app_name, prefix = f"neox-serve-test-{name}", f"/neox-test-{name}"
        serve.run(build_application(args, **options), name=app_name, route_prefix=prefix)
        names.append(app_name)
        root = f"http://{host}:{http.port}{prefix}"
        urls[name] = App(base_url=f"{root}/v1", root_url=root, api_key=key)
    try:
        yield Endpoint(**urls)
    finally:
        for app_name in names:
            serve.delete(app_name)


@pytest.fixture(scope="module")
def reference_llm(tiny_checkpoint: Path):
    from neox_ray.llm import LLM

    return LLM(str(tiny_checkpoint), **ENGINE)


@pytest.fixture()
def client(endpoint: Endpoint):
    from openai import OpenAI

    return OpenAI(base_url=endpoint.main.base_url, api_key=API_KEY, max_retries=0, timeout=60)


def _metrics(app: App) -> dict[str, float]:
    response = httpx.get(f"{app.root_url}/metrics", headers=app.headers(), timeout=30)
    assert response.status_code == 200, response.text
    return parse_exposition(response.text)


# ---- the official openai client --------------------------------------------------------------------
def test_completion_and_stream_concatenate_to_same_text(client) -> None:
    completion = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=20, temperature=0.9,
                                           seed=11)
    text = completion.choices[0].text
    assert completion.object == "text_completion"
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=20, temperature=0.9,
                                            seed=11, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert streamed == text
    assert len([c for c in chunks if c.choices]) > 1, "the stream should arrive in several chunks"
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == completion.choices[0].finish_reason


def test_n2_and_logprobs(client) -> None:
    completion = client.completions.create(model=MODEL_NAME, prompt=[PROMPT, "Ray Data"], n=2, max_tokens=8,
                                           temperature=1.0, seed=3, logprobs=3,
                                           extra_body={"ignore_eos": True})
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    assert completion.usage.completion_tokens == 4 * 8
    for choice in completion.choices:
        logprobs = choice.logprobs
        assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 8
        assert logprobs.text_offset == sorted(logprobs.text_offset)
        for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=False):
            assert chosen <= 0.0 and 3 <= len(top) <= 4
            assert max(top.values()) >= chosen - 1e-6
    assert completion.choices[0].text != completion.choices[1].text  # n samples differ


def test_echo_with_max_tokens_zero_returns_prompt_logprobs(client, reference_llm) -> None:
    completion = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1,
                                           temperature=0)
    choice = completion.choices[0]
    assert choice.text == PROMPT
    token_ids = reference_llm.tokenizer.encode(PROMPT)
    assert len(choice.logprobs.token_logprobs) == len(token_ids)
    assert choice.logprobs.token_logprobs[0] is None
    reference = reference_llm.engine  # prompt logprobs straight from the engine, offline
    request_id = reference.add_request(token_ids, SamplingParams(max_tokens=1, prompt_logprobs=1), prefill_only=True,
                                       logprob_start=1)
    final = None
    while final is None:
        final = next((o for o in reference.step() if o.request_id == request_id and o.finished), None)
    expected = [entry[token] for entry, token in zip(final.prompt_logprobs[1:], token_ids[1:], strict=False)]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert completion.usage.completion_tokens == 0

    # lm-eval's local-completions: token ids in, echo + max_tokens=1, slice [ctxlen:-1]
    lm_eval = client.completions.create(model=MODEL_NAME, prompt=[token_ids], max_tokens=1, echo=True, logprobs=1,
                                        temperature=0)
    token_logprobs = lm_eval.choices[0].logprobs.token_logprobs
    assert len(token_logprobs) == len(token_ids) + 1
    assert token_logprobs[1:len(token_ids)] == pytest.approx(expected, abs=1e-4)


def test_models_route(client) -> None:
    models = client.models.list()
    assert [model.id for model in models.data] == [MODEL_NAME]


# ---- batch / online parity -------------------------------------------------------------------------
@pytest.mark.parametrize("temperature,seed", [(0.0, None), (0.8, 1234)])
def test_endpoint_text_equals_llm_generate(client, reference_llm, temperature: float, seed: int | None) -> None:
    for prompt in (PROMPT, "Once upon a time"):
        online = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=temperature,
                                           seed=seed, top_p=0.95)
        offline = reference_llm.generate(prompt, SamplingParams(max_tokens=24, temperature=temperature, seed=seed,
                                                                top_p=0.95))
        assert online.choices[0].text == offline[0].outputs[0].text
        assert online.usage.completion_tokens == len(offline[0].outputs[0].token_ids)


def test_score_matches_llm_score(endpoint: Endpoint, reference_llm) -> None:
    texts = [PROMPT + " jumps over the lazy dog.", "Ray Data reads prompts from Parquet."]
    response = httpx.post(f"{endpoint.main.base_url}/score", headers=endpoint.main.headers(), timeout=60,
                          json={"model": MODEL_NAME, "input": texts, "return_token_logprobs": True})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    expected = reference_llm.score(texts, return_token_logprobs=True)
    for got, want in zip(data, expected, strict=False):
        assert got["num_tokens"] == want.num_tokens
        for field in ("nll", "perplexity", "bits_per_byte", "word_perplexity", "byte_perplexity"):
            assert got[field] == pytest.approx(getattr(want, field), rel=1e-4)
        assert got["token_logprobs"] == pytest.approx(want.token_logprobs, abs=1e-4)
    # a text longer than the window is scored in sliding windows
    long_text = " ".join(["GPT-NeoX models use rotary embeddings."] * 20)
    windowed = httpx.post(f"{endpoint.main.base_url}/score", headers=endpoint.main.headers(), timeout=60,
                          json={"model": MODEL_NAME, "input": long_text, "window": 64, "stride": 32})
    assert windowed.status_code == 200, windowed.text
    assert windowed.json()["data"][0]["num_tokens"] == len(reference_llm.tokenizer.encode(long_text))


# ---- concurrency -----------------------------------------------------------------------------------
def test_concurrent_requests_share_decode_steps(endpoint: Endpoint) -> None:
    app = endpoint.main
    body = {"model": MODEL_NAME, "max_tokens": 32, "temperature": 0, "ignore_eos": True}
    prompts = [f"{PROMPT} number {i}" for i in range(16)]

    async def run(concurrent: bool) -> float:
        async with httpx.AsyncClient(headers=app.headers(), timeout=120) as http:
            async def one(prompt: str) -> None:
                response = await http.post(f"{app.base_url}/completions", json={**body, "prompt": prompt})
                assert response.status_code == 200, response.text
                assert response.json()["usage"]["completion_tokens"] == 32

            await one("warm up")
            start = time.perf_counter()
            if concurrent:
                await asyncio.gather(*(one(p) for p in prompts))
            else:
                for prompt in prompts:
                    await one(prompt)
            return time.perf_counter() - start

    sequential_s = asyncio.run(run(concurrent=False))
    before = _metrics(app)
    concurrent_s = asyncio.run(run(concurrent=True))
    after = _metrics(app)
    shared = after["neox_ray_engine_shared_decode_steps_total"] - before["neox_ray_engine_shared_decode_steps_total"]
    steps = after["neox_ray_engine_steps_total"] - before["neox_ray_engine_steps_total"]
    print(f"16 sequential: {sequential_s:.2f}s, 16 concurrent: {concurrent_s:.2f}s, "
          f"steps {steps:.0f} of which shared decode {shared:.0f}, max_running {after['neox_ray_engine_max_running']}")
    assert concurrent_s < 0.6 * sequential_s
    assert shared >= 16  # 32 decode steps per request; most of them were taken together
    assert steps < 16 * 32  # far fewer forward passes than one per token
    assert after["neox_ray_engine_max_running"] >= 8


# ---- errors ----------------------------------------------------------------------------------------
BAD_FIELDS = [
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -5}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ({"logprobs": 50}, "logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"seed": -1}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"echo": "maybe"}, "echo"),
    ({"best_of": 3}, "best_of"),
    ({"not_a_field": 1}, "not_a_field"),
    ({"model": "gpt-4"}, "model"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [99999]}, "prompt"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"prompt": "word " * 1100}, "prompt"),   # longer than max_model_len
    ({"max_tokens": 100000}, "prompt"),      # no room for the completion
]


@pytest.mark.parametrize("fields,param", BAD_FIELDS, ids=[p + "-" + json.dumps(f)[:30] for f, p in BAD_FIELDS])
def test_bad_field_is_400_naming_it(endpoint: Endpoint, fields: dict, param: str) -> None:
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4, **fields}
    response = httpx.post(f"{endpoint.main.base_url}/completions", json=body, headers=endpoint.main.headers(),
                          timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"]


def test_missing_model_and_score_fields_are_400(endpoint: Endpoint) -> None:
    app = endpoint.main
    missing = httpx.post(f"{app.base_url}/completions", json={"prompt": PROMPT}, headers=app.headers())
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"
    cases = (({"window": 1}, "window"), ({"window": 64, "stride": 64}, "stride"), ({"input": ""}, "input"))
    for fields, param in cases:
        response = httpx.post(f"{app.base_url}/score", headers=app.headers(),
                              json={"model": MODEL_NAME, "input": PROMPT, **fields})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    not_json = httpx.post(f"{app.base_url}/completions", content=b"{nope", headers={
        **app.headers(), "Content-Type": "application/json"})
    assert not_json.status_code == 400 and "error" in not_json.json()


PROTECTED = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/score"), ("GET", "/metrics")]


@pytest.mark.parametrize("which", ["main", "timeout"])  # key from a file / from an environment variable
def test_missing_or_wrong_key_is_401_on_every_protected_route(endpoint: Endpoint, which: str) -> None:
    app: App = getattr(endpoint, which)
    bodies = {"/v1/completions": {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 2},
              "/v1/score": {"model": MODEL_NAME, "input": PROMPT}}
    for method, path in PROTECTED:
        body = bodies.get(path)
        url = app.root_url + path
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": app.api_key},
                        {"Authorization": "Basic " + app.api_key}):
            response = httpx.request(method, url, headers=headers, json=body)
            assert response.status_code == 401, (path, headers, response.text)
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
        ok = httpx.request(method, url, headers=app.headers(), json=body)
        assert ok.status_code in (200, 408), (path, ok.text)  # the timeout app may time a request out
    assert httpx.get(f"{app.root_url}/health").status_code == 200  # open, for Serve and load balancers


def test_queue_limit_gives_fast_503_and_server_recovers(endpoint: Endpoint) -> None:
    app = endpoint.queue
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 48, "ignore_eos": True, "temperature": 0}

    async def run() -> list[tuple[int, float, httpx.Response]]:
        async with httpx.AsyncClient(headers=app.headers(), timeout=60) as http:
            async def one() -> tuple[int, float, httpx.Response]:
                start = time.perf_counter()
                response = await http.post(f"{app.base_url}/completions", json=body)
                return response.status_code, time.perf_counter() - start, response

            return await asyncio.gather(*(one() for _ in range(20)))

    results = asyncio.run(run())
    statuses = sorted(status for status, _, _ in results)
    ok = [r for r in results if r[0] == 200]
    rejected = [r for r in results if r[0] == 503]
    assert len(ok) + len(rejected) == 20, statuses
    assert len(ok) >= 1 and len(rejected) >= 10, statuses
    slowest_ok = max(seconds for _, seconds, _ in ok)
    for _, seconds, response in rejected:
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "queue_full"
        assert seconds < slowest_ok
    after = httpx.post(f"{app.base_url}/completions", headers=app.headers(), timeout=60,
                       json={**body, "max_tokens": 4})
    assert after.status_code == 200, after.text


def test_tiny_timeout_is_408_and_aborts(endpoint: Endpoint) -> None:
    app = endpoint.timeout
    before = _metrics(app)["neox_ray_engine_aborted_requests_total"]
    start = time.perf_counter()
    response = httpx.post(f"{app.base_url}/completions", headers=app.headers(), timeout=60,
                          json={"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True})
    assert response.status_code == 408, response.text
    assert response.json()["error"]["code"] == "request_timeout"
    assert time.perf_counter() - start < 5
    deadline = time.monotonic() + 5
    while _metrics(app)["neox_ray_engine_aborted_requests_total"] <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metrics(app)["neox_ray_engine_aborted_requests_total"] == before + 1
    short = httpx.post(f"{app.base_url}/completions", headers=app.headers(), timeout=60,
                       json={"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 1})
    assert short.status_code == 200, short.text


def test_client_disconnect_mid_stream_aborts_request(endpoint: Endpoint) -> None:
    app = endpoint.main
    before = _metrics(app)
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.Client(headers=app.headers(), timeout=60) as http, \
            http.stream("POST", f"{app.base_url}/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[len("data: "):])["object"] == "text_completion"
    # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 10
    metrics = _metrics(app)
    while (metrics["neox_ray_engine_aborted_requests_total"] <= before["neox_ray_engine_aborted_requests_total"]
           and time.monotonic() < deadline):
        time.sleep(0.1)
        metrics = _metrics(app)
    assert metrics["neox_ray_engine_aborted_requests_total"] == before["neox_ray_engine_aborted_requests_total"] + 1
    assert metrics["neox_ray_engine_num_running"] == 0
    generated = metrics["neox_ray_engine_generated_tokens_total"] - before["neox_ray_engine_generated_tokens_total"]
    assert generated < 1000, "the request should have stopped well before max_tokens"


def test_health_and_metrics_content(endpoint: Endpoint) -> None:
    app = endpoint.main
    assert httpx.get(f"{app.root_url}/health").json() == {"status": "ok"}
    metrics = _metrics(app)
    for name in ("neox_ray_time_to_first_token_seconds_count", "neox_ray_inter_token_latency_seconds_count",
                 "neox_ray_prompt_tokens_total", "neox_ray_generation_tokens_total", "neox_ray_engine_num_waiting",
                 "neox_ray_engine_kv_cache_usage", "neox_ray_pending_requests"):
        assert name in metrics, name
    assert metrics['neox_ray_requests_total{route="/v1/completions",status="200"}'] >= 1
    assert metrics["neox_ray_time_to_first_token_seconds_count"] >= 1
