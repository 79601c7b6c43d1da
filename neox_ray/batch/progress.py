"""Progress of a running batch job: rows committed / total, generated tokens/s, the engine pool's size and
an ETA, printed every few seconds (and handed to a :class:`JobMetricsSink`, e.g. Ray metrics); the
human-readable end-of-job summary; and :class:`WaitingNotice`, which says what the job is waiting for (e.g.
resources a cluster does not have yet) instead of staying silent. Pure Python: how the pool is counted and
where metrics go are the runner's business (:mod:`neox_ray.batch.runner`, :mod:`neox_ray.ray.metrics`).

It only counts what the commit stage reports (one small row per committed file), so "done" always means
"durably written".
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


logger = logging.getLogger(__name__)


def print_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class WaitingNotice:
    """Logs ``"<what>: <reason>"`` at once and every ``interval_s`` (from a daemon thread) while ``reason()``
    returns one, until :meth:`stop`. ``reason`` returns None when there is nothing to wait for."""

    def __init__(self, what: str, reason: Callable[[], str | None], interval_s: float,
                 log: Callable[[str], None] = print_to_stderr):
        self.what, self.reason, self.interval_s, self.log = what, reason, interval_s, log
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="neox-ray-waiting-notice", daemon=True)
        self._thread.start()

    def _report(self) -> None:
        try:
            reason = self.reason()
        except Exception:  # a notice must never break the job it describes
            logger.debug("waiting notice check failed", exc_info=True)
            return
        if reason:
            self.log(f"{self.what}: {reason}")

    def _run(self) -> None:
        self._report()  # here, not in __init__: a check may take seconds and must not hold up the job
        while not self._stopped.wait(self.interval_s):
            self._report()

    def stop(self) -> None:
        self._stopped.set()


class JobMetricsSink(Protocol):
    """Receives the job's totals at each report (rows and tokens of this run so far, cumulative)."""

    def record(self, rows: int, failed: int, tokens: int, elapsed_s: float, pool_size: int | None) -> None: ...


class ProgressReporter:
    """Counts committed rows and tokens; every ``interval_s`` logs :meth:`line` and records the totals in
    ``metrics``. ``read_pool_size`` says how many engine actors run now (None: unknown, not shown)."""

    def __init__(self, kind: str, total_rows: int, already_done: int, interval_s: float,
                 log: Callable[[str], None] = print_to_stderr,
                 read_pool_size: Callable[[], int | None] | None = None, metrics: JobMetricsSink | None = None):
        self.kind = kind
        self.read_pool_size = read_pool_size
        self.metrics = metrics
        self.total_rows = total_rows
        self.already_done = already_done
        self.interval_s = interval_s
        self.log = log
        self.start = time.monotonic()
        self.first_commit: float | None = None
        self.rows = self.errors = self.prompt_tokens = self.generated_tokens = self.files = 0
        self._rows_at_first_commit = 0
        self._last_print = self.start

    def update(self, stats: dict[str, Any]) -> None:
        now = time.monotonic()
        if self.first_commit is None:
            self.first_commit, self._rows_at_first_commit = now, stats["rows"]
        self.rows += stats["rows"]
        self.errors += stats["errors"]
        self.prompt_tokens += stats["prompt_tokens"]
        self.generated_tokens += stats["generated_tokens"]
        self.files += 1
        if now - self._last_print >= self.interval_s:
            self._last_print = now
            self.log(self.report(now))

    @property
    def tokens(self) -> int:
        """The tokens this kind of job is about: generated (generate) or scored (score)."""
        return self.generated_tokens if self.kind == "generate" else self.prompt_tokens

    def pool_size(self) -> int | None:
        if self.read_pool_size is None:
            return None
        try:
            return self.read_pool_size()
        except Exception:  # a progress line must never break the job it describes
            logger.debug("reading the engine pool size failed", exc_info=True)
            return None

    def report(self, now: float | None = None) -> str:
        """Records the totals in ``metrics`` and returns the progress line."""
        now = now or time.monotonic()
        pool = self.pool_size()
        if self.metrics is not None:
            try:
                self.metrics.record(self.rows, self.errors, self.tokens, now - self.start, pool)
            except Exception:
                logger.debug("recording job metrics failed", exc_info=True)
        return self.line(now, pool)

    @property
    def done(self) -> int:
        return self.already_done + self.rows

    def eta_s(self, now: float) -> float | None:
        # The rate since the first commit, so model loading does not make the estimate look worse forever.
        if self.first_commit is None or now - self.first_commit < 1e-3 or self.rows <= self._rows_at_first_commit:
            return None
        rate = (self.rows - self._rows_at_first_commit) / (now - self.first_commit)
        return (self.total_rows - self.done) / rate

    def line(self, now: float | None = None, pool_size: int | None = None) -> str:
        now = now or time.monotonic()
        elapsed = now - self.start
        percent = 100.0 * self.done / max(self.total_rows, 1)
        tokens = (f"{self.generated_tokens / elapsed:,.1f} generated tok/s" if self.kind == "generate"
                  else f"{self.prompt_tokens / elapsed:,.1f} scored tok/s")
        pool = f" | engines {pool_size}" if pool_size is not None else ""
        return (f"[{self.kind}] {self.done:,}/{self.total_rows:,} rows ({percent:.1f}%) | {tokens}{pool} | "
                f"errors {self.errors:,} | elapsed {format_duration(elapsed)} | ETA {format_duration(self.eta_s(now))}")

    def run_stats(self) -> dict[str, Any]:
        wall = time.monotonic() - self.start
        return {"wall_time_s": round(wall, 3), "rows_this_run": self.rows, "rows_resumed": self.already_done,
                "errors_this_run": self.errors, "generated_tokens_this_run": self.generated_tokens,
                "prompt_tokens_this_run": self.prompt_tokens,
                "rows_per_s": round(self.rows / wall, 3) if wall > 0 else None,
                "generated_tokens_per_s": round(self.generated_tokens / wall, 3) if wall > 0 else None}


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"== {summary['kind']} job complete: {summary['rows']:,} rows "
             f"({summary['rows_ok']:,} ok, {summary['rows_failed']:,} failed) in "
             f"{format_duration(summary.get('wall_time_s'))}"]
    if summary["kind"] == "generate":
        lines.append(f"   prompt tokens {summary['prompt_tokens']:,} | "
                     f"generated tokens {summary['generated_tokens']:,} | "
                     f"{summary.get('generated_tokens_per_s') or 0:,.1f} generated tok/s this run")
    else:
        def number(key: str) -> str:
            value = summary.get(key)
            return f"{value:.4f}" if isinstance(value, float) else str(value)

        if summary.get("mode") == "loglikelihood":
            lines.append(f"   continuation tokens {summary['num_tokens']:,} | mean logprob {number('mean_logprob')} | "
                         f"greedy rows {summary['greedy_rows']:,}")
        else:
            lines.append(f"   tokens {summary['num_tokens']:,} | perplexity {number('perplexity')} | bits/byte "
                         f"{number('bits_per_byte')} | word perplexity {number('word_perplexity')}")
    lines.append(f"   this run: {summary.get('rows_this_run', 0):,} rows, {summary.get('rows_resumed', 0):,} "
                 f"already committed before it; {summary['files']} files")
    return "\n".join(lines)
