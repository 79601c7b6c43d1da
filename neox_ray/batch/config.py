"""Batch-job configuration: one typed, strict model per job kind, validated once, with messages that name the key.

A job is described by a YAML file plus command-line overrides (flags win). Validation happens here, before
Ray starts or any file is read: unknown keys, wrong types (strict: ``"4"`` is not an integer) and impossible
combinations (a fixed pool and autoscaling bounds together, GPUs per replica with a tensor-parallel group,
``n > 1`` with greedy sampling, ...) raise :class:`JobConfigError` listing every problem found.

Engine settings are checked by :class:`neox_ray.engine.engine_config.EngineConfig` and sampling defaults by
:class:`neox_ray.engine.sampling_params.SamplingParams`, so the rules live in one place. What depends on the
data or the checkpoint (columns, ids, ``max_tokens`` against the model's context) is checked by
:mod:`neox_ray.batch.source` and :mod:`neox_ray.batch.runner` before the model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from neox_ray.engine.engine_config import EngineConfig
from neox_ray.engine.sampling_params import MAX_LOGPROBS, SamplingParams

JobKind = Literal["generate", "score"]


class JobConfigError(ValueError):
    """The job's configuration is invalid; the message lists every problem, one per line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class ReplicaConfig(_Strict):
    """The engine stage: an actor pool where each actor drives one ``LLM`` (one TP shard group)."""

    num_replicas: int | None = Field(default=None, ge=1, description="fixed pool size")
    min_replicas: int | None = Field(default=None, ge=1, description="autoscaling lower bound")
    max_replicas: int | None = Field(default=None, ge=1, description="autoscaling upper bound")
    num_cpus: float | None = Field(default=None, ge=0, description="CPUs per engine actor (None: sized to the cluster)")
    # None: 1 GPU per actor when the cluster has GPUs and TP == 1; 0 when TP > 1 (the shard group's
    # placement-group bundles hold the GPUs, the actor only coordinates).
    num_gpus: float | None = Field(default=None, ge=0)
    batch_size: int = Field(default=32, ge=1, description="rows per engine-stage call")
    # Calls in flight per actor. Their rows all feed the actor's ONE continuous batch, so while one call
    # waits for its slowest row the others keep the engine full.
    max_concurrent_batches: int = Field(default=4, ge=1)
    max_restarts: int = Field(default=-1, ge=-1, description="actor restarts after a crash (-1: unlimited)")

    @model_validator(mode="after")
    def _pool_shape(self) -> ReplicaConfig:
        autoscaling = self.min_replicas is not None or self.max_replicas is not None
        if self.num_replicas is not None and autoscaling:
            raise ValueError("give num_replicas (a fixed pool) or min_replicas/max_replicas (autoscaling), not both")
        if autoscaling:
            low, high = self.min_replicas or 1, self.max_replicas
            if high is None:
                raise ValueError("autoscaling needs max_replicas")
            if low > high:
                raise ValueError(f"min_replicas ({low}) must be <= max_replicas ({high})")
        return self

    @property
    def pool_bounds(self) -> tuple[int, int]:
        """(min, max) actors; equal for a fixed pool."""
        if self.min_replicas is None and self.max_replicas is None:
            size = self.num_replicas or 1
            return size, size
        return self.min_replicas or 1, self.max_replicas  # type: ignore[return-value]


class RayConfig(_Strict):
    # None: RAY_ADDRESS if set (``ray job submit`` sets it), else start a local Ray instance in this process.
    # "auto": the cluster already running on this machine (``ray start --head``); or "host:port" / "ray://...".
    address: str | None = None
    local_num_cpus: int | None = Field(default=None, ge=1, description="logical CPUs of a locally started Ray")


