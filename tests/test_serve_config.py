"""The endpoint's configuration surface without a cluster: the Serve config file, ``neox-ray serve`` flag
resolution, replica resources, API-key loading and the error shape."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from neox_ray.serve.auth import APIKeyChecker, load_api_keys
from neox_ray.serve.cli import add_parser, resolve_config
from neox_ray.serve.deployment import DEPLOYMENT_NAME, ServeArgs, replica_actor_options
from neox_ray.serve.errors import APIError, param_from_message

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "serve.yaml"
GPU_AUTOSCALING_CONFIG = CONFIG.with_name("serve-gpu-autoscaling.yaml")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


@pytest.mark.parametrize("config", [CONFIG, GPU_AUTOSCALING_CONFIG], ids=lambda path: path.name)
def test_serve_yaml_is_a_valid_serve_config_for_our_app(config: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(config.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.http_options.host == "127.0.0.1"
    (app,) = schema.applications
    assert app.import_path == "neox_ray.serve.deployment:build_app"
    from ray.serve._private.utils import import_attr

    from neox_ray.serve.deployment import build_app

    assert import_attr(app.import_path) is build_app
    args = ServeArgs.model_validate(app.args)  # the model settings are exactly what the builder accepts
    args.engine_config()
    (deployment,) = app.deployments
    assert deployment.name == DEPLOYMENT_NAME
    autoscaling = deployment.autoscaling_config
    assert {"min_replicas", "max_replicas", "target_ongoing_requests"} <= set(autoscaling)
    assert deployment.max_ongoing_requests > args.max_queued_requests
    assert deployment.max_queued_requests >= 1 and args.request_timeout_s > 0
    assert schema.http_options.request_timeout_s > args.request_timeout_s


def test_gpu_autoscaling_config_keeps_its_reasoned_relations() -> None:
    """The relations the GPU autoscaling config's header argues for (a replica's batch, its queue, Serve's
    limits, the drain on downscale)."""
    from ray.serve.schema import ServeDeploySchema

    (app,) = ServeDeploySchema.model_validate(yaml.safe_load(GPU_AUTOSCALING_CONFIG.read_text())).applications
    args = ServeArgs.model_validate(app.args)
    engine = args.engine_config()
    (deployment,) = app.deployments
    autoscaling = deployment.autoscaling_config
    assert engine.device == "cuda" and engine.tensor_parallel_size == 1
    assert 1 <= autoscaling["min_replicas"] < autoscaling["max_replicas"]
    assert autoscaling["target_ongoing_requests"] <= engine.max_num_seqs < args.max_queued_requests
    assert args.max_queued_requests < deployment.max_ongoing_requests
    assert autoscaling["upscale_delay_s"] < autoscaling["downscale_delay_s"]
    assert deployment.graceful_shutdown_timeout_s >= args.request_timeout_s


def test_cli_flags_override_the_config_file() -> None:
    config = resolve_config(_parse(["--config", str(CONFIG), "--model", "/ckpt/x", "--port", "9001",
                                    "--min-replicas", "2", "--max-replicas", "5", "--tensor-parallel-size", "2",
                                    "--api-key-env", "MY_KEYS"]))
    app = config["applications"][0]
    assert config["http_options"]["port"] == 9001 and config["http_options"]["host"] == "127.0.0.1"
    assert app["args"]["model"] == "/ckpt/x" and app["args"]["api_key_env"] == "MY_KEYS"
    assert app["args"]["engine"]["tensor_parallel_size"] == 2
    assert app["args"]["engine"]["dtype"] == "bfloat16"  # untouched settings come from the file
    (deployment,) = app["deployments"]
    assert deployment["autoscaling_config"]["min_replicas"] == 2
    assert deployment["autoscaling_config"]["max_replicas"] == 5


def test_cli_without_config_binds_localhost_and_fixed_replicas(capsys: pytest.CaptureFixture) -> None:
    from neox_ray.cli import main

    assert main(["serve", "--model", "/ckpt/y", "--num-replicas", "3", "--print-config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000}
    app = config["applications"][0]
    assert app["import_path"] == "neox_ray.serve.deployment:build_app"
    assert app["deployments"] == [{"name": DEPLOYMENT_NAME, "num_replicas": 3}]
    assert main(["serve", "--print-config"]) == 2  # no model anywhere
    with pytest.raises(SystemExit):
        _parse(["--model", "m", "--num-replicas", "2", "--min-replicas", "1"])


def test_replica_resources_follow_the_engine() -> None:
    cpu = replica_actor_options(ServeArgs(model="/m", engine={"device": "cpu"}))
    assert cpu["num_gpus"] == 0 and 0 < cpu["num_cpus"] < 1
    one_gpu = replica_actor_options(ServeArgs(model="/m", engine={"device": "cuda"}))
    assert one_gpu["num_gpus"] == 1
    sharded = replica_actor_options(ServeArgs(model="/m", engine={"device": "cuda", "tensor_parallel_size": 4}))
    assert sharded["num_gpus"] == 0  # the shard group's workers hold the GPUs
    with pytest.raises(TypeError, match="unknown engine option"):
        ServeArgs(model="/m", engine={"tensor_paralel_size": 2}).engine_config()
    with pytest.raises(ValueError):
        ServeArgs(model="/m", max_queued_requests=0)


def test_api_keys_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEOX_RAY_API_KEY", raising=False)
    assert load_api_keys(None, None) == []  # nothing configured: open (with a warning)
    monkeypatch.setenv("NEOX_RAY_API_KEY", "a, b")
    assert load_api_keys(None, None) == ["a", "b"]
    key_file = tmp_path / "keys"
    key_file.write_text("c\n\nd\n")
    monkeypatch.setenv("CUSTOM", "e")
    assert load_api_keys("CUSTOM", str(key_file)) == ["e", "c", "d"]
    with pytest.raises(ValueError, match="MISSING"):
        load_api_keys("MISSING", None)  # named explicitly but unset: refuse to start open
    with pytest.raises(ValueError, match="does not exist"):
        load_api_keys(None, str(tmp_path / "nope"))

    checker = APIKeyChecker(["k1", "k2"])
    checker.check("Bearer k2")
    for header in (None, "", "Bearer", "Bearer k3", "k1", "Basic k1"):
        with pytest.raises(APIError) as info:
            checker.check(header)
        assert info.value.status_code == 401
    APIKeyChecker([]).check(None)


def test_error_shape_and_param_extraction() -> None:
    error = APIError(400, "top_p must be <= 1.0, got 2", param="top_p")
    assert error.body() == {"error": {"message": "top_p must be <= 1.0, got 2", "type": "invalid_request_error",
                                      "param": "top_p", "code": None}}
    known = {"top_p", "min_tokens", "stop"}
    assert param_from_message("top_p must be <= 1.0", known, None) == "top_p"
    assert param_from_message("min_tokens (5) must be <= max_tokens (2)", known, None) == "min_tokens"
    assert param_from_message("stop strings must not be empty", known, None) == "stop"
    assert param_from_message("something else", known, "prompt") == "prompt"


def test_health_fails_when_the_engine_loop_died() -> None:
    from types import SimpleNamespace

    from neox_ray.engine.async_engine import EngineDeadError
    from neox_ray.serve.server import OpenAIServer, ServerSettings

    class DeadEngine:
        engine = SimpleNamespace(tokenizer=None, stats=lambda: {}, max_model_len=8)
        max_queued_requests = None
        num_pending = 0

        def check_health(self) -> None:
            raise EngineDeadError("engine loop died: RuntimeError('boom')")

    server = OpenAIServer(DeadEngine(), ServerSettings(served_model_name="m"))
    with pytest.raises(APIError) as info:
        server.check_health()
    assert info.value.status_code == 503 and info.value.body()["error"]["code"] == "engine_dead"


def test_sigterm_stops_the_served_application_like_ctrl_c(monkeypatch, capsys: pytest.CaptureFixture) -> None:
    """`kill PID` (a container or process manager stopping the server) shuts Serve down and exits 0: before,
    Ray's own handler printed a SystemExit traceback and serve.shutdown() never ran. Ray is stubbed: what is
    tested is the CLI's signal handling around serve.run."""
    import os
    import signal

    import ray
    from ray import serve

    from neox_ray.cli import main
    from neox_ray.serve import cli as serve_cli
    from neox_ray.serve import deployment

    calls: list[str] = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append("init"))
    monkeypatch.setattr(deployment, "build_application", lambda args, **options: "app")
    monkeypatch.setattr(serve, "start", lambda **kwargs: calls.append("start"))
    monkeypatch.setattr(serve, "run", lambda app, **kwargs: calls.append("run"))
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(serve_cli.time, "sleep", lambda seconds: os.kill(os.getpid(), signal.SIGTERM))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["serve", "--model", "/ckpt/y"]) == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert calls == ["init", "start", "run", "shutdown"]
    assert "neox-ray: stopping" in capsys.readouterr().out
