"""A hostile client cannot stop the endpoint, stall other clients, or get a 5xx for its own mistakes.

The app runs under a real uvicorn on 127.0.0.1 (so the body-size middleware meets real HTTP: a declared
``Content-Length`` and a chunked upload) over the tiny checkpoint, without Ray. While a normal streamed
completion runs, another client sends every kind of bad request; each gets its 4xx in OpenAI's error
shape with a short message, the stream finishes in full without a stall, ``/health`` stays 200 and no
5xx is counted or logged. Tokenization is checked to run off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

try:
    import httpx
except ImportError:  # openai >= 3 depends on httpx's successor, which keeps its API under a new name
    import httpx2 as httpx

from neox_ray.serve.metrics import parse_exposition

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODEL_NAME = "tiny"
# max_model_len beyond the checkpoint's 256 positions lets one stream run for seconds (see test_serve_api).
ENGINE = {"dtype": "float32", "device": "cpu", "max_num_seqs": 32, "max_model_len": 2048}
MAX_QUEUED = 64
STREAM_TOKENS = 2000
BASE = {"model": MODEL_NAME, "max_tokens": 2}


@dataclass
class Served:
    url: str
    server: Any          # OpenAIServer
    engine: Any          # AsyncLLMEngine


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_checkpoint: Path) -> Iterator[Served]:
    import uvicorn

    from neox_ray import LLM
    from neox_ray.engine.async_engine import AsyncLLMEngine
    from neox_ray.serve.server import OpenAIServer, ServerSettings, create_app

    llm = LLM(str(tiny_checkpoint), **ENGINE)
    engine = AsyncLLMEngine(llm.engine, max_queued_requests=MAX_QUEUED)
    server = OpenAIServer(engine, ServerSettings(served_model_name=MODEL_NAME, request_timeout_s=120))
    port = _free_port()
    uvicorn_server = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port,
                                                   log_config=None, lifespan="off"))
    thread = threading.Thread(target=uvicorn_server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uvicorn_server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield Served(f"http://127.0.0.1:{port}", server, engine)
    finally:
        uvicorn_server.should_exit = True
        thread.join(timeout=10)
        engine.shutdown()


def _counted(url: str) -> dict[str, float]:
    metrics = parse_exposition(httpx.get(f"{url}/metrics", timeout=30).text)
    return {name: value for name, value in metrics.items() if name.startswith("neox_ray_requests_total")}


def _server_errors(counted: dict[str, float]) -> dict[str, float]:
    return {name: value for name, value in counted.items() if 'status="5' in name and value}


def _json_post(body: str) -> dict[str, Any]:
    """A body written by hand (a lone surrogate survives only as JSON text)."""
    return {"content": body.encode(), "headers": {"Content-Type": "application/json"}}


async def _chunked(total: int, piece: int = 1 << 20) -> AsyncIterator[bytes]:
    """A body without Content-Length (httpx sends a generator chunked)."""
    yield b'{"model": "tiny", "prompt": "'
    for _ in range(total // piece):
        yield b"x" * piece
    yield b'"}'


# (name, route, httpx request kwargs (or what makes them), expected status, expected param or None)
HOSTILE: list[tuple[str, str, dict[str, Any] | Callable[[], dict[str, Any]], int, str | None]] = [
    ("largest seed", "completions", {"json": {**BASE, "prompt": "hi", "seed": 2**64 - 1}}, 200, None),
    ("seed over 64 bits", "completions", {"json": {**BASE, "prompt": "hi", "seed": 2**64}}, 400, "seed"),
    ("huge top_k", "completions", {"json": {**BASE, "prompt": "hi", "top_k": 10**19}}, 400, "top_k"),
    ("50 MB body", "completions", {"json": {**BASE, "prompt": "x" * (50 << 20)}}, 413, None),
    ("10 MB chunked body", "completions", lambda: {"content": _chunked(10 << 20),
                                                   "headers": {"Content-Type": "application/json"}}, 413, None),
    ("2 MB prompt", "completions", {"json": {**BASE, "prompt": "x" * (2 << 20)}}, 400, "prompt"),
    ("lone surrogate prompt", "completions",
     _json_post('{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 2}'), 400, "prompt"),
    ("lone surrogate input", "score", _json_post('{"model": "tiny", "input": ["ok", "\\udfff"]}'), 400, "input"),
    ("negative token id", "completions", {"json": {**BASE, "prompt": [5, -1, 6]}}, 400, "prompt"),
    ("token id past the vocabulary", "completions", {"json": {**BASE, "prompt": [[5, 6], [10**12]]}}, 400,
     "prompt"),
    ("negative token id to score", "score", {"json": {"model": MODEL_NAME, "input": [5, -3, 6]}}, 400, "input"),
    ("token id past the vocabulary to score", "score", {"json": {"model": MODEL_NAME, "input": [[5, 6, 10**6]]}},
     400, "input"),
    ("300 prompts", "completions", {"json": {**BASE, "prompt": ["hi"] * 300}}, 400, "prompt"),
    ("more sequences than the queue", "completions", {"json": {**BASE, "prompt": ["hi"] * 40, "n": 2}}, 400, "n"),
    ("score windows beyond the queue", "score",
     {"json": {"model": MODEL_NAME, "input": [list(range(5, 400))], "window": 8, "stride": 1}}, 400, "input"),
    ("n = 10**6", "completions", {"json": {**BASE, "prompt": "hi", "n": 10**6}}, 400, "n"),
    ('temperature "1"', "completions", {"json": {**BASE, "prompt": "hi", "temperature": "1"}}, 400, "temperature"),
    ('window "8"', "score", {"json": {"model": MODEL_NAME, "input": "hi", "window": "8"}}, 400, "window"),
    ("invalid JSON", "completions", _json_post('{"model": "tiny", "prompt": '), 400, None),
    ("a JSON array", "completions", {"json": [1, 2, 3]}, 400, None),
    ("curl's form content type", "completions",
     {"content": json.dumps({**BASE, "prompt": "hi"}).encode(),
      "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 200, None),
    ("no content type", "completions", {"content": json.dumps({**BASE, "prompt": "hi"}).encode()}, 200, None),
    ("a long model name", "completions", {"json": {**BASE, "prompt": "hi", "model": "m" * 100_000}}, 400, "model"),
]


async def _hostile_requests(http: httpx.AsyncClient, url: str) -> list[str]:
    """Sends every HOSTILE request; returns what went wrong (empty: all answered as expected)."""
    problems = []
    for name, route, kwargs, status, param in HOSTILE:
        start = time.perf_counter()
        try:
            response = await http.post(f"{url}/v1/{route}", **(kwargs() if callable(kwargs) else kwargs))
        except httpx.TransportError as exc:
            problems.append(f"{name}: no response ({exc!r})")
            continue
        seconds = time.perf_counter() - start
        if response.status_code != status:
            problems.append(f"{name}: {response.status_code} (expected {status}): {response.text[:300]}")
            continue
        if status == 200:
            continue
        error = response.json().get("error", {})
        if set(error) != {"message", "type", "param", "code"} or error["param"] != param:
            problems.append(f"{name}: not OpenAI's error shape naming {param!r}: {error}")
        if len(error.get("message") or "") > 300:
            problems.append(f"{name}: a {len(error['message'])}-character message (the input echoed?)")
        if status == 413 and error.get("code") != "request_too_large":
            problems.append(f"{name}: 413 without code request_too_large: {error}")
        if name == "2 MB prompt" and seconds > 5:
            problems.append(f"{name}: took {seconds:.1f}s (the character limit should answer before tokenizing)")
    return problems


async def _stream(http: httpx.AsyncClient, url: str, started: asyncio.Event) -> tuple[str, list[float], list[str]]:
    """A normal streamed completion: (its text, the arrival time of each event, the finish reasons)."""
    body = {**BASE, "prompt": "The quick brown fox", "max_tokens": STREAM_TOKENS, "ignore_eos": True,
            "temperature": 0, "stream": True}
    text, arrivals, finishes = [], [], []
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            arrivals.append(time.perf_counter())
            started.set()
            if line == "data: [DONE]":
                break
            event = json.loads(line[len("data: "):])
            assert "error" not in event, event
            for choice in event["choices"]:
                text.append(choice["text"])
                if choice["finish_reason"]:
                    finishes.append(choice["finish_reason"])
    return "".join(text), arrivals, finishes


async def _disconnect_mid_stream(http: httpx.AsyncClient, url: str) -> None:
    body = {**BASE, "prompt": "Ray Serve", "max_tokens": 900, "ignore_eos": True, "stream": True}
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                break  # leaving the block closes the connection mid-stream


def test_hostile_client_cannot_hurt_the_server_or_other_clients(served: Served,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    before = _counted(served.url)
    aborted_before = served.engine.engine.stats()["aborted_requests"]

    async def run() -> tuple[tuple[str, list[float], list[str]], list[str], float]:
        async with httpx.AsyncClient(timeout=120) as http:
            started = asyncio.Event()
            stream = asyncio.create_task(_stream(http, served.url, started))
            await asyncio.wait_for(started.wait(), 60)
            # A large prompt the character limit allows: seconds of tokenizing, which must not stall the stream.
            large = await http.post(f"{served.url}/v1/completions",
                                    json={**BASE, "prompt": "The quick brown fox jumps. " * 37_000})
            problems = await _hostile_requests(http, served.url)
            await _disconnect_mid_stream(http, served.url)
            assert not stream.done(), "the stream should outlast the hostile requests (make it longer)"
            return await stream, problems, large.status_code

    (text, arrivals, finishes), problems, large_status = asyncio.run(run())
    assert not problems, "\n".join(problems)
    assert large_status == 400  # past max_model_len, found by tokenizing it
    assert finishes == ["length"] and text, "the normal stream did not finish in full"
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:], strict=False)]
    assert max(gaps) < 1.5, f"the stream stalled for {max(gaps):.2f}s while other requests were handled"

    assert httpx.get(f"{served.url}/health", timeout=30).status_code == 200
    deadline = time.monotonic() + 10
    while served.engine.num_pending and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.engine.num_pending == 0, "the disconnected stream's request was not aborted"
    assert served.engine.engine.stats()["aborted_requests"] == aborted_before + 1
    after = _counted(served.url)
    assert not _server_errors(after), f"5xx counted: {_server_errors(after)}"
    assert after.get('neox_ray_requests_total{route="/v1/completions",status="413"}', 0) >= \
        before.get('neox_ray_requests_total{route="/v1/completions",status="413"}', 0) + 2
    logged = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert not logged, [record.getMessage() for record in logged]


def test_tokenization_runs_off_the_event_loop(served: Served) -> None:
    tokenizer = served.server.tokenizer
    encode_batch = tokenizer.encode_batch
    threads: list[str] = []

    def recording(texts: list[str], *args: Any, **kwargs: Any) -> list[list[int]]:
        threads.append(threading.current_thread().name)
        return encode_batch(texts, *args, **kwargs)

    tokenizer.encode_batch = recording
    try:
        for route, body in (("completions", {**BASE, "prompt": ["one", "two"]}),
                            ("score", {"model": MODEL_NAME, "input": "some text to score"})):
            response = httpx.post(f"{served.url}/v1/{route}", json=body, timeout=60)
            assert response.status_code == 200, response.text
    finally:
        del tokenizer.encode_batch
    assert len(threads) == 2
    assert all(name.startswith("neox-ray-tokenize") for name in threads), threads


def test_limits_are_settings_flags_and_serve_args(tiny_checkpoint: Path) -> None:
    import argparse

    from neox_ray.serve.cli import add_parser, resolve_config
    from neox_ray.serve.deployment import ServeArgs

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", str(tiny_checkpoint), "--max-body-bytes", "1000",
                              "--max-prompts-per-request", "4", "--max-prompt-chars", "100", "--max-n", "2"])
    app_args = resolve_config(args)["applications"][0]["args"]
    serve_args = ServeArgs.model_validate(app_args)
    assert (serve_args.max_body_bytes, serve_args.max_prompts_per_request, serve_args.max_prompt_chars,
            serve_args.max_n) == (1000, 4, 100, 2)
    with pytest.raises(ValueError, match="max_prompt_chars"):
        ServeArgs(model=str(tiny_checkpoint), max_prompt_chars=0)


def test_tighter_limits_apply(tiny_checkpoint: Path) -> None:
    from fastapi.testclient import TestClient

    from neox_ray import LLM
    from neox_ray.engine.async_engine import AsyncLLMEngine
    from neox_ray.serve.server import OpenAIServer, ServerSettings, create_app

    engine = AsyncLLMEngine(LLM(str(tiny_checkpoint), **ENGINE).engine, max_queued_requests=MAX_QUEUED)
    settings = ServerSettings(served_model_name=MODEL_NAME, max_body_bytes=2000, max_prompts_per_request=3,
                              max_prompt_chars=50, max_n=2)
    try:
        with TestClient(create_app(OpenAIServer(engine, settings))) as client:
            def post(route: str, body: dict[str, Any]) -> tuple[int, str | None]:
                response = client.post(f"/v1/{route}", json=body)
                return response.status_code, response.json().get("error", {}).get("param")

            assert post("completions", {**BASE, "prompt": "x" * 3000}) == (413, None)
            assert post("completions", {**BASE, "prompt": ["a"] * 4}) == (400, "prompt")
            assert post("score", {"model": MODEL_NAME, "input": ["a"] * 4}) == (400, "input")
            assert post("completions", {**BASE, "prompt": ["x" * 30, "y" * 30]}) == (400, "prompt")
            assert post("completions", {**BASE, "prompt": "hi", "n": 3}) == (400, "n")
            assert post("completions", {**BASE, "prompt": ["a", "b"], "n": 2}) == (200, None)
            assert client.get("/health").status_code == 200
    finally:
        engine.shutdown()


@pytest.mark.parametrize("how", ["send fails", "receive fails"])
def test_disconnect_told_by_an_error_ends_the_stream_quietly(served: Served, caplog: pytest.LogCaptureFixture,
                                                             how: str) -> None:
    """Servers other than uvicorn (which sends ``http.disconnect``, covered by the real-server test) tell the app
    of a gone client by failing ``send`` (ASGI spec 2.4) or ``receive`` (Ray Serve's replica raises
    ``TaskCancelledError``): still no 500, nothing logged as an error, and the request is aborted."""
    from neox_ray.serve.server import create_app

    caplog.set_level(logging.WARNING)
    app = create_app(served.server)
    body = json.dumps({**BASE, "prompt": "Ray Data", "max_tokens": 500, "ignore_eos": True, "stream": True}).encode()
    spec_version = "2.4" if how == "send fails" else "2.3"
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "root_path": "", "query_string": b"", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    sent: list[dict[str, Any]] = []
    aborted_before = served.engine.engine.stats()["aborted_requests"]

    body_read = False

    async def receive() -> dict[str, Any]:
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": body, "more_body": False}
        if how == "send fails":
            await asyncio.sleep(3600)  # a 2.4 server need not say http.disconnect
        while len(sent) < 3:
            await asyncio.sleep(0.01)
        raise RuntimeError("the task serving this request was cancelled")  # as Ray Serve's receive does

    async def send(message: dict[str, Any]) -> None:
        if how == "send fails" and message["type"] == "http.response.body" and \
                any(m["type"] == "http.response.body" for m in sent):
            raise OSError("the client went away")
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 200
    deadline = time.monotonic() + 10
    while served.engine.num_pending and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.engine.num_pending == 0
    assert served.engine.engine.stats()["aborted_requests"] == aborted_before + 1
    assert not _server_errors(_counted(served.url))
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


def test_score_window_count_matches_the_plan() -> None:
    from neox_ray.engine.scoring import plan_windows
    from neox_ray.serve.server import score_window_count

    for num_tokens in (0, 1, 2, 7, 8, 9, 15, 16, 17, 100):
        for window in (2, 3, 8, 16):
            for stride in range(1, window):
                expected = len(plan_windows(num_tokens, window, stride))
                assert score_window_count(num_tokens, window, stride) == expected, (num_tokens, window, stride)