class JobConfig(_Strict):
    model: str = Field(min_length=1, description="checkpoint directory readable from every node, or a hub id "
                       "(ORG/NAME[@REVISION]) each node resolves into its HF cache")
    input: str = Field(min_length=1, description="a Parquet file or a directory of them (local path or URI)")
    output: str = Field(min_length=1, description="output directory; rerunning with the same one resumes")
    id_column: str = "id"
    seed: int = Field(default=0, ge=0, description="job seed; each row's seed derives from it and the row id")
    engine: dict[str, Any] = Field(default_factory=dict, description="EngineConfig options (dtype, max_num_seqs, ...)")
    replicas: ReplicaConfig = Field(default_factory=ReplicaConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    rows_per_block: int = Field(default=256, ge=1, description="rows per block read from the input")
    rows_per_file: int = Field(default=2048, ge=1, description="input rows per committed output file")
    cpu_stage_num_cpus: float = Field(default=0.25, ge=0, description="CPUs of each tokenize / commit task")
    progress_interval_s: float = Field(default=10.0, gt=0)
    dry_run: int | None = Field(default=None, ge=1, description="run N sample rows and project the wall time")

    @model_validator(mode="after")
    def _engine_and_resources(self) -> JobConfig:
        engine = self.engine_config  # raises ValueError naming the engine option
        if engine.tensor_parallel_size > 1 and self.replicas.num_gpus:
            raise ValueError(f"replicas.num_gpus must be 0 (or unset) with engine.tensor_parallel_size="
                             f"{engine.tensor_parallel_size}: the shard group's placement group holds the GPUs")
        if engine.device == "cpu" and self.replicas.num_gpus:
            raise ValueError("replicas.num_gpus > 0 with engine.device=cpu would hold GPUs the engine never uses")
        return self

    @property
    def engine_config(self) -> EngineConfig:
        if "model" in self.engine:
            raise ValueError("engine.model: give the checkpoint as the top-level 'model' key")
        try:
            return EngineConfig.from_kwargs(self.model, **self.engine)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"engine: {exc}") from None

    @property
    def revision(self) -> str | None:
        """The hub revision of ``model`` (``engine.revision``; ``ID@REVISION`` in ``model`` also works)."""
        return self.engine_config.revision

    @property
    def engine_kwargs(self) -> dict[str, Any]:
        return dict(self.engine)


class GenerateJobConfig(JobConfig):
    prompt_column: str = "prompt"
    # An input without the prompt column but with this one holds chat messages (lists of {role, content}),
    # rendered with the model's chat template (or the ``chat_template`` file).
    messages_column: str = "messages"
    chat_template: str | None = Field(default=None, min_length=1, description="jinja file overriding the "
                                      "model's chat template (readable from every node)")
    sampling: dict[str, Any] = Field(default_factory=lambda: {"max_tokens": 64},
                                     description="SamplingParams defaults; per-row columns override some")
    logprobs: bool = Field(default=False, description="add token_ids, token_logprobs (the chosen tokens) and "
                           "cumulative_logprob to each sample")
    top_logprobs: int | None = Field(default=None, ge=1, le=MAX_LOGPROBS, description="also add top_logprobs: "
                                     "the K likeliest tokens at each step (implies logprobs)")

    @model_validator(mode="after")
    def _sampling(self) -> GenerateJobConfig:
        params = self.sampling_params
        if params.n > 1 and params.temperature == 0.0:
            raise ValueError(f"sampling.n={params.n} with temperature 0 (greedy) gives {params.n} identical "
                             "samples; set a temperature > 0 or n = 1")
        return self

    @property
    def output_top_logprobs(self) -> int | None:
        """None: no logprob columns; 0: the chosen tokens' logprobs; K: also the K likeliest tokens."""
        if self.top_logprobs is not None:
            return self.top_logprobs
        return 0 if self.logprobs else None

    @property
    def engine_sampling(self) -> dict[str, Any]:
        """The sampling defaults the engine runs with: the job's, plus the logprobs its output asks for."""
        top = self.output_top_logprobs
        return self.sampling if top is None else {**self.sampling, "logprobs": top}

    @property
    def sampling_params(self) -> SamplingParams:
        if "seed" in self.sampling:
            raise ValueError("sampling.seed: use the job-level 'seed' (each row's seed derives from it and the "
                             "row id) or a per-row 'seed' column")
        known = set(SamplingParams.model_fields)
        unknown = sorted(set(self.sampling) - known)
        if unknown:
            raise ValueError(f"sampling: unknown option(s) {', '.join(unknown)}")
        try:
            return SamplingParams(**self.sampling)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"sampling: {exc}") from None


