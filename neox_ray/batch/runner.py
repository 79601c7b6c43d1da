"""Runs a batch job: checks, Ray Data pipeline, progress, final verification and summary.

Order matters: everything that can fail because of the user's input (config, checkpoint files, columns,
ids, output directory of another job) is checked on the driver first; only then does Ray start or
connect. Then what the job reserves (engine actors, their shard groups, the CPU tasks; the policy is
:mod:`neox_ray.ray.resources`) is compared with what the cluster has: on a Ray the job started, a job that
cannot fit fails at once naming the resource; on a cluster that may grow (or is busy), it says every
progress interval what it is waiting for. Only then do engine actors load the model.

The pipeline::

    read (ids, resume filter) -> prepare (CPU tasks) -> engine (actor pool) -> commit (CPU tasks)

The engine stage's actors are created with ``max_restarts`` / ``max_task_retries`` (Ray Data's actor-pool
fault tolerance): a killed actor is restarted and the calls it held are retried on the pool, so their rows
are redone. The commit stage names files by content, so retries cannot duplicate rows; :func:`finalize`
verifies it anyway.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from neox_ray.batch.config import GenerateJobConfig, JobConfig, ScoreJobConfig
from neox_ray.batch.progress import JobMetricsSink, ProgressReporter, WaitingNotice, format_duration, print_to_stderr
from neox_ray.batch.sink import SUCCESS, SUMMARY, OutputDir, commit_block, finalize, finish_empty_input
from neox_ray.batch.source import IdentifiedParquetDatasource, InputPlan, plan_input
from neox_ray.batch.stages import (
    GENERATION_COLUMNS,
    GENERATION_LOGPROB_COLUMNS,
    INTERNAL_COLUMNS,
    LOGLIKELIHOOD_COLUMNS,
    SCORE_COLUMNS,
    TOKEN_LOGPROBS,
    GenerateEngineStage,
    ScoreEngineStage,
    engine_span,
    format_generation,
    format_scores,
    prepare_generation,
    prepare_loglikelihood,
    prepare_scoring,
)
from neox_ray.chat import ChatTemplate, ChatTemplateError
from neox_ray.config import ModelConfig
from neox_ray.engine.scoring import validate_window
from neox_ray.hub import ModelNotFoundError, resolve_model
from neox_ray.ray.resources import BatchResourcePlan, ClusterResources

logger = logging.getLogger(__name__)


class JobError(ValueError):
    """The job cannot start as configured (found before any model loads)."""


@dataclass
class Preflight:
    plan: InputPlan
    max_model_len: int
    window: int | None = None
    stride: int | None = None


def kind_of(config: JobConfig) -> str:
    return "generate" if isinstance(config, GenerateJobConfig) else "score"


def preflight(config: JobConfig) -> Preflight:
    """Checks the checkpoint files and the input against the job, without Ray and without loading weights."""
    try:  # a hub id resolves (downloads on this node, or reads the HF cache) to its local snapshot
        model_dir = Path(resolve_model(config.model, config.revision, config.engine_config.allow_pickle))
    except ModelNotFoundError as exc:
        raise JobError(str(exc)) from None
    for name in ("config.json", "tokenizer.json"):
        if not (model_dir / name).is_file():
            raise JobError(f"model directory {model_dir} has no {name} (it must be a HuggingFace-format "
                           "GPT-NeoX checkpoint readable from every node)")
    try:
        model_config = ModelConfig.from_pretrained(model_dir)
    except ValueError as exc:
        raise JobError(f"model {config.model}: {exc}") from None
    max_model_len = model_config.resolve_max_model_len(config.engine_config.max_model_len)
    if isinstance(config, GenerateJobConfig):
        max_tokens = config.sampling_params.max_tokens
        if max_tokens >= max_model_len:
            raise JobError(f"sampling.max_tokens={max_tokens} leaves no room for a prompt in max_model_len="
                           f"{max_model_len}")
        reserved = tuple(c for c in GENERATION_COLUMNS) + INTERNAL_COLUMNS
        if config.output_top_logprobs is not None:
            reserved += GENERATION_LOGPROB_COLUMNS
        plan = plan_input(config.input, config.prompt_column, config.id_column, reserved, config.messages_column)
        if plan.is_chat:
            try:
                template = ChatTemplate.load(model_dir, config.chat_template)
            except ChatTemplateError as exc:
                raise JobError(str(exc)) from None
            if template is None:
                raise JobError(f"input column {config.messages_column!r} holds chat messages but model "
                               f"{config.model} has no chat template; pass --chat-template FILE")
        return Preflight(plan, max_model_len)
    assert isinstance(config, ScoreJobConfig)
    if config.mode == "loglikelihood":
        reserved = LOGLIKELIHOOD_COLUMNS + (TOKEN_LOGPROBS,) + INTERNAL_COLUMNS
        plan = plan_input(config.input, config.continuation_column, config.id_column, reserved)
        if config.context_column not in plan.schema.names:
            raise JobError(f"input {config.input} has no column {config.context_column!r} (contexts; columns: "
                           f"{', '.join(plan.schema.names)}); set --context-column")
        context_type = plan.schema.field(config.context_column).type
        if pa.types.is_dictionary(context_type):
            context_type = context_type.value_type
        if not (pa.types.is_string(context_type) or pa.types.is_large_string(context_type)
                or pa.types.is_string_view(context_type) or pa.types.is_null(context_type)):
            raise JobError(f"input column {config.context_column!r} has Arrow type {context_type}; it must hold "
                           "strings")
        return Preflight(plan, max_model_len)
    window = config.window if config.window is not None else max_model_len
    stride: int | None = config.stride if config.stride is not None else max(1, window // 2)
    try:
        validate_window(window, stride or 1, max_model_len)
    except ValueError as exc:
        raise JobError(str(exc)) from None
    if config.perplexity == "rolling":
        stride = None  # rolling windows are disjoint
    reserved = SCORE_COLUMNS + (TOKEN_LOGPROBS,) + INTERNAL_COLUMNS
    plan = plan_input(config.input, config.text_column, config.id_column, reserved)
    return Preflight(plan, max_model_len, window, stride)


def job_identity(config: JobConfig, checks: Preflight) -> dict[str, Any]:
    """What must not change between a run and its resume (other settings, e.g. replicas, may)."""
    identity: dict[str, Any] = {"kind": kind_of(config), "model": str(config.model), "input": str(config.input),
                                "id_column": config.id_column, "seed": config.seed}
    if config.revision is not None:
        identity["revision"] = config.revision
    if isinstance(config, GenerateJobConfig):
        identity.update(prompt_column=checks.plan.text_column, sampling=dict(sorted(config.engine_sampling.items())))
    else:
        assert isinstance(config, ScoreJobConfig)
        identity.update(score_identity(config, checks))
    return identity


def score_identity(config: ScoreJobConfig, checks: Preflight) -> dict[str, Any]:
    """A score job's settings that change its numbers (the defaults keep earlier jobs' identities)."""
    if config.mode == "loglikelihood":
        identity: dict[str, Any] = {"mode": config.mode, "context_column": config.context_column,
                                    "continuation_column": config.continuation_column}
    else:
        identity = {"text_column": config.text_column, "window": checks.window, "stride": checks.stride}
        if config.perplexity != "sliding":
            identity["perplexity"] = config.perplexity
    if config.token_logprobs:
        identity["token_logprobs"] = True
    return identity


def connect_ray(config: JobConfig) -> bool:
    """Joins a cluster (``ray.address`` or RAY_ADDRESS) or starts a local instance. True if we called init."""
    import ray

    if ray.is_initialized():
        return False
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, configure_logging=False)
    else:
        ray.init(address="local", num_cpus=config.ray.local_num_cpus, include_dashboard=False,
                 configure_logging=False)
    return True


def resource_plan(config: JobConfig, started_ray: bool, replicas: int | None = None) -> BatchResourcePlan:
    """What the engine actors (and their shard groups) and the CPU tasks reserve, from the one policy in
    :mod:`neox_ray.ray.resources`. On a Ray this job started, CPUs per actor left unset are sized to it."""
    cluster = ClusterResources.current()
    try:
        return BatchResourcePlan.build(
            config.engine_config, cluster, replicas=replicas or config.replicas.pool_bounds[1],
            num_cpus=config.replicas.num_cpus, num_gpus=config.replicas.num_gpus,
            cpu_task_num_cpus=config.cpu_stage_num_cpus, size_to_cluster=started_ray)
    except ValueError as exc:
        raise JobError(str(exc)) from None


def check_resources(config: JobConfig, plan: BatchResourcePlan, started_ray: bool,
                    log: Callable[[str], None]) -> WaitingNotice | None:
    """Before the pool starts: on a Ray this job started (its size is fixed) a plan that cannot fit is a
    :class:`JobError` naming the resource; on a cluster that may grow, a notice that logs
    ``waiting for resources: ...`` every progress interval while the cluster is too small, or while engine
    actors wait to be placed on a busy one."""
    must_fit = dataclasses.replace(plan, replicas=min(config.replicas.pool_bounds[0], plan.replicas))
    if started_ray:
        shortfall = must_fit.shortfall(ClusterResources.current())
        if shortfall:
            raise JobError(shortfall)
        return None

    def shortfall_now() -> str | None:
        shortfall = must_fit.shortfall(ClusterResources.current())
        if shortfall:
            return f"{shortfall} (the engine actors stay pending until it grows)"
        return _pending_actors(plan)

    return WaitingNotice("waiting for resources", shortfall_now, config.progress_interval_s, log)


def _pending_actors(plan: BatchResourcePlan) -> str | None:
    """The cluster is big enough but busy: names this job's actors still waiting to be placed. Needs Ray's
    state API (the dashboard); without it, says nothing."""
    import ray
    from ray.util.state import list_actors

    if not ray.is_initialized():  # get_runtime_context() would start a Ray of its own
        return None
    try:
        pending = list_actors(address=ray.get_runtime_context().gcs_address, raise_on_missing_output=False,
                              filters=[("state", "=", "PENDING_CREATION"),
                                       ("job_id", "=", ray.get_runtime_context().get_job_id())], timeout=5)
    except Exception:  # no dashboard, or an older cluster: the totals check above is all we have
        logger.debug("cannot list pending actors", exc_info=True)
        return None
    # Ray Data hosts each engine-stage actor in a "_MapWorker"; other pending actors of the job are its helpers.
    engine_actors = [actor for actor in pending if "MapWorker" in (actor.class_name or "")]
    if not engine_actors:
        return None
    free = ray.available_resources()
    cpus, gpus = plan.actor_options["num_cpus"], plan.actor_options["num_gpus"]
    need = f"{cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
    need += " + its shard group" if plan.worker_bundles else ""
    return (f"{len(engine_actors)} engine actor(s) pending; each needs {need}; free now: "
            f"{free.get('CPU', 0.0):g} CPUs, {free.get('GPU', 0.0):g} GPUs")


def build_pipeline(config: JobConfig, checks: Preflight, skip_ids: pa.Array | None, actor_options: dict[str, float],
                   *, dry_run_rows: int | None = None, output: str | None = None):
    """The Ray Data dataset for the job; with ``dry_run_rows`` it stops after the engine (one actor)."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    kind = kind_of(config)
    cpu = config.cpu_stage_num_cpus
    stage: type[GenerateEngineStage] | type[ScoreEngineStage]
    constructor_kwargs: dict[str, Any]
    source = IdentifiedParquetDatasource(checks.plan, config.rows_per_block, skip_ids)
    ds = ray.data.read_datasource(source.as_ray_datasource(), num_cpus=cpu)
    if dry_run_rows is not None:
        ds = ds.limit(dry_run_rows)
    if isinstance(config, GenerateJobConfig):
        ds = ds.map_batches(prepare_generation, batch_format="pyarrow", batch_size=None, num_cpus=cpu,
                            fn_kwargs=dict(model=config.model, revision=config.revision,
                                           prompt_column=checks.plan.text_column, sampling=config.engine_sampling,
                                           job_seed=config.seed, max_model_len=checks.max_model_len,
                                           chat=checks.plan.is_chat, chat_template=config.chat_template))
        stage, constructor_kwargs = GenerateEngineStage, {}
    else:
        assert isinstance(config, ScoreJobConfig)
        if config.mode == "loglikelihood":
            ds = ds.map_batches(prepare_loglikelihood, batch_format="pyarrow", batch_size=None, num_cpus=cpu,
                                fn_kwargs=dict(model=config.model, revision=config.revision,
                                               context_column=config.context_column,
                                               continuation_column=config.continuation_column))
        else:
            ds = ds.map_batches(prepare_scoring, batch_format="pyarrow", batch_size=None, num_cpus=cpu,
                                fn_kwargs=dict(model=config.model, revision=config.revision,
                                               text_column=config.text_column))
        stage = ScoreEngineStage
        constructor_kwargs = dict(text_column=config.text_column, window=checks.window, stride=checks.stride,
                                  mode=config.mode, perplexity=config.perplexity,
                                  token_logprobs=config.token_logprobs)
    low, high = (1, 1) if dry_run_rows is not None else config.replicas.pool_bounds
    calls = config.replicas.max_concurrent_batches
    in_flight = calls
    if high > low:
        # Ray Data grows a pool only once its tasks in flight reach actor_pool_util_upscaling_threshold (1.75)
        # times what its actors run at once: with no more in flight than that, an autoscaling pool never grows.
        threshold = DataContext.get_current().autoscaling_config.actor_pool_util_upscaling_threshold
        in_flight = max(calls + 1, math.ceil(calls * threshold))
    ds = ds.map_batches(
        stage, batch_format="pyarrow", batch_size=config.replicas.batch_size,
        fn_constructor_kwargs=dict(model=config.model, engine_kwargs=config.engine_kwargs, **constructor_kwargs),
        compute=ActorPoolStrategy(min_size=low, max_size=high, max_concurrent_calls_per_actor=calls,
                                  max_tasks_in_flight_per_actor=in_flight, enable_true_multi_threading=True),
        **_restart_policy(config), **actor_options)
    if dry_run_rows is not None:
        return ds
    num_samples = config.sampling_params.n if isinstance(config, GenerateJobConfig) else 1
    top_logprobs = config.output_top_logprobs if isinstance(config, GenerateJobConfig) else None
    return ds.map_batches(commit_block, batch_format="pyarrow", batch_size=config.rows_per_file, num_cpus=cpu,
                          fn_kwargs=dict(output=output, kind=kind, num_samples=num_samples, top_logprobs=top_logprobs))


