"""The Ray Serve deployment: each replica hosts one ``LLM`` (one TP shard group) behind the OpenAI app.

:class:`ServeArgs` is the application's configuration (the ``args:`` of a Serve config file, or what
``neox-ray serve`` builds from its flags); :func:`build_app` is the import path ``serve run`` /
``serve deploy`` call. Replica resources follow the engine, by the policy batch jobs use too
(:mod:`neox_ray.ray.resources`): with ``tensor_parallel_size > 1`` the replica itself holds no GPU (its
shard-group workers do, in their own placement group), with one GPU per replica it asks for one, on CPU it
asks for a fraction of a core.

Serve's own knobs (replica counts, ``autoscaling_config``, ``max_ongoing_requests``, Serve-level
``max_queued_requests``, the proxy's ``request_timeout_s``) stay Serve's; this module only sets defaults
that keep overload visible to the replica, which answers it in OpenAI's shape. Request handling is
:mod:`neox_ray.serve.server`'s.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator
from ray import serve
from ray.serve import Application

from neox_ray.engine.async_engine import AsyncLLMEngine
from neox_ray.engine.engine_config import EngineConfig
from neox_ray.hub import looks_like_hub_id, parse_model_ref
from neox_ray.ray.metrics import RayServeMetricsSink
from neox_ray.ray.resources import SERVE_CPU_REPLICA_NUM_CPUS, ClusterResources, engine_actor_options
from neox_ray.serve.auth import load_api_keys
from neox_ray.serve.server import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_PROMPT_CHARS,
    DEFAULT_MAX_PROMPTS_PER_REQUEST,
    OpenAIServer,
    ServerSettings,
    create_app,
)

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "NeoxRayServer"
DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S = 30.0


class ServeArgs(BaseModel):
    """What one application serves and how each replica limits itself."""
    model_config = ConfigDict(extra="forbid")

    model: str                                  # checkpoint directory (on every replica's node) or hub id[@rev]
    served_model_name: str | None = None        # the `model` clients send; default: the model as written
    chat_template: str | None = None            # jinja file overriding the checkpoint's chat template
    engine: dict[str, Any] = {}                 # EngineConfig options (validated by it): dtype, max_num_seqs, ...
    max_queued_requests: int | None = 256       # per replica, running + waiting; beyond it: 503 + Retry-After
    request_timeout_s: float | None = 600.0     # per request; beyond it: aborted, 408
    # Per request, answered before tokenization (null: no limit): body bytes (413), prompts or score texts,
    # characters of text prompts, and a cap on n below the schema's 128 (400).
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES
    max_prompts_per_request: int | None = DEFAULT_MAX_PROMPTS_PER_REQUEST
    max_prompt_chars: int | None = DEFAULT_MAX_PROMPT_CHARS
    max_n: int | None = None
    api_key_env: str | None = None              # default: NEOX_RAY_API_KEY if set
    api_key_file: str | None = None
    replica_num_cpus: float | None = None       # default: 1 with a GPU, else 0.5

    @field_validator("max_queued_requests")
    @classmethod
    def _positive_queue(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"max_queued_requests must be >= 1 or null, got {value}")
        return value

    @field_validator("max_body_bytes", "max_prompts_per_request", "max_prompt_chars", "max_n")
    @classmethod
    def _positive_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"{info.field_name} must be >= 1 or null, got {value}")
        return value

    @field_validator("request_timeout_s")
    @classmethod
    def _positive_timeout(cls, value: float | None) -> float | None:
        if value is not None and value <= 0:
            raise ValueError(f"request_timeout_s must be > 0 or null, got {value}")
        return value

    @model_validator(mode="after")
    def _valid_engine(self) -> ServeArgs:
        self.engine_config()  # a bad value: ValueError naming it; an unknown option: TypeError naming it
        return self

    @property
    def model_name(self) -> str:
        """The served name: given, else a hub id as the user wrote it (with its revision), else the
        checkpoint directory's name."""
        if self.served_model_name:
            return self.served_model_name
        ref = parse_model_ref(self.model, self.engine.get("revision"))
        if not Path(ref.name).exists() and looks_like_hub_id(ref.name):
            return ref.display
        return Path(self.model.rstrip("/")).name

    def engine_config(self) -> EngineConfig:
        return EngineConfig.from_kwargs(self.model, **self.engine)


