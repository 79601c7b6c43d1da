"""Autoscaling under a load ramp: replicas over time against offered load, with TTFT, tokens/s and errors.

Streamed completions are offered at a concurrency that follows ``--profile`` (``seconds:concurrency`` stages,
e.g. ramp up, hold, ramp down, idle). Every second the script records the offered concurrency, the requests in
flight and the deployment's replica states **as Ray reports them** (``serve.status()``); every request records
its time to first token, tokens and errors. It prints a per-stage table (TTFT p50/p99, generated tokens/s,
errors, replicas seen) and writes JSON (config, timeline, per-request records, per-stage summary) and a PNG
(offered load and running replicas against time, tokens/s and TTFT p50 per second below).

By default it builds a tiny random demo checkpoint, starts a local Ray + Serve on 127.0.0.1 and deploys it with
a short-delay autoscaling config (``--min-replicas`` / ``--max-replicas`` / ``--target-ongoing-requests``);
``--url`` targets an app that is already running (``neox-ray serve`` with ``--min-replicas/--max-replicas``),
reading its replicas from the Ray cluster at ``--ray-address``. Usage::

    python benchmarks/autoscale.py [--profile 15:1,20:6,25:6,20:1,30:0] [--out autoscale]

This is a measurement of Serve's autoscaler with this engine, not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

try:
    import httpx
except ImportError:  # openai >= 3 ships httpx's successor under a new name, same API
    import httpx2 as httpx

from serve_load import percentile  # the benchmarks directory is on sys.path when run as a script

APP_NAME = "neox-ray-autoscale"
DEPLOYMENT = "NeoxRayServer"
PROMPT = "Once upon a time, in a cluster far away,"


@dataclass
class RequestRecord:
    start: float                    # seconds since the run began
    stage: int
    first_token: float | None = None
    end: float | None = None
    chunks: int = 0                 # streamed chunks with text (one per engine step)
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Sample:
    t: float
    offered: int                    # the profile's concurrency now
    in_flight: int
    replicas: dict[str, int]        # deployment replica states from serve.status(), e.g. {"RUNNING": 2}


def parse_profile(text: str) -> list[tuple[float, int]]:
    stages = []
    for part in text.split(","):
        seconds, _, concurrency = part.partition(":")
        stages.append((float(seconds), int(concurrency)))
    return stages


class Run:
    def __init__(self, url: str, model: str, api_key: str | None, max_tokens: int, app_name: str):
        self.url = url.rstrip("/") + "/completions"
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.max_tokens = max_tokens
        self.app_name = app_name
        self.records: list[RequestRecord] = []
        self.samples: list[Sample] = []
        self.offered = 0
        self.stage = 0
        self.in_flight = 0
        self.start = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.start

    async def one_request(self, http: httpx.AsyncClient) -> None:
        record = RequestRecord(start=self.now(), stage=self.stage)
        self.records.append(record)
        body = {"model": self.model, "prompt": PROMPT, "max_tokens": self.max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        self.in_flight += 1
        try:
            async with http.stream("POST", self.url, json=body, headers=self.headers) as response:
                if response.status_code != 200:
                    record.error = f"HTTP {response.status_code}"
                    await response.aread()
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: "):])
                    if "error" in chunk:
                        record.error = chunk["error"].get("message", "error")
                    if chunk.get("usage"):
                        record.completion_tokens = chunk["usage"]["completion_tokens"]
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        record.first_token = record.first_token or self.now()
                        record.chunks += 1
        except Exception as error:  # a dropped stream is a result here, not a crash
            record.error = repr(error)
        finally:
            record.end = self.now()
            self.in_flight -= 1

    async def worker(self, index: int, http: httpx.AsyncClient, done: asyncio.Event) -> None:
        """Worker ``index`` sends one request after another while the offered concurrency exceeds ``index``."""
        while not done.is_set():
            if index < self.offered:
                await self.one_request(http)
            else:
                await asyncio.sleep(0.1)

    def replica_states(self) -> dict[str, int]:
        from ray import serve

        app = serve.status().applications.get(self.app_name)
        if app is None or DEPLOYMENT not in app.deployments:
            return {}
        return {str(state): count for state, count in app.deployments[DEPLOYMENT].replica_states.items()}

    async def sampler(self, done: asyncio.Event) -> None:
        while not done.is_set():
            replicas = await asyncio.to_thread(self.replica_states)
            self.samples.append(Sample(self.now(), self.offered, self.in_flight, replicas))
            await asyncio.sleep(1.0)

    async def drive(self, profile: list[tuple[float, int]]) -> None:
        done = asyncio.Event()
        peak = max(concurrency for _, concurrency in profile)
        limits = httpx.Limits(max_connections=peak + 4, max_keepalive_connections=peak + 4)
        async with httpx.AsyncClient(timeout=600, limits=limits) as http:
            tasks = [asyncio.create_task(self.worker(i, http, done)) for i in range(peak)]
            tasks.append(asyncio.create_task(self.sampler(done)))
            self.start = time.monotonic()
            for index, (seconds, concurrency) in enumerate(profile):
                self.stage, self.offered = index, concurrency
                print(f"[{self.now():6.1f}s] stage {index}: concurrency {concurrency} for {seconds:.0f} s", flush=True)
                await asyncio.sleep(seconds)
            self.offered = 0
            while self.in_flight:  # let the last streams finish: they count too
                await asyncio.sleep(0.2)
            done.set()
            await asyncio.gather(*tasks)


def summarize(run: Run, profile: list[tuple[float, int]]) -> list[dict[str, Any]]:
    rows = []
    bounds = [0.0]
    for seconds, _ in profile:
        bounds.append(bounds[-1] + seconds)
    for index, (seconds, concurrency) in enumerate(profile):
        records = [r for r in run.records if r.stage == index]
        ok = [r for r in records if r.error is None]
        ttft = [r.first_token - r.start for r in ok if r.first_token is not None]
        samples = [s for s in run.samples if bounds[index] <= s.t < bounds[index + 1]]
        running = [s.replicas.get("RUNNING", 0) for s in samples]
        rows.append({"stage": index, "seconds": seconds, "concurrency": concurrency, "requests": len(records),
                     "errors": len(records) - len(ok),
                     "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
                     "tokens_per_s": sum(r.completion_tokens for r in ok) / seconds,
                     "replicas_min": min(running, default=0), "replicas_max": max(running, default=0)})
    return rows


def report(rows: list[dict[str, Any]], run: Run) -> None:
    header = (f"{'stage':>5}{'conc':>6}{'reqs':>6}{'errors':>8}{'TTFT p50':>10}{'TTFT p99':>10}{'tok/s':>9}"
              f"{'replicas':>10}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['stage']:>5}{row['concurrency']:>6}{row['requests']:>6}{row['errors']:>8}"
              f"{row['ttft_p50_s'] * 1e3:>8.0f}ms{row['ttft_p99_s'] * 1e3:>8.0f}ms{row['tokens_per_s']:>9.1f}"
              f"{row['replicas_min']:>6}-{row['replicas_max']}")
    errors = sum(1 for r in run.records if r.error)
    print(f"{len(run.records)} requests, {errors} errors")


def plot(run: Run, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = [s.t for s in run.samples]
    fig, (load_ax, perf_ax) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    load_ax.step(times, [s.offered for s in run.samples], where="post", label="offered concurrency")
    load_ax.plot(times, [s.in_flight for s in run.samples], ".", markersize=3, label="in flight")
    load_ax.set(ylabel="requests", title="Offered load and Serve replicas (from serve.status())")
    replicas_ax = load_ax.twinx()
    replicas_ax.step(times, [s.replicas.get("RUNNING", 0) for s in run.samples], where="post", color="tab:red",
                     label="running replicas")
    replicas_ax.set_ylabel("replicas", color="tab:red")
    replicas_ax.set_ylim(0, max([s.replicas.get("RUNNING", 0) for s in run.samples] + [1]) + 1)
    lines = load_ax.get_legend_handles_labels()
    more = replicas_ax.get_legend_handles_labels()
    load_ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8)

    end = int(max(times, default=0)) + 1
    tokens = [0.0] * end
    ttft_by_second: list[list[float]] = [[] for _ in range(end)]
    for record in run.records:
        if record.error is None and record.end is not None and int(record.end) < end:
            tokens[int(record.end)] += record.completion_tokens
        if record.first_token is not None and int(record.first_token) < end:
            ttft_by_second[int(record.first_token)].append(record.first_token - record.start)
    perf_ax.bar(range(end), tokens, width=1.0, alpha=0.5, label="generated tokens/s (at completion)")
    perf_ax.set(xlabel="seconds", ylabel="tokens/s")
    ttft_ax = perf_ax.twinx()
    seconds = [i for i in range(end) if ttft_by_second[i]]
    ttft_ax.plot(seconds, [percentile(ttft_by_second[i], 50) * 1e3 for i in seconds], ".-", color="tab:green",
                 markersize=3, label="TTFT p50 (ms)")
    ttft_ax.set_ylabel("TTFT p50 (ms)", color="tab:green")
    lines = perf_ax.get_legend_handles_labels()
    more = ttft_ax.get_legend_handles_labels()
    perf_ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


def start_local_app(args: argparse.Namespace, workdir: Path) -> str:
    import ray
    from ray import serve

    from neox_ray.demo import create_demo_checkpoint
    from neox_ray.serve.deployment import ServeArgs, build_application

    model = args.model or str(create_demo_checkpoint(workdir / "tiny-demo", shape="tiny"))
    ray.init(address="local", include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve_args = ServeArgs(model=model, served_model_name="bench", replica_num_cpus=args.replica_num_cpus,
                           engine={"dtype": "float32", "device": "cpu", "max_model_len": 2048},
                           max_queued_requests=256, request_timeout_s=600)
    autoscaling = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
                   "target_ongoing_requests": args.target_ongoing_requests, "metrics_interval_s": 0.5,
                   "look_back_period_s": 3, "upscale_delay_s": 2, "downscale_delay_s": 10}
    serve.run(build_application(serve_args, autoscaling_config=autoscaling), name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{port}/v1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="15:1,20:6,25:6,20:1,30:0",
                        help="seconds:concurrency stages, in order")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--model", help="checkpoint directory (default: a tiny random demo checkpoint)")
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=3)
    parser.add_argument("--target-ongoing-requests", type=float, default=2)
    parser.add_argument("--replica-num-cpus", type=float, default=0.5)
    parser.add_argument("--url", help="an app that is already running, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", help="with --url")
    parser.add_argument("--served-model-name", help="with --url (default: the first of /v1/models)")
    parser.add_argument("--ray-address", default="auto", help="with --url: the Ray cluster serving it")
    parser.add_argument("--app-name", default=None, help="with --url: the Serve application (default: the only one)")
    parser.add_argument("--out", default="autoscale", help="writes OUT.json and OUT.png")
    args = parser.parse_args()
    profile = parse_profile(args.profile)

    with tempfile.TemporaryDirectory() as workdir:
        if args.url:
            import ray
            from ray import serve

            ray.init(address=args.ray_address, configure_logging=False)
            app_name = args.app_name or next(iter(serve.status().applications))
            headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
            model = args.served_model_name or httpx.get(f"{args.url.rstrip('/')}/models",
                                                        headers=headers).json()["data"][0]["id"]
            url = args.url
        else:
            url, model, app_name = start_local_app(args, Path(workdir)), "bench", APP_NAME
        run = Run(url, model, args.api_key, args.max_tokens, app_name)
        print(f"profile {args.profile}, {args.max_tokens} tokens per streamed request, against {url}")
        asyncio.run(run.drive(profile))
        rows = summarize(run, profile)
        report(rows, run)
        out = Path(args.out)
        result = {"profile": profile, "max_tokens": args.max_tokens, "url": url, "app": app_name,
                  "autoscaling": None if args.url else {"min_replicas": args.min_replicas,
                                                        "max_replicas": args.max_replicas,
                                                        "target_ongoing_requests": args.target_ongoing_requests},
                  "stages": [{key: None if isinstance(value, float) and math.isnan(value) else value
                              for key, value in row.items()} for row in rows],
                  "timeline": [asdict(s) for s in run.samples],
                  "requests": [asdict(r) for r in run.records]}
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        print(f"wrote {out.with_suffix('.json')}")
        plot(run, out.with_suffix(".png"))
        if not args.url:
            from ray import serve

            serve.shutdown()


if __name__ == "__main__":
    main()