def _restart_policy(config: JobConfig) -> dict[str, int]:
    """Ray Data already creates pool actors with ``max_restarts=-1, max_task_retries=-1`` (a killed actor is
    restarted and its calls retried): we keep that default and only pass a bound the user asked for."""
    if config.replicas.max_restarts == -1:
        return {}
    return {"max_restarts": config.replicas.max_restarts, "max_task_retries": -1}


def _quiet_ray_data() -> None:
    from ray.data import DataContext

    # Our progress line replaces Ray Data's bars, which are unreadable in job logs.
    DataContext.get_current().enable_progress_bars = False


def run_job(config: JobConfig, log: Callable[[str], None] = print_to_stderr) -> dict[str, Any]:
    """Runs (or resumes, or dry-runs) the job and returns its summary."""
    if isinstance(config, ScoreJobConfig) and config.models is not None:  # a checkpoint sweep: one job each
        from neox_ray.batch.sweep import run_sweep

        return run_sweep(config, log)
    kind = kind_of(config)
    checks = preflight(config)
    if checks.plan.total_rows == 0:  # nothing to run: an empty result at once, without Ray or a model
        return finish_empty_input(config.output, config.dry_run is not None, checks.plan, kind,
                                  job_identity(config, checks), log)
    if config.dry_run is not None:
        started_ray = connect_ray(config)
        try:
            _quiet_ray_data()
            plan = resource_plan(config, started_ray, replicas=1)
            waiting = check_resources(config, plan, started_ray, log)
            try:
                return dry_run(config, checks, plan, log)
            finally:
                if waiting:
                    waiting.stop()
        finally:
            _shutdown(started_ray)

    output = OutputDir(config.output)
    if output.exists(SUCCESS) and output.exists(SUMMARY):
        import json

        log(f"[{kind}] {config.output} is already complete ({SUCCESS} present); nothing to do")
        return json.loads(output.read_text(SUMMARY))
    committed = output.start(job_identity(config, checks))
    already = len(committed) if committed is not None else 0
    total = checks.plan.total_rows
    log(f"[{kind}] {total:,} input rows in {len(checks.plan.files)} file(s); {already:,} already committed in "
        f"{config.output}")
    started_ray = connect_ray(config)
    try:
        _quiet_ray_data()
        progress = ProgressReporter(kind, total, already, config.progress_interval_s, log,
                                    read_pool_size=engine_pool_size, metrics=_job_metrics(kind, config.output))
        if already < total:
            plan = resource_plan(config, started_ray)
            waiting = check_resources(config, plan, started_ray, log)
            try:
                ds = build_pipeline(config, checks, committed, plan.actor_options, output=config.output)
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    for stats in batch.to_pylist():
                        progress.update(stats)
            finally:
                if waiting:
                    waiting.stop()
            log(progress.report())
        num_samples = config.sampling_params.n if isinstance(config, GenerateJobConfig) else 1
        return finalize(output, checks.plan, kind, num_samples, progress.run_stats(), score_mode=_score_mode(config))
    finally:
        _shutdown(started_ray)


