"""``/v1/chat/completions`` and the tokenizer routes, through a real HTTP server (uvicorn on 127.0.0.1)
and the official openai client. Chat output must equal the completion of transformers'
``apply_chat_template`` text; malformed messages and a template-less model are 400s."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    import httpx
except ImportError:  # openai >= 3 depends on httpx's successor, which keeps its API under a new name
    import httpx2 as httpx

from neox_ray.engine.sampling_params import SamplingParams
from neox_ray.llm import LLM

pytestmark = pytest.mark.timeout(300)

MODEL = "tiny-chat"
KEY = "sk-chat-test"
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox"}]


def _with_template(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    config = {"chat_template": CHATML, "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


class _Server:
    """The app of one LLM served by uvicorn in a thread."""

    def __init__(self, llm: LLM, **settings):
        import uvicorn

        from neox_ray.engine.async_engine import AsyncLLMEngine
        from neox_ray.serve.server import OpenAIServer, ServerSettings, create_app

        self.engine = AsyncLLMEngine(llm.engine, max_queued_requests=64)
        app = create_app(OpenAIServer(self.engine, ServerSettings(served_model_name=MODEL, request_timeout_s=60,
                                                                  api_keys=(KEY,), **settings)))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.root = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)

    def post(self, path: str, body: dict, key: str | None = KEY) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        headers["Content-Type"] = "application/json"  # ASCII JSON: a lone surrogate travels as \ud800
        return httpx.post(self.root + path, content=json.dumps(body), headers=headers, timeout=60)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.shutdown()


@pytest.fixture(scope="module")
def chat_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _with_template(tiny_checkpoint, tmp_path_factory.mktemp("chat") / "ckpt")


@pytest.fixture(scope="module")
def llm(chat_dir: Path) -> LLM:
    return LLM(str(chat_dir), dtype="float32", device="cpu", max_model_len=256)


@pytest.fixture(scope="module")
def server(chat_dir: Path) -> Iterator[_Server]:
    """Its own LLM: the server's engine loop owns it (tests compare against the separate ``llm``)."""
    running = _Server(LLM(str(chat_dir), dtype="float32", device="cpu", max_model_len=256))
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server: _Server):
    from openai import OpenAI

    return OpenAI(base_url=server.root + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _reference_prompt(chat_dir: Path, messages=MESSAGES) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_dir).apply_chat_template(messages, tokenize=False,
                                                                       add_generation_prompt=True)


def test_chat_equals_completion_of_transformers_template(client, llm: LLM, chat_dir: Path) -> None:
    prompt = _reference_prompt(chat_dir)
    expected = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_completion_tokens=12,
                                           extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == "length" and reply.object == "chat.completion"
    assert reply.usage.prompt_tokens == len(llm.tokenizer.encode(prompt))
    assert reply.usage.completion_tokens == 12 and reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_stream_role_first_then_content_then_usage(client) -> None:
    kwargs = dict(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=10, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_n_seed_stop_and_logprobs(client, llm: LLM) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, seed=7, temperature=1.0,
                                           max_tokens=8, logprobs=True, top_logprobs=3,
                                           extra_body={"ignore_eos": True})
    again = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, seed=7, temperature=1.0,
                                           max_tokens=8, extra_body={"ignore_eos": True})
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.message.content for c in reply.choices] == [c.message.content for c in again.choices]
    for choice in reply.choices:
        entries = choice.logprobs.content
        assert len(entries) == 8
        for entry in entries:
            assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
            best = max(t.logprob for t in entry.top_logprobs)
            assert entry.logprob <= best + 1e-6
    # A stop string ends the text before it (as in completions).
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=12,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    stop = full[3:6]
    if stop.strip():
        cut = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=12, stop=[stop],
                                             extra_body={"ignore_eos": True}).choices[0]
        assert cut.finish_reason == "stop" and stop not in cut.message.content


@pytest.mark.parametrize("messages, fragment", [
    ([], "non-empty list"),
    ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]"),
])
def test_malformed_messages_are_400(server: _Server, messages, fragment: str) -> None:
    response = server.post("/v1/chat/completions", {"model": MODEL, "messages": messages})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["param"] == "messages"


