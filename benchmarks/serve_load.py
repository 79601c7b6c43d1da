"""Load test for the online endpoint: throughput and latency against concurrency, next to sequential.

The same workload (N streamed completions of M tokens each, ``ignore_eos`` so every request generates
exactly M) is sent once strictly one request at a time (the baseline), then with 1, 8 and 32 requests in
flight. For each it prints requests/s, generated tokens/s, time to first token (TTFT) and inter-token
latency (ITL, the gaps between streamed chunks; the server sends one chunk per engine step) at p50 / p99,
the speed-up over sequential, and how many engine steps decoded several requests together (from the
replica's ``/metrics``); it writes a PNG of throughput and latency against concurrency.

By default it builds a tiny random demo checkpoint, starts a local Ray + Serve on 127.0.0.1 and serves it
on CPU; ``--model`` picks a checkpoint, ``--url`` (+ ``--api-key``) targets a server that is already
running instead. Usage::

    python benchmarks/serve_load.py [--model DIR] [--requests 64] [--max-tokens 64] [--out serve_load.png]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

try:
    import httpx
except ImportError:  # openai >= 3 ships httpx's successor under a new name, same API
    import httpx2 as httpx

from neox_ray.serve.metrics import parse_exposition

CONCURRENCY_LEVELS = (1, 8, 32)
PROMPTS = ["The quick brown fox", "Ray Serve replicas share one engine loop", "Once upon a time, in a cluster",
           "def add(a, b):", "Numbers like 3.14159 appear", "GPT-NeoX uses rotary embeddings"]


@dataclass
class RequestTiming:
    start: float
    first_token: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    end: float = 0.0


@dataclass
class RunResult:
    label: str
    concurrency: int
    wall_s: float
    timings: list[RequestTiming]
    shared_decode_steps: float
    steps: float

    @property
    def requests_per_s(self) -> float:
        return len(self.timings) / self.wall_s

    @property
    def tokens_per_s(self) -> float:
        return sum(t.completion_tokens for t in self.timings) / self.wall_s

    def ttft(self) -> list[float]:
        return [t.first_token - t.start for t in self.timings if t.first_token is not None]

    def itl(self) -> list[float]:
        return [b - a for t in self.timings for a, b in itertools.pairwise(t.chunk_times)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


class Target:
    def __init__(self, base_url: str, api_key: str | None, model: str):
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model

    async def metrics(self, http: httpx.AsyncClient) -> dict[str, float]:
        root = self.base_url[:-len("/v1")] if self.base_url.endswith("/v1") else self.base_url
        response = await http.get(f"{root}/metrics", headers=self.headers)
        return parse_exposition(response.text) if response.status_code == 200 else {}

    async def complete(self, http: httpx.AsyncClient, prompt: str, max_tokens: int) -> RequestTiming:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        timing = RequestTiming(start=time.perf_counter())
        async with http.stream("POST", f"{self.base_url}/completions", json=body, headers=self.headers) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                if chunk.get("usage"):
                    timing.completion_tokens = chunk["usage"]["completion_tokens"]
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    now = time.perf_counter()
                    timing.first_token = timing.first_token or now
                    timing.chunk_times.append(now)
        timing.end = time.perf_counter()
        return timing


async def run_load(target: Target, label: str, concurrency: int, num_requests: int, max_tokens: int,
                   sequential: bool = False) -> RunResult:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        before = await target.metrics(http)
        prompts = [PROMPTS[i % len(PROMPTS)] + f" #{i}" for i in range(num_requests)]
        start = time.perf_counter()
        if sequential:
            timings = [await target.complete(http, prompt, max_tokens) for prompt in prompts]
        else:
            gate = asyncio.Semaphore(concurrency)

            async def bounded(prompt: str) -> RequestTiming:
                async with gate:
                    return await target.complete(http, prompt, max_tokens)

            timings = list(await asyncio.gather(*(bounded(p) for p in prompts)))
        wall_s = time.perf_counter() - start
        after = await target.metrics(http)

    def delta(name: str) -> float:
        return after.get(name, float("nan")) - before.get(name, float("nan"))

    return RunResult(label, concurrency, wall_s, timings, delta("neox_ray_engine_shared_decode_steps_total"),
                     delta("neox_ray_engine_steps_total"))


def report(results: list[RunResult]) -> None:
    baseline = results[0]
    header = (f"{'run':<14}{'req/s':>8}{'tok/s':>10}{'vs seq':>8}{'TTFT p50':>10}{'TTFT p99':>10}"
              f"{'ITL p50':>10}{'ITL p99':>10}{'steps':>8}{'shared':>8}")
    print(header)
    print("-" * len(header))
    for r in results:
        ttft, itl = r.ttft(), r.itl()
        print(f"{r.label:<14}{r.requests_per_s:>8.2f}{r.tokens_per_s:>10.1f}"
              f"{r.tokens_per_s / baseline.tokens_per_s:>7.2f}x"
              f"{percentile(ttft, 50) * 1e3:>8.1f}ms{percentile(ttft, 99) * 1e3:>8.1f}ms"
              f"{percentile(itl, 50) * 1e3:>8.2f}ms{percentile(itl, 99) * 1e3:>8.2f}ms"
              f"{r.steps:>8.0f}{r.shared_decode_steps:>8.0f}")


def plot(results: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline, runs = results[0], results[1:]
    levels = [r.concurrency for r in runs]
    fig, (throughput_ax, latency_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    throughput_ax.plot(levels, [r.tokens_per_s for r in runs], "o-", label="concurrent")
    throughput_ax.axhline(baseline.tokens_per_s, color="gray", linestyle="--", label="sequential")
    throughput_ax.set(xscale="log", xlabel="concurrent requests", ylabel="generated tokens/s",
                      title="Throughput", xticks=levels, xticklabels=[str(c) for c in levels])
    throughput_ax.legend()
    for name, values, style in (("TTFT p50", [percentile(r.ttft(), 50) for r in runs], "o-"),
                                ("TTFT p99", [percentile(r.ttft(), 99) for r in runs], "o--"),
                                ("ITL p50", [percentile(r.itl(), 50) for r in runs], "s-"),
                                ("ITL p99", [percentile(r.itl(), 99) for r in runs], "s--")):
        latency_ax.plot(levels, [v * 1e3 for v in values], style, label=name)
    latency_ax.set(xscale="log", yscale="log", xlabel="concurrent requests", ylabel="ms", title="Latency",
                   xticks=levels, xticklabels=[str(c) for c in levels])
    latency_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def start_local_server(model: str | None, workdir: Path) -> Target:
    import ray
    from ray import serve

    from neox_ray.demo import create_demo_checkpoint
    from neox_ray.serve.deployment import ServeArgs, build_application

    if model is None:
        model = str(create_demo_checkpoint(workdir / "tiny-demo", shape="tiny"))
    ray.init(address="local", include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = ServeArgs(model=model, served_model_name="bench", engine={"dtype": "float32", "device": "cpu"},
                     max_queued_requests=256, request_timeout_s=600)
    serve.run(build_application(args), name="neox-ray-bench", route_prefix="/")
    return Target(f"http://127.0.0.1:{port}/v1", None, "bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: a tiny random demo checkpoint)")
    parser.add_argument("--url", help="an endpoint that is already running, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", help="with --url")
    parser.add_argument("--served-model-name", default=None, help="with --url (default: the first of /v1/models)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="serve_load.png")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        if args.url:
            model = args.served_model_name
            if model is None:
                headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
                model = httpx.get(f"{args.url.rstrip('/')}/models", headers=headers).json()["data"][0]["id"]
            target = Target(args.url, args.api_key, model)
        else:
            target = start_local_server(args.model, Path(workdir))

        async def all_runs() -> list[RunResult]:
            # Warm up both paths at full length (first-touch allocations, lazy inits) before measuring.
            await run_load(target, "warm-up", 8, 16, args.max_tokens)
            await run_load(target, "warm-up", 1, 4, args.max_tokens, sequential=True)
            results = [await run_load(target, "sequential", 1, args.requests, args.max_tokens, sequential=True)]
            for level in CONCURRENCY_LEVELS:
                results.append(await run_load(target, f"concurrency {level}", level, args.requests, args.max_tokens))
            return results

        print(f"{args.requests} requests x {args.max_tokens} tokens, streamed, against {target.base_url}")
        results = asyncio.run(all_runs())
        report(results)
        plot(results, Path(args.out))
        if not args.url:
            from ray import serve

            serve.shutdown()


if __name__ == "__main__":
    main()