def engine_pool_size() -> int | None:
    """Engine actors of this job alive now (Ray Data hosts each pool actor in a ``_MapWorker``; the job's other
    stages are tasks), from the GCS actor table, which needs no dashboard. None when Ray cannot say."""
    import ray
    from ray._private import state  # ray.util.state would need the dashboard, which local runs start without

    if not ray.is_initialized():
        return None
    job_id = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    actors = state.actors(job_id=job_id, actor_state_name="ALIVE")
    return sum(1 for actor in actors.values() if "MapWorker" in str(actor.get("ActorClassName", "")))


def _job_metrics(kind: str, output: str) -> JobMetricsSink:
    """The job's progress as Ray metrics (:mod:`neox_ray.ray.metrics`), tagged ``kind:<output dir name>``."""
    from neox_ray.ray.metrics import BatchJobMetrics

    return BatchJobMetrics(f"{kind}:{Path(output.rstrip('/')).name}")


def _score_mode(config: JobConfig) -> str:
    return config.mode if isinstance(config, ScoreJobConfig) else "perplexity"


def _shutdown(started_ray: bool) -> None:
    if started_ray:
        import ray

        ray.shutdown()


def dry_run(config: JobConfig, checks: Preflight, plan: BatchResourcePlan,
            log: Callable[[str], None]) -> dict[str, Any]:
    """Runs N sample rows on one engine replica and projects the wall time of the whole job."""
    kind = kind_of(config)
    rows = min(config.dry_run or 1, checks.plan.total_rows)
    started = time.time()
    batches = list(build_pipeline(config, checks, None, plan.actor_options, dry_run_rows=rows)
                   .iter_batches(batch_size=None, batch_format="pyarrow"))
    wall = time.time() - started
    spans = [s for s in (engine_span(b) for b in batches) if s is not None]
    num_samples = config.sampling_params.n if isinstance(config, GenerateJobConfig) else 1
    top_logprobs = config.output_top_logprobs if isinstance(config, GenerateJobConfig) else None
    tables = [format_generation(b, num_samples, top_logprobs) if kind == "generate" else format_scores(b)
              for b in batches]
    table = pa.concat_tables(tables) if tables else pa.table({})
    first_start = min(s[0] for s in spans) if spans else started
    engine_s = max(max(s[1] for s in spans) - first_start, 1e-6) if spans else wall
    startup_s = max(first_start - started, 0.0)
    replicas = config.replicas.pool_bounds[1]
    per_replica_rate = rows / engine_s
    projected_s = startup_s + checks.plan.total_rows / (per_replica_rate * replicas)
    token_column = "num_generated_tokens" if kind == "generate" else "num_tokens"
    tokens = int(sum(v or 0 for v in table.column(token_column).to_pylist())) if table.num_rows else 0
    errors = sum(1 for e in table.column("error").to_pylist() if e is not None) if table.num_rows else 0
    report = {"kind": kind, "dry_run_rows": rows, "errors": errors, "wall_time_s": round(wall, 3),
              "startup_s": round(startup_s, 3), "engine_s": round(engine_s, 3),
              "rows_per_s_per_replica": round(per_replica_rate, 3),
              "tokens_per_s_per_replica": round(tokens / engine_s, 3), "total_rows": checks.plan.total_rows,
              "replicas": replicas, "projected_wall_time_s": round(projected_s, 1)}
    shown = [c for c in ("id", "generated_text", "finish_reason", "perplexity", "logprob", "is_greedy", "error")
             if c in table.column_names]
    for row in table.select(shown).slice(0, 3).to_pylist():
        log(f"[dry run] {row}")
    log(f"[dry run] {rows} rows in {engine_s:.1f}s on one replica after {startup_s:.1f}s start-up: "
        f"{per_replica_rate:.2f} rows/s, {tokens / engine_s:.1f} tok/s per replica, {errors} error row(s)")
    log(f"[dry run] projected wall time for {checks.plan.total_rows:,} rows on {replicas} replica(s): "
        f"{format_duration(projected_s)} (small samples under-fill the continuous batch, so this is pessimistic)")
    return report
