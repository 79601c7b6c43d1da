"""neox-ray's numbers through ``ray.util.metrics``, so Ray's metrics export carries them for every process.

Ray's metrics agent on each node exports what every worker on it records (``ray_`` is prepended to each
name: ``neox_ray_requests_total`` becomes ``ray_neox_ray_requests_total``), and Ray's Prometheus/Grafana
setup aggregates across nodes. Two producers:

- :class:`RayServeMetricsSink`: a :class:`neox_ray.serve.metrics.MetricsSink` for a Serve replica. The
  series and their names are the serve tables' (:mod:`neox_ray.serve.metrics`); every series carries the
  replica's ``application``, ``deployment`` and ``replica`` tags, so a dashboard can split by replica or
  sum. The engine's ``stats()`` are polled on a daemon thread (counters as deltas, gauges as set).
- :class:`BatchJobMetrics`: a batch job's progress (rows done and failed, tokens, rows/s and tokens/s,
  actor-pool size), recorded from the driver's progress reporter and tagged with the job's name.

What is measured, and when, is the callers' business; this module only translates to Ray's instruments.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

from ray.util.metrics import Counter, Gauge, Histogram

from neox_ray.serve import metrics as serve_metrics
from neox_ray.serve.metrics import PREFIX, ReadPending, ReadStats

logger = logging.getLogger(__name__)

REPLICA_TAGS = ("application", "deployment", "replica")
ENGINE_POLL_INTERVAL_S = 2.0  # Ray's agent exports every few seconds; polling faster buys nothing


def serve_replica_tags() -> dict[str, str]:
    """This Serve replica's identity (``serve.get_replica_context()``), or ``local`` values outside Serve."""
    from ray import serve

    try:
        context = serve.get_replica_context()
    except Exception:  # not inside a replica (a test building the server in-process)
        return {"application": "local", "deployment": "local", "replica": "local"}
    return {"application": context.app_name, "deployment": context.deployment,
            "replica": context.replica_id.unique_id}


class RayServeMetricsSink:
    """A replica's server and engine series as Ray metrics, tagged with :func:`serve_replica_tags`."""

    def __init__(self, read_stats: ReadStats, read_pending: ReadPending, tags: Mapping[str, str] | None = None,
                 poll_interval_s: float = ENGINE_POLL_INTERVAL_S):
        self.tags = dict(tags if tags is not None else serve_replica_tags())
        self.read_stats = read_stats
        self.read_pending = read_pending
        replica_tags = tuple(self.tags)
        self.requests = Counter(f"{PREFIX}_requests_total", serve_metrics.REQUESTS_HELP,
                                tag_keys=replica_tags + serve_metrics.REQUEST_LABELS)
        self.counters = {name: Counter(f"{PREFIX}_{name}_total", help_text, tag_keys=replica_tags)
                         for name, help_text in serve_metrics.COUNTERS.items()}
        boundaries = list(serve_metrics.LATENCY_BUCKETS_S)
        self.histograms = {name: Histogram(f"{PREFIX}_{name}", help_text, boundaries=boundaries,
                                           tag_keys=replica_tags)
                           for name, help_text in serve_metrics.HISTOGRAMS.items()}
        self.engine_counters = {name: Counter(f"{PREFIX}_engine_{name}_total", help_text, tag_keys=replica_tags)
                                for name, (kind, help_text) in serve_metrics.ENGINE_STATS.items() if kind == "counter"}
        self.engine_gauges = {name: Gauge(f"{PREFIX}_engine_{name}", help_text, tag_keys=replica_tags)
                              for name, (kind, help_text) in serve_metrics.ENGINE_STATS.items() if kind == "gauge"}
        self.pending = Gauge(f"{PREFIX}_pending_requests", serve_metrics.PENDING_HELP, tag_keys=replica_tags)
        self._last_counts: dict[str, float] = {}
        self._stop = threading.Event()
        self._poll_interval_s = poll_interval_s
        self._poller = threading.Thread(target=self._poll_engine, name="neox-ray-metrics", daemon=True)
        self._poller.start()

    def count_request(self, route: str, status: int) -> None:
        self.requests.inc(1, tags={**self.tags, "route": route, "status": str(status)})

    def increment(self, counter: str, amount: float) -> None:
        if amount > 0:
            self.counters[counter].inc(amount, tags=self.tags)

    def observe(self, histogram: str, value: float) -> None:
        self.histograms[histogram].observe(value, tags=self.tags)

    def record_engine(self) -> None:
        """One reading of the engine's stats: counters advance by what they grew since the last reading."""
        stats = self.read_stats()
        for name, counter in self.engine_counters.items():
            value = float(stats.get(name, 0.0))
            delta = value - self._last_counts.get(name, 0.0)
            if delta > 0:
                counter.inc(delta, tags=self.tags)
            self._last_counts[name] = value
        for name, gauge in self.engine_gauges.items():
            if name in stats:
                gauge.set(float(stats[name]), tags=self.tags)
        self.pending.set(float(self.read_pending()), tags=self.tags)

    def _poll_engine(self) -> None:
        while not self._stop.wait(self._poll_interval_s):
            try:
                self.record_engine()
            except Exception:  # a metrics hiccup must never take the replica down
                logger.exception("recording engine metrics failed")

    def close(self) -> None:
        self._stop.set()


JOB_TAGS = ("job",)


class BatchJobMetrics:
    """A batch job's progress as Ray metrics tagged ``job``: counters advance by the rows and tokens done since
    the last :meth:`record`; gauges hold the current rates and pool size."""

    def __init__(self, job: str):
        self.tags = {"job": job}
        self.rows = Counter(f"{PREFIX}_batch_rows_total", "Rows written by the batch job.", tag_keys=JOB_TAGS)
        self.failed_rows = Counter(f"{PREFIX}_batch_failed_rows_total", "Rows the batch job failed on.",
                                   tag_keys=JOB_TAGS)
        self.tokens = Counter(f"{PREFIX}_batch_tokens_total", "Tokens generated or scored by the batch job.",
                              tag_keys=JOB_TAGS)
        self.rows_per_s = Gauge(f"{PREFIX}_batch_rows_per_second", "Rows per second since the job started.",
                                tag_keys=JOB_TAGS)
        self.tokens_per_s = Gauge(f"{PREFIX}_batch_tokens_per_second", "Tokens per second since the job started.",
                                  tag_keys=JOB_TAGS)
        self.pool_size = Gauge(f"{PREFIX}_batch_engine_replicas", "Engine actors in the job's pool now.",
                               tag_keys=JOB_TAGS)
        self._last = {"rows": 0.0, "failed": 0.0, "tokens": 0.0}

    def record(self, rows: int, failed: int, tokens: int, elapsed_s: float, pool_size: int | None) -> None:
        for key, value, counter in (("rows", rows, self.rows), ("failed", failed, self.failed_rows),
                                    ("tokens", tokens, self.tokens)):
            delta = float(value) - self._last[key]
            if delta > 0:
                counter.inc(delta, tags=self.tags)
            self._last[key] = float(value)
        if elapsed_s > 0:
            self.rows_per_s.set(rows / elapsed_s, tags=self.tags)
            self.tokens_per_s.set(tokens / elapsed_s, tags=self.tags)
        if pool_size is not None:
            self.pool_size.set(pool_size, tags=self.tags)
