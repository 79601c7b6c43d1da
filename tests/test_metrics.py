"""Server metrics: one feed to every sink (in-process), and the Ray sink end to end through Ray's metrics export.

The end-to-end test serves the tiny checkpoint on the session's Ray, sends requests through the Serve proxy,
and reads neox-ray's series back from the node's metrics agent (what Ray's Prometheus scrapes), where each
carries the replica that produced it.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path

import pytest

try:
    import httpx
except ImportError:  # openai >= 3 depends on httpx's successor, which keeps its API under a new name
    import httpx2 as httpx

from neox_ray.serve.metrics import COUNTERS, HISTOGRAMS, ServerMetrics, parse_exposition


class RecordingSink:
    def __init__(self) -> None:
        self.requests: list[tuple[str, int]] = []
        self.counts: dict[str, float] = {}
        self.observed: dict[str, list[float]] = {}

    def count_request(self, route: str, status: int) -> None:
        self.requests.append((route, status))

    def increment(self, counter: str, amount: float) -> None:
        self.counts[counter] = self.counts.get(counter, 0.0) + amount

    def observe(self, histogram: str, value: float) -> None:
        self.observed.setdefault(histogram, []).append(value)


def test_server_metrics_feed_every_sink_the_same_numbers() -> None:
    metrics = ServerMetrics(lambda: {"steps": 3, "num_running": 1, "kv_cache_usage": 0.5}, lambda: 2)
    extra = RecordingSink()
    metrics.add_sink(extra)
    metrics.count_request("/v1/completions", 200)
    metrics.prompt_tokens.inc(5)
    metrics.generation_tokens.inc(7)
    metrics.time_to_first_token.observe(0.25)
    metrics.inter_token_latency.observe(0.01)
    metrics.request_latency.observe(1.5)

    assert extra.requests == [("/v1/completions", 200)]
    assert extra.counts == {"prompt_tokens": 5, "generation_tokens": 7}
    assert set(extra.observed) == set(HISTOGRAMS) and set(extra.counts) == set(COUNTERS)
    exposed = parse_exposition(metrics.exposition()[0].decode())
    assert exposed['neox_ray_requests_total{route="/v1/completions",status="200"}'] == 1
    assert exposed["neox_ray_prompt_tokens_total"] == 5
    assert exposed["neox_ray_generation_tokens_total"] == 7
    assert exposed["neox_ray_request_latency_seconds_count"] == 1
    assert exposed["neox_ray_engine_steps_total"] == 3
    assert exposed["neox_ray_engine_kv_cache_usage"] == 0.5
    assert exposed["neox_ray_pending_requests"] == 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_metrics_text(ray) -> str:
    port = ray._private.worker.global_worker.node.metrics_export_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def _series(text: str, name: str, application: str) -> dict[str, float]:
    """``{labels: value}`` of one series of one application, from Ray's Prometheus text."""
    found = {}
    for labels, value in parse_exposition(text).items():
        if labels.startswith(name + "{") and f'application="{application}"' in labels:
            found[labels] = value
    return found


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_metrics_export_carries_replica_tagged_series(ray_session, tiny_checkpoint: Path) -> None:
    from ray import serve

    from neox_ray.serve.deployment import ServeArgs, build_application

    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    from ray.serve.context import _get_global_client

    port = _get_global_client().http_config.port  # another test module may have started Serve first
    app_name, prefix = "neox-metrics-test", "/neox-metrics-test"
    args = ServeArgs(model=str(tiny_checkpoint), served_model_name="tiny", replica_num_cpus=0.25,
                     engine={"dtype": "float32", "device": "cpu", "max_num_seqs": 4})
    serve.run(build_application(args, num_replicas=1), name=app_name, route_prefix=prefix)
    try:
        url = f"http://127.0.0.1:{port}{prefix}/v1/completions"
        for stream in (False, True):
            response = httpx.post(url, json={"model": "tiny", "prompt": "Hello", "max_tokens": 4, "stream": stream},
                                  timeout=60)
            assert response.status_code == 200

        wanted = {"ray_neox_ray_requests_total", "ray_neox_ray_generation_tokens_total",
                  "ray_neox_ray_time_to_first_token_seconds_count", "ray_neox_ray_engine_steps_total",
                  "ray_neox_ray_engine_kv_cache_usage", "ray_neox_ray_engine_num_running"}
        deadline = time.monotonic() + 90  # replicas push every few seconds, the agent exports on its own clock
        found: dict[str, dict[str, float]] = {}
        while time.monotonic() < deadline:
            text = _ray_metrics_text(ray_session)
            found = {name: _series(text, name, app_name) for name in wanted}
            requests = found["ray_neox_ray_requests_total"]
            if all(found.values()) and sum(requests.values()) >= 2:
                break
            time.sleep(2)
        missing = sorted(name for name, series in found.items() if not series)
        assert not missing, f"not in Ray's metrics export: {missing}"
        replica_id = serve.status().applications[app_name].deployments["NeoxRayServer"]
        assert replica_id.replica_states.get("RUNNING") == 1
        for name, series in found.items():
            for labels in series:
                assert 'replica="' in labels and 'replica="local"' not in labels, (name, labels)
        completions = {labels: value for labels, value in found["ray_neox_ray_requests_total"].items()
                       if 'route="/v1/completions"' in labels and 'status="200"' in labels}
        assert sum(completions.values()) == 2
        assert sum(found["ray_neox_ray_generation_tokens_total"].values()) == 8
        assert sum(found["ray_neox_ray_time_to_first_token_seconds_count"].values()) == 2
    finally:
        serve.delete(app_name)


class RecordingJobMetrics:
    def __init__(self) -> None:
        self.records: list[tuple[int, int, int, int | None]] = []

    def record(self, rows: int, failed: int, tokens: int, elapsed_s: float, pool_size: int | None) -> None:
        self.records.append((rows, failed, tokens, pool_size))


def test_progress_reports_pool_size_and_records_job_metrics() -> None:
    from neox_ray.batch.progress import ProgressReporter

    lines: list[str] = []
    metrics = RecordingJobMetrics()
    pool = iter([1, 2])
    progress = ProgressReporter("generate", 100, 0, interval_s=0.0, log=lines.append,
                                read_pool_size=lambda: next(pool), metrics=metrics)
    progress.update({"rows": 10, "errors": 1, "prompt_tokens": 50, "generated_tokens": 40})
    progress.update({"rows": 20, "errors": 0, "prompt_tokens": 90, "generated_tokens": 80})
    assert metrics.records == [(10, 1, 40, 1), (30, 1, 120, 2)]
    assert "| engines 1 |" in lines[0] and "| engines 2 |" in lines[1] and "30/100 rows" in lines[1]

    broken = ProgressReporter("score", 10, 0, interval_s=0.0, log=lines.append, read_pool_size=lambda: 1 // 0)
    broken.update({"rows": 1, "errors": 0, "prompt_tokens": 5, "generated_tokens": 0})
    assert "engines" not in lines[-1]  # an unknown pool size is left out, never fatal