# Serve counts an HTTP request through an ASGI ingress as ongoing until the app has sent its last message, so a
# streamed completion counts for autoscaling until it ends, and a replica being scaled down drains: it takes no
# new requests and shuts down once its ongoing ones finish (checked every graceful_shutdown_wait_loop_s), or at
# graceful_shutdown_timeout_s, which build_application raises to cover the longest request a replica allows.
@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=256, health_check_period_s=10,
                  health_check_timeout_s=30, graceful_shutdown_timeout_s=DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S,
                  graceful_shutdown_wait_loop_s=1)
@serve.ingress()
class NeoxRayServer:
    def __init__(self, args: ServeArgs):
        from neox_ray.llm import LLM  # the engine (and torch) load inside the replica only

        api_keys = load_api_keys(args.api_key_env, args.api_key_file)
        self.llm = LLM(args.model, **args.engine)
        self.async_engine = AsyncLLMEngine(self.llm.engine, args.max_queued_requests)
        self.server = OpenAIServer(self.async_engine, ServerSettings(
            served_model_name=args.model_name, request_timeout_s=args.request_timeout_s,
            api_keys=tuple(api_keys), chat_template=args.chat_template, max_body_bytes=args.max_body_bytes,
            max_prompt_chars=args.max_prompt_chars, max_prompts_per_request=args.max_prompts_per_request,
            max_n=args.max_n))
        # The same series through Ray's metrics export, tagged with this replica (GET /metrics is one replica's).
        self.ray_metrics = RayServeMetricsSink(self.llm.engine.stats, lambda: self.async_engine.num_pending)
        self.server.metrics.add_sink(self.ray_metrics)
        logger.info("serving %s as %r (max_queued_requests=%s, request_timeout_s=%s, auth=%s)", args.model,
                    args.model_name, args.max_queued_requests, args.request_timeout_s, bool(api_keys))

    def __serve_build_asgi_app__(self):
        return create_app(self.server)

    def check_health(self) -> None:
        """Serve calls this periodically; raising makes it replace the replica."""
        self.async_engine.check_health()


def replica_actor_options(args: ServeArgs) -> dict[str, Any]:
    """The replica's ``num_cpus`` / ``num_gpus``, from the one policy in :mod:`neox_ray.ray.resources`."""
    return engine_actor_options(args.engine_config(), ClusterResources.current(), num_cpus=args.replica_num_cpus,
                                cpu_engine_num_cpus=SERVE_CPU_REPLICA_NUM_CPUS)


def build_application(args: ServeArgs, **deployment_options: Any) -> Application:
    """The application with Serve options (``num_replicas``, ``autoscaling_config``, ...) applied on top."""
    args.engine_config()  # a bad engine option fails here, at deploy time, not in every replica
    options: dict[str, Any] = {"ray_actor_options": replica_actor_options(args)}
    if args.max_queued_requests is not None:
        # Let more requests reach the replica than its engine accepts, so overload is answered there (an
        # OpenAI-shaped 503 at once) instead of waiting in Serve's router queue.
        options["max_ongoing_requests"] = max(2 * args.max_queued_requests, args.max_queued_requests + 8)
    if args.request_timeout_s is not None:
        # A downscale (or redeploy) lets in-flight streams finish: no request outlives request_timeout_s.
        options["graceful_shutdown_timeout_s"] = max(DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S, args.request_timeout_s + 5)
    options.update({key: value for key, value in deployment_options.items() if value is not None})
    return NeoxRayServer.options(**options).bind(args)  # type: ignore[attr-defined]  # added by @serve.deployment


def build_app(args: dict[str, Any]) -> Application:
    """``import_path: neox_ray.serve.deployment:build_app`` in a Serve config; ``args`` are :class:`ServeArgs`."""
    return build_application(ServeArgs.model_validate(args))
