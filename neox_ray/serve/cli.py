"""``neox-ray serve``: launch the endpoint from flags and/or a Serve config file. Thin: resolve, start, wait.

Flags override the config file (``configs/serve.yaml`` shape: ``http_options`` plus one application
whose ``args`` are :class:`ServeArgs`); ``--print-config`` prints the resolved Serve config instead of
launching (it also works as input to ``serve run`` / ``serve deploy``). The engine flags are generated from
the ``EngineConfig`` fields tagged ``flag``. Everything about serving itself is
:mod:`neox_ray.serve.deployment`'s.
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from neox_ray.engine.engine_config import flag_fields

APP_NAME = "neox-ray"
IMPORT_PATH = "neox_ray.serve.deployment:build_app"
DEFAULT_TARGET_ONGOING_REQUESTS = 32


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="OpenAI-compatible endpoint on Ray Serve",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory or hub id (ORG/NAME[@REVISION]); overrides the "
                                        "config's args.model")
    parser.add_argument("--config", help="a Serve config YAML such as configs/serve.yaml")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default 8000)")
    parser.add_argument("--api-key-env", help="environment variable holding the API key(s)")
    parser.add_argument("--api-key-file", help="file holding the API key(s), one per line")
    parser.add_argument("--served-model-name",
                        help="the model name clients send (default: the hub id as given, or the directory's name)")
    parser.add_argument("--chat-template", help="jinja file overriding the checkpoint's chat template (readable on "
                                                "every replica's node)")
    replicas = parser.add_mutually_exclusive_group()
    replicas.add_argument("--num-replicas", type=int, help="a fixed number of replicas")
    replicas.add_argument("--min-replicas", type=int, help="autoscale between --min-replicas and --max-replicas")
    parser.add_argument("--max-replicas", type=int)
    parser.add_argument("--target-ongoing-requests", type=float, help="autoscaling target per replica")
    engine = parser.add_argument_group("engine (each replica's; the config's args.engine)")
    for spec in flag_fields():
        engine.add_argument(spec.flag, **spec.argparse_options(spec.default))
    parser.add_argument("--max-queued-requests", type=int, help="per replica; beyond it requests get 503")
    parser.add_argument("--request-timeout-s", type=float, help="per request; beyond it requests get 408")
    parser.add_argument("--max-body-bytes", type=int, help="request body size; beyond it 413 (default 8 MiB)")
    parser.add_argument("--max-prompts-per-request", type=int,
                        help="prompts (or /v1/score texts) per request; beyond it 400 (default 256)")
    parser.add_argument("--max-prompt-chars", type=int,
                        help="characters of text prompts per request; beyond it 400 (default 1 MiB)")
    parser.add_argument("--max-n", type=int, help="a cap on n below the schema's 128; beyond it 400")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved Serve config and exit")
    parser.set_defaults(func=run)


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """The Serve config (``http_options`` + one application) from the file and the flags."""
    if args.config:
        config = yaml.safe_load(Path(args.config).read_text()) or {}
    else:
        config = {"applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH, "args": {}}]}
    config = copy.deepcopy(config)
    applications = config.get("applications") or []
    if len(applications) != 1:
        raise ValueError(f"the config must hold exactly one application, found {len(applications)}")
    app = applications[0]
    app_args = app.setdefault("args", {})
    http = config.setdefault("http_options", {})
    http.setdefault("host", "127.0.0.1")
    http.setdefault("port", 8000)
    for flag, key in (("host", "host"), ("port", "port")):
        if getattr(args, flag) is not None:
            http[key] = getattr(args, flag)
    for flag in ("model", "api_key_env", "api_key_file", "served_model_name", "chat_template", "max_queued_requests",
                 "request_timeout_s", "max_body_bytes", "max_prompts_per_request", "max_prompt_chars", "max_n"):
        if getattr(args, flag) is not None:
            app_args[flag] = getattr(args, flag)
    engine = app_args.setdefault("engine", {})
    for spec in flag_fields():
        if getattr(args, spec.name, None) is not None:
            engine[spec.name] = getattr(args, spec.name)
    if not app_args.get("model"):
        raise ValueError("no model: pass --model DIR or set args.model in the config")
    deployment = _deployment_entry(app)
    if args.num_replicas is not None:
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = args.num_replicas
    elif args.min_replicas is not None or args.max_replicas is not None or args.target_ongoing_requests:
        autoscaling = deployment.setdefault("autoscaling_config", {})
        deployment.pop("num_replicas", None)
        if args.min_replicas is not None:
            autoscaling["min_replicas"] = args.min_replicas
        if args.max_replicas is not None:
            autoscaling["max_replicas"] = args.max_replicas
        autoscaling.setdefault("target_ongoing_requests", DEFAULT_TARGET_ONGOING_REQUESTS)
        if args.target_ongoing_requests:
            autoscaling["target_ongoing_requests"] = args.target_ongoing_requests
        low, high = autoscaling.get("min_replicas", 1), autoscaling.get("max_replicas", 1)
        if high < low:
            raise ValueError(f"--max-replicas ({high}) must be >= --min-replicas ({low})")
    return config


def _deployment_entry(app: dict[str, Any]) -> dict[str, Any]:
    from neox_ray.serve.deployment import DEPLOYMENT_NAME

    deployments = app.setdefault("deployments", [])
    for entry in deployments:
        if entry.get("name") == DEPLOYMENT_NAME:
            return entry
    entry = {"name": DEPLOYMENT_NAME}
    deployments.append(entry)
    return entry


def run(args: argparse.Namespace) -> int:
    try:
        config = resolve_config(args)
    except (ValueError, OSError) as exc:
        print(f"neox-ray serve: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(config, sort_keys=False), end="")
        return 0

    import ray
    from ray import serve

    from neox_ray.serve.deployment import ServeArgs, build_application

    app = config["applications"][0]
    deployment_options = {k: v for k, v in _deployment_entry(app).items() if k != "name"}
    ray.init(address=args.address or os.environ.get("RAY_ADDRESS"))  # before building: GPUs are looked up
    application = build_application(ServeArgs.model_validate(app["args"]), **deployment_options)
    serve.start(http_options=config["http_options"])
    serve.run(application, name=app.get("name", APP_NAME), route_prefix=app.get("route_prefix", "/"))
    http = config["http_options"]
    print(f"neox-ray: serving {app['args']['model']} at http://{http['host']}:{http['port']}"
          f"{app.get('route_prefix', '/').rstrip('/')}/v1 (Ctrl-C to stop)", flush=True)
    # SIGTERM (`kill`, a container stop, a process manager) stops the application like Ctrl-C does; left to
    # Ray's own handler it printed a SystemExit traceback and skipped serve.shutdown().
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("neox-ray: stopping", flush=True)
        serve.shutdown()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
