"""Autoscaling on a real local Ray. Serve: streamed load scales the app from 1 to 2 replicas and, once it eases,
back to 1, and every stream started along the way completes (a replica being removed drains its streams).
Batch: a job with ``min_replicas 1 / max_replicas 2`` grows its engine actor pool, shows the pool's size on its
progress line, exports its progress as Ray metrics, and writes every row.

Replica counts are read from Ray (``serve.status()``), never inferred from timing. Streams count as ongoing
requests until they end (Serve counts an ASGI response until its last message), which is what drives the
upscale; the downscale happens while a stream is still running, which is what the drain protects.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

try:
    import httpx
except ImportError:  # openai >= 3 depends on httpx's successor, which keeps its API under a new name
    import httpx2 as httpx

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

APP_NAME, PREFIX = "neox-autoscale-test", "/neox-autoscale-test"
MODEL_NAME = "tiny"
# max_model_len beyond the checkpoint's 256 positions (rotary has no table to run out of) lets one stream run
# for seconds; ignore_eos keeps it from stopping early.
ENGINE = {"dtype": "float32", "device": "cpu", "max_num_seqs": 8, "max_model_len": 2048}
STREAM_TOKENS = 400
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "metrics_interval_s": 0.5,
               "look_back_period_s": 2, "upscale_delay_s": 1, "downscale_delay_s": 4}


@dataclass
class StreamResult:
    started: float
    ended: float = 0.0
    status: int = 0
    chunks: int = 0
    finish_reason: str | None = None
    done: bool = False          # saw ``data: [DONE]``
    error: str = ""


@dataclass
class Load:
    """Client threads that each keep one stream open at a time until told to stop."""
    url: str
    results: list[StreamResult] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def one_stream(self) -> None:
        result = StreamResult(started=time.monotonic())
        with self.lock:
            self.results.append(result)
        body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": STREAM_TOKENS, "stream": True,
                "ignore_eos": True, "temperature": 0.0}
        try:
            with httpx.stream("POST", self.url, json=body, timeout=120) as response:
                result.status = response.status_code
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        result.done = True
                    elif line.startswith("data: "):
                        result.chunks += 1
                        for choice in json.loads(line[len("data: "):]).get("choices", []):
                            result.finish_reason = choice.get("finish_reason") or result.finish_reason
        except Exception as error:  # recorded, asserted on below
            result.error = repr(error)
        result.ended = time.monotonic()

    def client(self) -> None:
        while not self.stop.is_set():
            self.one_stream()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _replicas(serve) -> dict[str, int]:
    """Replica states of the app's deployment as Ray reports them, e.g. ``{"RUNNING": 2}``."""
    app = serve.status().applications.get(APP_NAME)
    if app is None or "NeoxRayServer" not in app.deployments:
        return {}
    return {str(state): count for state, count in app.deployments["NeoxRayServer"].replica_states.items()}


def _wait_for(serve, predicate, timeout_s: float, timeline: list[tuple[float, dict[str, int]]]) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = _replicas(serve)
        if not timeline or timeline[-1][1] != states:
            timeline.append((time.monotonic(), states))
        if predicate(states):
            return True
        time.sleep(0.5)
    return False


def test_streams_scale_serve_up_and_down_without_losing_a_request(ray_session, tiny_checkpoint: Path) -> None:
    from ray import serve

    from neox_ray.serve.deployment import ServeArgs, build_application

    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    from ray.serve.context import _get_global_client

    port = _get_global_client().http_config.port  # another test module may have started Serve first
    args = ServeArgs(model=str(tiny_checkpoint), served_model_name=MODEL_NAME, replica_num_cpus=0.25,
                     engine=ENGINE, request_timeout_s=120)
    serve.run(build_application(args, autoscaling_config=AUTOSCALING), name=APP_NAME, route_prefix=PREFIX)
    load = Load(url=f"http://127.0.0.1:{port}{PREFIX}/v1/completions")
    timeline: list[tuple[float, dict[str, int]]] = []
    clients: list[threading.Thread] = []
    try:
        assert _replicas(serve).get("RUNNING") == 1
        clients = [threading.Thread(target=load.client, daemon=True) for _ in range(4)]
        for client in clients:
            client.start()
        scaled_up = _wait_for(serve, lambda states: states.get("RUNNING", 0) == 2, 90, timeline)
        assert scaled_up, f"never reached 2 running replicas: {timeline}"

        # Ease the load to one stream at a time: the app should shrink to one replica while that stream runs.
        load.stop.set()
        for client in clients:
            client.join(timeout=120)
        load.stop.clear()
        clients = [threading.Thread(target=load.client, daemon=True)]
        clients[0].start()
        scaled_down = _wait_for(serve, lambda states: states == {"RUNNING": 1}, 90, timeline)
        assert scaled_down, f"never went back to 1 replica: {timeline}"
        scaled_down_at = timeline[-1][0]
    finally:
        load.stop.set()
        for client in clients:
            client.join(timeout=120)
        serve.delete(APP_NAME)

    failed = [r for r in load.results if not (r.status == 200 and r.done and r.finish_reason == "length")]
    assert not failed, f"{len(failed)} of {len(load.results)} streams did not complete: {failed[:3]}"
    # The downscale happened with load still on: at least one stream ran across it and completed.
    assert any(r.started < scaled_down_at < r.ended for r in load.results), timeline


def test_batch_job_autoscaling_pool_reports_its_size_and_exports_metrics(ray_session, tiny_checkpoint: Path,
                                                                         tmp_path: Path) -> None:
    import re
    import urllib.request

    import pyarrow as pa
    import pyarrow.parquet as pq

    from neox_ray.batch.config import validate_job_config
    from neox_ray.batch.runner import run_job
    from neox_ray.batch.sink import read_output

    rows = 600  # enough that the job outlasts a second engine actor starting on a busy 2-core machine
    pq.write_table(pa.table({"prompt": [f"row {i} of the quick brown fox" for i in range(rows)]}),
                   tmp_path / "prompts.parquet")
    config = validate_job_config("generate", {
        "model": str(tiny_checkpoint), "input": str(tmp_path / "prompts.parquet"), "output": str(tmp_path / "out"),
        "sampling": {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True},
        "engine": {"device": "cpu", "dtype": "float32", "max_num_seqs": 8},
        "replicas": {"min_replicas": 1, "max_replicas": 2, "num_cpus": 0.25, "batch_size": 8,
                     "max_concurrent_batches": 1},
        "rows_per_block": 8, "rows_per_file": 8, "progress_interval_s": 0.5})
    lines: list[str] = []
    summary = run_job(config, log=lines.append)

    assert summary["rows"] == rows and read_output(str(tmp_path / "out")).num_rows == rows
    pool_sizes = [int(m.group(1)) for line in lines if (m := re.search(r"\| engines (\d+) \|", line))]
    assert pool_sizes, lines
    assert max(pool_sizes) == 2, f"the pool never grew to max_replicas: {pool_sizes}"

    port = ray_session._private.worker.global_worker.node.metrics_export_port
    job = 'job="generate:out"'
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        if any(line.startswith("ray_neox_ray_batch_engine_replicas{") and job in line for line in text.splitlines()):
            break
        time.sleep(2)
    exported = [line for line in text.splitlines() if line.startswith("ray_neox_ray_batch_") and job in line]
    assert any(line.startswith("ray_neox_ray_batch_rows_total{") for line in exported), exported
    assert any(line.startswith("ray_neox_ray_batch_engine_replicas{") for line in exported), exported
