"""Batch generation from a ``messages`` column (rendered with the chat template) and from a hub id resolved
offline from a hand-built HF cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hub_cache import add_to_hub_cache

from neox_ray.batch.config import validate_job_config
from neox_ray.batch.runner import JobError, preflight, run_job
from neox_ray.batch.sink import read_output
from neox_ray.engine.sampling_params import SamplingParams

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
ENGINE = {"device": "cpu", "dtype": "float32", "max_num_seqs": 16}
REPLICAS = {"num_replicas": 1, "num_cpus": 0.5, "batch_size": 8}
GREEDY = {"max_tokens": 5, "temperature": 0.0, "ignore_eos": True}
PROMPTS = ["the quick brown fox", "jumps over a lazy dog", "ray data reads parquet"]


def _render(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
        "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def chat_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("chat") / "ckpt"
    shutil.copytree(tiny_checkpoint, target)
    (target / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    return target


def _messages_input(path: Path) -> list:
    conversations: list = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}]
                           for p in PROMPTS]
    conversations.append([{"role": "wizard", "content": "abracadabra"}])  # a bad row: not a role
    conversations.append(None)                                             # a null row
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    pq.write_table(pa.table({"messages": pa.array(conversations, pa.list_(message)),
                             "id": list(range(len(conversations)))}), path)
    return conversations


def test_messages_column_generates_like_the_rendered_prompt(ray_session, chat_checkpoint: Path,
                                                            tmp_path: Path) -> None:
    from neox_ray.llm import LLM

    conversations = _messages_input(tmp_path / "chat.parquet")
    config = validate_job_config("generate", {
        "model": str(chat_checkpoint), "input": str(tmp_path / "chat.parquet"), "output": str(tmp_path / "out"),
        "sampling": GREEDY, "engine": ENGINE, "replicas": REPLICAS, "progress_interval_s": 1000.0})
    summary = run_job(config, log=lambda _line: None)
    assert summary["rows"] == 5 and summary["rows_failed"] == 2
    rows = {r["id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    reference = LLM(str(chat_checkpoint), **ENGINE)
    for index, conversation in enumerate(conversations[:3]):
        expected = reference.generate(_render(conversation), SamplingParams(**GREEDY))[0].outputs[0]
        assert rows[index]["error"] is None and rows[index]["generated_text"] == expected.text
        assert rows[index]["messages"] == conversation  # input columns pass through
    assert "messages[0].role" in rows[3]["error"] and rows[4]["error"] == "messages is null"


def test_messages_without_a_template_stop_before_the_model_loads(tiny_checkpoint: Path, tmp_path: Path) -> None:
    _messages_input(tmp_path / "chat.parquet")
    config = validate_job_config("generate", {
        "model": str(tiny_checkpoint), "input": str(tmp_path / "chat.parquet"), "output": str(tmp_path / "out")})
    with pytest.raises(JobError, match="no chat template; pass --chat-template"):
        run_job(config, log=lambda _line: None)
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages[-1]['content'] }}")
    config = validate_job_config("generate", {
        "model": str(tiny_checkpoint), "input": str(tmp_path / "chat.parquet"), "output": str(tmp_path / "out"),
        "chat_template": str(template), "engine": ENGINE})
    checks = preflight(config)  # the override template makes the same input acceptable
    assert checks.plan.is_chat and checks.plan.text_column == "messages"


def _cli(*args: str, hf_home: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "neox_ray.cli", "generate", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_generate_from_a_hub_id_offline(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from neox_ray.llm import LLM

    hf_home = tmp_path / "hf"
    add_to_hub_cache(hf_home, "EleutherAI/pythia-tiny", tiny_checkpoint, revision="step1000")
    pq.write_table(pa.table({"prompt": PROMPTS}), tmp_path / "prompts.parquet")
    flags = ["--input", str(tmp_path / "prompts.parquet"), "--max-tokens", "5", "--temperature", "0",
             "--device", "cpu", "--dtype", "float32", "--num-replicas", "1"]
    started = time.monotonic()
    missing = _cli("--model", "EleutherAI/pythia-tiny@step9", "--output", str(tmp_path / "none"), *flags,
                   hf_home=hf_home)
    assert missing.returncode != 0 and time.monotonic() - started < 60
    assert "not in the local Hugging Face cache" in missing.stderr and "Traceback" not in missing.stderr

    result = _cli("--model", "EleutherAI/pythia-tiny", "--revision", "step1000", "--output", str(tmp_path / "out"),
                  *flags, hf_home=hf_home)
    assert result.returncode == 0, result.stderr[-3000:]
    out = read_output(str(tmp_path / "out")).to_pylist()
    reference = LLM(str(tiny_checkpoint), device="cpu", dtype="float32")
    expected = {p: o.outputs[0].text for p, o in
                zip(PROMPTS, reference.generate(PROMPTS, SamplingParams(max_tokens=5, temperature=0)), strict=True)}
    assert {row["prompt"]: row["generated_text"] for row in out} == expected


@pytest.mark.parametrize("column", [pa.array(["a plain string"]), pa.array([[1, 2]], pa.list_(pa.int64())),
                                    pa.array([[{"role": "user"}]], pa.list_(pa.struct([("role", pa.string())])))])
def test_messages_column_of_the_wrong_type_stops_before_ray(tmp_path: Path, column: pa.Array) -> None:
    """A messages column that is not a list of {role, content} structs is one clear error naming it."""
    from neox_ray.batch.source import InputError, plan_input

    pq.write_table(pa.table({"messages": column}), tmp_path / "in.parquet")
    with pytest.raises(InputError, match="input column .messages. in .* has Arrow type .*; chat messages must be"):
        plan_input(str(tmp_path / "in.parquet"), "prompt", "id", (), "messages")
