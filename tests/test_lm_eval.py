"""lm-eval's ``local-completions`` client against our server (``tokenizer_backend=remote``, no local tokenizer)
gives the same per-document results as ``lm_eval --model hf`` on the same weights: loglikelihood (multiple
choice), loglikelihood_rolling and generate_until with stop strings. Offline: tasks read local JSON files.
Skipped when lm-eval is not installed."""

from __future__ import annotations

import json
import math
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "tiny-pythia"
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "ray", "data", "reads",
         "parquet", "files"]

MULTIPLE_CHOICE = """
task: neox_mc
dataset_path: json
dataset_kwargs:
  data_files: {test: DATA/mc.jsonl}
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
"""
ROLLING = """
task: neox_rolling
dataset_path: json
dataset_kwargs:
  data_files: {test: DATA/texts.jsonl}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
"""
GENERATE = """
task: neox_gen
dataset_path: json
dataset_kwargs:
  data_files: {test: DATA/gen.jsonl}
test_split: test
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["fox", "."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


def _sentence(i: int, length: int) -> str:
    return " ".join(WORDS[(i * 5 + k) % len(WORDS)] for k in range(length))


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    data = root / "data"
    data.mkdir()
    with (data / "mc.jsonl").open("w") as f:
        for i in range(6):
            choices = [" " + _sentence(i + c, 1 + c) for c in range(4)]
            f.write(json.dumps({"question": _sentence(i, 5) + " ", "choices": choices, "label": i % 4}) + "\n")
    with (data / "texts.jsonl").open("w") as f:
        for i in range(4):
            f.write(json.dumps({"text": _sentence(i, 40 + 60 * i)}) + "\n")  # up to ~220 words: several windows
    with (data / "gen.jsonl").open("w") as f:
        for i in range(4):
            f.write(json.dumps({"question": _sentence(i, 6), "answer": "x"}) + "\n")
    for name, text in (("mc", MULTIPLE_CHOICE), ("rolling", ROLLING), ("gen", GENERATE)):
        (root / f"{name}.yaml").write_text(text.replace("DATA", str(data)))
    return root


@pytest.fixture(scope="module")
def hf_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with what transformers' AutoTokenizer needs to load it (as Pythia ships)."""
    target = tmp_path_factory.mktemp("lm_eval_model") / "ckpt"
    shutil.copytree(tiny_checkpoint, target)
    (target / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "model_max_length": 256}))
    return target


@pytest.fixture(scope="module")
def server_url(hf_dir: Path):
    import uvicorn

    from neox_ray.engine.async_engine import AsyncLLMEngine
    from neox_ray.llm import LLM
    from neox_ray.serve.server import OpenAIServer, ServerSettings, create_app

    llm = LLM(str(hf_dir), dtype="float32", device="cpu")
    engine = AsyncLLMEngine(llm.engine)
    app = create_app(OpenAIServer(engine, ServerSettings(served_model_name=MODEL, request_timeout_s=120)))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1/completions"
    server.should_exit = True
    thread.join(timeout=10)
    engine.shutdown()


def _samples(model: str, model_args: str, tasks_dir: Path) -> dict[str, list[dict]]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(model=model, model_args=model_args, tasks=["neox_mc", "neox_rolling", "neox_gen"],
                              task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=True,
                              batch_size=1, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    return {task: sorted(samples, key=lambda s: s["doc_id"]) for task, samples in results["samples"].items()}


def test_local_completions_equals_hf(tasks_dir: Path, hf_dir: Path, server_url: str) -> None:
    ours = _samples("local-completions", f"model={MODEL},base_url={server_url},tokenizer_backend=remote,"
                    "max_length=256,num_concurrent=1,max_retries=1,tokenized_requests=True", tasks_dir)
    # lm-eval's API models keep one token of max_length for the generated token and one for the window's
    # context (rolling windows of 254 tokens here); give the hf model the same window so both split long
    # texts identically.
    reference = _samples("hf", f"pretrained={hf_dir},dtype=float32,max_length=254,device=cpu", tasks_dir)
    assert set(ours) == set(reference) == {"neox_mc", "neox_rolling", "neox_gen"}
    for task in ("neox_mc", "neox_rolling"):
        assert len(ours[task]) == len(reference[task])
        for mine, theirs in zip(ours[task], reference[task], strict=True):
            for (lp, greedy), (lp_ref, greedy_ref) in zip(_loglikelihoods(mine), _loglikelihoods(theirs),
                                                          strict=True):
                assert math.isclose(lp, lp_ref, rel_tol=1e-4, abs_tol=1e-4), (task, mine["doc_id"], lp, lp_ref)
                assert greedy == greedy_ref
    assert any(sample["filtered_resps"][0] for sample in ours["neox_gen"])  # something was generated
    for mine, theirs in zip(ours["neox_gen"], reference["neox_gen"], strict=True):
        assert mine["filtered_resps"] == theirs["filtered_resps"], mine["doc_id"]
        assert not any(stop in mine["filtered_resps"][0] for stop in ("fox", "."))


def _loglikelihoods(sample: dict) -> list[tuple[float, bool | None]]:
    """(logprob, is_greedy) per request of a doc (multiple choice: one per choice; rolling: one)."""
    values = []
    for response in sample["resps"]:
        entry = response[0]
        if isinstance(entry, (list, tuple)):
            values.append((float(entry[0]), bool(entry[1])))
        else:
            values.append((float(entry), None))
    return values