def test_bad_fields_are_400(server: _Server) -> None:
    for body, param in [({"temperature": "1"}, "temperature"), ({"top_logprobs": 2}, "top_logprobs"),
                        ({"max_completion_tokens": 0}, "max_completion_tokens"), ({"nonsense": 1}, "nonsense"),
                        ({"tools": [{"type": "function"}]}, "tools")]:
        response = server.post("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, **body})
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["param"] == param, (body, response.text)


def test_hostile_chat_bodies_are_400(server: _Server) -> None:
    """Checked before rendering: a lone surrogate, too many characters, an n the server never queues."""
    cases = [({"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
             ({"messages": [{"role": "user", "content": "x" * (1 << 20 + 1)}]}, "messages"),
             ({"messages": MESSAGES, "n": 100}, "n")]
    for body, param in cases:
        response = server.post("/v1/chat/completions", {"model": MODEL, **body})
        assert response.status_code == 400, (param, response.text[:200])
        assert response.json()["error"]["param"] == param and len(response.json()["error"]["message"]) < 300
    assert server.post("/tokenize", {"prompt": "\ud800"}).status_code == 400
    assert httpx.get(server.root + "/health").status_code == 200


def test_template_less_model_is_400_and_override_works(tiny_checkpoint: Path, tmp_path: Path) -> None:
    plain = _Server(LLM(str(tiny_checkpoint), dtype="float32", device="cpu"))
    try:
        response = plain.post("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES})
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "chat_template_missing"
        assert "chat template" in response.json()["error"]["message"]
    finally:
        plain.close()
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    overridden = _Server(LLM(str(tiny_checkpoint), dtype="float32", device="cpu"), chat_template=str(template))
    try:
        response = overridden.post("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 4,
                                                           "temperature": 0, "ignore_eos": True})
        assert response.status_code == 200, response.text
        reference = LLM(str(tiny_checkpoint), dtype="float32", device="cpu")
        expected = reference.generate("Be brief.\nThe quick brown fox\n",
                                SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0].outputs[0].text
        assert response.json()["choices"][0]["message"]["content"] == expected
    finally:
        overridden.close()


def test_tokenizer_routes(server: _Server, llm: LLM, chat_dir: Path) -> None:
    text = "The quick brown fox"
    tokens = server.post("/tokenize", {"prompt": text}).json()
    assert tokens["tokens"] == llm.tokenizer.encode(text) and tokens["count"] == len(tokens["tokens"])
    assert tokens["max_model_len"] == 256
    chat = server.post("/tokenize", {"messages": MESSAGES}).json()
    assert chat["tokens"] == llm.tokenizer.encode(_reference_prompt(chat_dir))
    back = server.post("/detokenize", {"tokens": tokens["tokens"]}).json()
    assert back["prompt"] == text
    info = httpx.get(server.root + "/tokenizer_info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["eos_token"] == "<|endoftext|>" and info["chat_template"] == CHATML
    assert server.post("/detokenize", {"tokens": [-1]}).status_code == 400
    assert server.post("/tokenize", {"prompt": text, "messages": MESSAGES}).status_code == 400
    for path, body in [("/tokenize", {"prompt": text}), ("/detokenize", {"tokens": [1]})]:
        assert server.post(path, body, key=None).status_code == 401
    assert httpx.get(server.root + "/tokenizer_info").status_code == 401


def test_chat_does_not_block_other_streams(server: _Server) -> None:
    """Rendering and tokenizing run off the event loop: a stream keeps flowing while chats arrive."""
    async def run() -> None:
        async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as http:
            body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
            others = [http.post(server.root + "/v1/chat/completions", json={**body, "max_tokens": 2})
                      for _ in range(4)]
            main = http.post(server.root + "/v1/chat/completions", json=body)
            results = await asyncio.gather(main, *others)
            assert all(r.status_code == 200 for r in results)
    asyncio.run(run())