class ScoreJobConfig(JobConfig):
    # perplexity: one text per row -> NLL / perplexity; loglikelihood: (context, continuation) rows -> lm-eval's
    # loglikelihood of the continuation (logprob, is_greedy).
    mode: Literal["perplexity", "loglikelihood"] = "perplexity"
    # sliding: overlapping windows (more context per token, lower perplexity); rolling: lm-eval's
    # loglikelihood_rolling (disjoint windows; what lm-eval reports).
    perplexity: Literal["sliding", "rolling"] = "sliding"
    text_column: str = "text"
    context_column: str = "context"
    continuation_column: str = "continuation"
    window: int | None = Field(default=None, ge=2, description="tokens per scoring window (default: max_model_len)")
    stride: int | None = Field(default=None, ge=1, description="tokens between window starts (default: window/2)")
    token_logprobs: bool = Field(default=False, description="add token_logprobs: one logprob per scored token")
    rows_per_file: int = Field(default=4096, ge=1)
    # A checkpoint sweep: the same job under each of these (directories or ID@REVISION), one output
    # subdirectory each, plus sweep.json / sweep.png. ``model`` is then the first of them.
    models: list[str] | None = Field(default=None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _model_of_a_sweep(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("models") is not None:
            if "model" in data:
                raise ValueError("give model (one checkpoint) or models (a sweep), not both")
            models = data["models"]
            if isinstance(models, list) and models and isinstance(models[0], str):
                data = {**data, "model": models[0]}
        return data

    @model_validator(mode="after")
    def _mode_options(self) -> ScoreJobConfig:
        if self.mode == "loglikelihood":
            given = [name for name in ("window", "stride") if getattr(self, name) is not None]
            if self.perplexity != "sliding":
                given.append("perplexity")
            if given:
                raise ValueError(f"{', '.join(given)} only apply to mode=perplexity (loglikelihood reads each row "
                                 "whole, truncated from the left to max_model_len like lm-eval)")
        elif self.perplexity == "rolling" and self.stride is not None:
            raise ValueError("stride only applies to perplexity=sliding (rolling windows are disjoint)")
        if self.models is not None:
            empty = [m for m in self.models if not m.strip()]
            if empty or len(set(self.models)) != len(self.models):
                raise ValueError(f"models must be distinct, non-empty checkpoints, got {self.models}")
        return self


CONFIG_CLASSES: dict[str, type[GenerateJobConfig] | type[ScoreJobConfig]] = {"generate": GenerateJobConfig,
                                                                             "score": ScoreJobConfig}


def load_job_config(kind: JobKind, path: str | Path | None = None,
                    overrides: dict[str, Any] | None = None) -> GenerateJobConfig | ScoreJobConfig:
    """Reads ``path`` (YAML), applies dotted-key ``overrides`` (``None`` removes a key) and validates once."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise JobConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise JobConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise JobConfigError(f"config file {path} must hold a mapping of options, got {type(loaded).__name__}")
        raw = loaded
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return validate_job_config(kind, raw, source=str(path) if path else "command line")


def validate_job_config(kind: JobKind, raw: dict[str, Any],
                        source: str = "config") -> GenerateJobConfig | ScoreJobConfig:
    try:
        return CONFIG_CLASSES[kind].model_validate(raw)
    except ValidationError as exc:
        raise JobConfigError(f"invalid {kind} job config ({source}):\n" + _format_errors(exc)) from None


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = target.get(key)
        if not isinstance(child, dict):
            child = target[key] = {}
        target = child
    if value is None:
        target.pop(leaf, None)
    else:
        target[leaf] = value


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] != "value_error" and "input" in error and not isinstance(error["input"], dict):
            message += f" (got {error['input']!r})"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)
