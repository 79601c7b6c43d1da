"""``cluster/`` stays deployable without a cluster: the KubeRay manifests validate against the CRDs'
``openAPIV3Schema`` (from ``../shared/kuberay-crds``; skipped when that folder is absent), job entrypoints
name scripts and configs that exist and validate, the RayService embeds ``configs/serve.yaml``, and the
manifests, the launcher config and the Dockerfile agree on the image layout and the Ray version.

What the schema check covers is what the API server checks from the schema: types, required fields, enums,
patterns (resource quantities) and unknown fields, which the API server prunes (or, with strict field
validation, rejects) and which here fail. It does not evaluate the CRDs' CEL rules
(``x-kubernetes-validations``; the manifests use none of the fields that carry them), nor the operator's
own checks at reconcile time. No Docker, Kubernetes or network is needed.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER_CONFIG = CLUSTER / "launcher" / "aws-gpu.yaml"
DOCKERFILE = REPO / "Dockerfile"
SERVE_CONFIG = REPO / "configs" / "serve.yaml"

IMAGE_APP_DIR = "/opt/neox-ray"  # where the Dockerfile puts the checkout; RayJob entrypoints name files under it
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
GPU = "nvidia.com/gpu"

# The only ways the RayService's serveConfigV2 may differ from configs/serve.yaml (rayservice.yaml's header
# says why): the proxy must listen on the pod IP, and GPU pods join after the head (and autoscale), so
# `device: auto` could see no GPU when the app is deployed and put replicas on CPU.
CLUSTER_SERVE_OVERRIDES: dict[tuple[str | int, ...], Any] = {
    ("http_options", "host"): "0.0.0.0",
    ("applications", 0, "args", "engine", "device"): "cuda",
}

needs_crds = pytest.mark.skipif(not CRD_DIR.is_dir(), reason=f"KubeRay CRDs not found at {CRD_DIR} "
                                "(../shared/kuberay-crds beside the repo)")


# --- loading ---------------------------------------------------------------------------------------------

def _load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@functools.cache
def _manifests() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(file name, document) for every document under cluster/kuberay."""
    return tuple((path.name, doc) for path in sorted(KUBERAY.glob("*.yaml")) for doc in _load_all(path))


def _of_kind(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name, doc in _manifests() if doc.get("kind") == kind]


def _ray_cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    return {"RayCluster": lambda: spec, "RayJob": lambda: spec["rayClusterSpec"],
            "RayService": lambda: spec["rayClusterConfig"]}[doc["kind"]]()


def _groups(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """("head" or the worker group's name, group spec) of a Ray resource's cluster."""
    cluster = _ray_cluster_spec(doc)
    yield "head", cluster["headGroupSpec"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group


def _containers(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(group name, pod spec, container) for every container of a Ray resource's pods."""
    for group_name, group in _groups(doc):
        pod = group["template"]["spec"]
        for container in pod["containers"]:
            yield group_name, pod, container


def _gpus(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get(GPU, 0))


def _dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, f"Dockerfile declares no default for ARG {name}"
    return match.group(1)


# --- CRD schemas -----------------------------------------------------------------------------------------

def _to_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A Kubernetes structural schema as plain JSON Schema (draft 4, which OpenAPI v3.0 schemas follow).

    ``x-kubernetes-int-or-string`` becomes int-or-string (the CRDs already spell it as ``anyOf``; the
    fallback covers a bare marker), ``nullable`` admits null, and an object that lists its properties gets
    ``additionalProperties: false`` unless it says ``x-kubernetes-preserve-unknown-fields``: the API server
    drops unknown fields, so a misspelt field would otherwise pass here and silently do nothing there.
    ``x-kubernetes-validations`` (CEL) are dropped: not evaluated.
    """
    out = {key: value for key, value in schema.items() if not key.startswith("x-kubernetes-") and key != "nullable"}
    if "properties" in schema:
        out["properties"] = {name: _to_json_schema(sub) for name, sub in schema["properties"].items()}
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = _to_json_schema(schema["additionalProperties"])
    if isinstance(schema.get("items"), dict):
        out["items"] = _to_json_schema(schema["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            out[key] = [_to_json_schema(sub) for sub in schema[key]]
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def _crd(kind: str) -> tuple[str, Any]:
    """(apiVersion, validator) of the CRD's storage version: the one the operator reads and writes."""
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (a Ray dependency) is not installed")
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    assert version["served"], f"{kind} storage version {version['name']} is not served"
    schema = _to_json_schema(version["schema"]["openAPIV3Schema"])
    return f"{crd['spec']['group']}/{version['name']}", jsonschema.Draft4Validator(schema)


def _schema_errors(doc: dict[str, Any]) -> list[str]:
    api_version, validator = _crd(doc["kind"])
    errors = []
    if doc.get("apiVersion") != api_version:
        errors.append(f"apiVersion {doc.get('apiVersion')!r} != {api_version!r}")
    for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        path = ".".join(str(part) for part in error.absolute_path) or "<root>"
        errors.append(f"{path}: {error.message[:300]}")
    return errors


def _ray_resource_ids() -> list[str]:
    return [f"{name}:{doc['kind']}" for name, doc in _manifests() if doc.get("kind") in CRD_FILES]


# --- tests -----------------------------------------------------------------------------------------------

def test_every_cluster_yaml_opens_with_a_header_comment() -> None:
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert len(files) >= 7, files
    for path in files:
        first = path.read_text().lstrip().splitlines()[0]
        assert first.startswith("#"), \
            f"{path.relative_to(REPO)} must open with a comment saying what it is and how to apply it"


def test_manifests_cover_the_issue() -> None:
    kinds = [doc.get("kind") for _, doc in _manifests()]
    assert kinds.count("RayCluster") == 1 and kinds.count("RayService") == 1 and "Secret" in kinds
    jobs = {Path(shlex.split(doc["spec"]["entrypoint"])[1]).name for _, doc in _of_kind("RayJob")}
    assert jobs == {"generate.py", "score.py"}
    for name, doc in _manifests():
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]) and \
            len(doc["metadata"]["name"]) <= 63, f"{name}: metadata.name is not a DNS label"


@needs_crds
@pytest.mark.parametrize("index", range(len(_ray_resource_ids())), ids=_ray_resource_ids())
def test_manifest_validates_against_its_crd_schema(index: int) -> None:
    name, doc = [(n, d) for n, d in _manifests() if d.get("kind") in CRD_FILES][index]
    errors = _schema_errors(doc)
    assert not errors, f"{name} ({doc['kind']}) does not validate against its CRD:\n" + "\n".join(errors)


@needs_crds
@pytest.mark.parametrize("breakage, field", [
    (lambda spec: spec.update(shutdownAfterJobFinishes="yes"), "shutdownAfterJobFinishes"),        # wrong type
    (lambda spec: spec.update(ttlSecondAfterFinished=60), "ttlSecondAfterFinished"),               # misspelt field
    (lambda spec: spec["rayClusterSpec"]["headGroupSpec"].pop("template"), "'template' is a required"),
    (lambda spec: spec["rayClusterSpec"]["workerGroupSpecs"][0].update(maxReplicas="1"), "maxReplicas"),
    (lambda spec: spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        ["resources"]["limits"].update(memory="500 GB"), "memory"),                               # bad quantity
    (lambda spec: spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        "num-cpus"),                                                                                # must be a string
], ids=["wrong-type", "unknown-field", "missing-required", "int-as-string", "bad-quantity", "start-param-int"])
def test_schema_check_rejects_a_broken_manifest(breakage: Any, field: str) -> None:
    """The check above is not vacuous: the same RayJob, broken in one place, fails where it was broken."""
    name, original = _of_kind("RayJob")[0]
    assert not _schema_errors(original)
    broken = copy.deepcopy(original)
    breakage(broken["spec"])
    errors = _schema_errors(broken)
    assert errors and any(field in error for error in errors), f"{name} broken at {field} still validates: {errors}"


def test_job_entrypoints_name_existing_scripts_and_valid_configs_that_fit_the_cluster() -> None:
    from neox_ray.batch.cli import build_generate_parser, build_score_parser, overrides_from_args
    from neox_ray.batch.config import load_job_config

    for name, doc in _of_kind("RayJob"):
        spec = doc["spec"]
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0, name
        python, script, *argv = shlex.split(spec["entrypoint"])
        assert python == "python" and script.startswith(f"{IMAGE_APP_DIR}/jobs/"), f"{name}: {spec['entrypoint']}"
        script_path = REPO / Path(script).relative_to(IMAGE_APP_DIR)
        assert script_path.is_file(), f"{name}: {script} is not {script_path.relative_to(REPO)} in the repo"
        kind = script_path.stem
        parser = (build_generate_parser if kind == "generate" else build_score_parser)(argparse.ArgumentParser())
        args, unknown = parser.parse_known_args(argv)
        assert not unknown, f"{name}: {script_path.relative_to(REPO)} has no flag(s) {unknown}"
        assert args.config and args.config.startswith(f"{IMAGE_APP_DIR}/configs/"), f"{name}: --config {args.config}"
        config_path = REPO / Path(args.config).relative_to(IMAGE_APP_DIR)
        assert config_path.is_file(), f"{name}: {args.config} is not {config_path.relative_to(REPO)} in the repo"
        config = load_job_config(kind, config_path, overrides_from_args(kind, args))  # type: ignore[arg-type]

        # The job's engine replicas fit the RayJob's cluster; a shard group (STRICT_PACK) fits one pod.
        tp = config.engine_config.tensor_parallel_size
        gpus_per_replica = tp if tp > 1 else (config.replicas.num_gpus if config.replicas.num_gpus is not None else 1)
        pods = [(group, _gpus(group["template"]["spec"]["containers"][0]))
                for group_name, group in _groups(doc) if group_name != "head"]
        capacity = sum(group["maxReplicas"] * gpus for group, gpus in pods)
        assert config.replicas.pool_bounds[1] * gpus_per_replica <= capacity, \
            f"{name}: {config.replicas.pool_bounds[1]} replicas x {gpus_per_replica} GPUs > {capacity} GPUs"
        assert tp <= max(gpus for _, gpus in pods), f"{name}: TP={tp} does not fit one pod"

        # Every local path of the job is on a volume of every pod (the driver on the head reads the model's
        # config and the input listing; the replicas read the checkpoint and write the output).
        for key in ("model", "input", "output"):
            path = getattr(config, key)
            if "://" in path:
                continue
            for group_name, _, container in _containers(doc):
                mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
                assert any(path.startswith(mount.rstrip("/") + "/") for mount in mounts), \
                    f"{name}: {key} {path} is on no volume of the {group_name} pods ({mounts})"


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(key, "<absent>"), b.get(key, "<absent>"), f"{path}.{key}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=False)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path or '<root>'}: {a!r} -> {b!r}"]


def _set_path(target: Any, path: tuple[str | int, ...], value: Any) -> None:
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def test_rayservice_serves_configs_serve_yaml() -> None:
    (name, service), = _of_kind("RayService")
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    expected = yaml.safe_load(SERVE_CONFIG.read_text())
    for path, value in CLUSTER_SERVE_OVERRIDES.items():
        _set_path(expected, path, value)
    drift = _differences(expected, embedded)
    assert not drift, (f"{name}: serveConfigV2 has drifted from configs/serve.yaml beyond CLUSTER_SERVE_OVERRIDES "
                       "(path: serve.yaml with overrides -> serveConfigV2):\n" + "\n".join(drift))

    from ray.serve.schema import ServeDeploySchema

    from neox_ray.serve.deployment import DEPLOYMENT_NAME, ServeArgs

    schema = ServeDeploySchema.model_validate(embedded)
    (app,) = schema.applications
    args = ServeArgs.model_validate(app.args)
    engine = args.engine_config()
    (deployment,) = [d for d in app.deployments if d.name == DEPLOYMENT_NAME]
    max_replicas = (deployment.autoscaling_config or {}).get("max_replicas") or deployment.num_replicas

    workers = [(group, _gpus(group["template"]["spec"]["containers"][0]))
               for group_name, group in _groups(service) if group_name != "head"]
    assert sum(group["maxReplicas"] * gpus for group, gpus in workers) >= max_replicas * engine.tensor_parallel_size, \
        f"{name}: the GPU workers cannot hold Serve's max_replicas={max_replicas} x TP={engine.tensor_parallel_size}"
    cluster = _ray_cluster_spec(service)
    assert cluster.get("enableInTreeAutoscaling") is True, f"{name}: Serve autoscaling needs Ray's autoscaler"
    for group_name, _, container in _containers(service):
        env = {e["name"]: e for e in container.get("env", [])}
        assert args.api_key_env in env, f"{name}: {group_name} pods lack {args.api_key_env}"
        assert not env[args.api_key_env]["valueFrom"]["secretKeyRef"].get("optional", False), \
            f"{name}: the endpoint's API-key Secret must be required, not optional"
        mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
        assert any(args.model.startswith(mount.rstrip("/") + "/") for mount in mounts), \
            f"{name}: model {args.model} is on no volume of the {group_name} pods"


def test_secret_and_claim_references_resolve() -> None:
    secrets = {(doc["metadata"]["name"], key) for _, doc in _of_kind("Secret")
               for key in {**doc.get("data", {}), **doc.get("stringData", {})}}
    claims = {doc["metadata"]["name"] for _, doc in _of_kind("PersistentVolumeClaim")}
    for name, doc in _manifests():
        if doc.get("kind") not in CRD_FILES:
            continue
        for group_name, pod, container in _containers(doc):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert (ref["name"], ref["key"]) in secrets, f"{name}/{group_name}: no Secret {ref}"
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{name}/{group_name}: mount of undeclared volume {mount['name']}"
            for volume in volumes.values():
                claim = volume.get("persistentVolumeClaim")
                if claim:
                    assert claim["claimName"] in claims, f"{name}/{group_name}: no PersistentVolumeClaim {claim}"


def test_gpu_pods_request_gpus_and_tolerate_gpu_taints() -> None:
    for name, doc in _manifests():
        if doc.get("kind") not in CRD_FILES:
            continue
        assert any(_gpus(c) for _, _, c in _containers(doc)), f"{name}: no pod holds a GPU"
        for group_name, pod, container in _containers(doc):
            resources = container.get("resources", {})
            if group_name == "head":
                assert not _gpus(container), f"{name}: the head holds a GPU"
                continue
            assert _gpus(container) >= 1, f"{name}/{group_name}: a worker group without GPUs"
            assert resources["requests"].get(GPU) == resources["limits"][GPU], f"{name}/{group_name}"
            assert any(t.get("key") == GPU for t in pod.get("tolerations", [])), \
                f"{name}/{group_name}: no toleration for the {GPU} taint GPU node pools carry"


def test_manifests_launcher_and_dockerfile_agree() -> None:
    ray_version = _dockerfile_arg("RAY_VERSION")
    images = set()
    for name, doc in _manifests():
        if doc.get("kind") in CRD_FILES:
            assert _ray_cluster_spec(doc)["rayVersion"] == ray_version, \
                f"{name}: rayVersion != the Dockerfile's RAY_VERSION {ray_version}"
            images |= {container["image"] for _, _, container in _containers(doc)}
    assert len(images) == 1, f"the manifests name several images: {images}"
    dockerfile = DOCKERFILE.read_text()
    assert f"COPY . {IMAGE_APP_DIR}" in dockerfile, f"the Dockerfile must put the checkout in {IMAGE_APP_DIR}"
    assert re.search(r"^USER (?!root|0\b)", dockerfile, re.MULTILINE), "the image must run as a non-root user"
    admitted = (REPO / ".dockerignore").read_text().split()
    for needed in ("!neox_ray/", "!jobs/", "!configs/", "!pyproject.toml"):
        assert needed in admitted, f".dockerignore must admit {needed[1:]}"

    launcher = yaml.safe_load(LAUNCHER_CONFIG.read_text())
    assert launcher["docker"]["image"] == f"pytorch/pytorch:{_dockerfile_arg('PYTORCH_TAG')}-devel"
    setup = "\n".join(launcher["setup_commands"])
    assert f'"ray[default,data,serve]=={ray_version}"' in setup
    assert f'"flash-attn=={_dockerfile_arg("FLASH_ATTN_VERSION")}"' in setup
    ((remote, local),) = launcher["file_mounts"].items()
    assert local == "." and f"pip install -q -e {remote}" in setup, "the launcher must install the synced checkout"


def test_launcher_config_validates_against_rays_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (a Ray dependency) is not installed")
    ray = pytest.importorskip("ray")
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    if not schema_path.is_file():
        pytest.skip(f"this Ray ({ray.__version__}) ships no autoscaler/ray-schema.json")
    validator = jsonschema.Draft7Validator(json.loads(schema_path.read_text()))
    config = yaml.safe_load(LAUNCHER_CONFIG.read_text())
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(config)]
    assert not errors, "\n".join(errors)
    assert config["head_node_type"] in config["available_node_types"]
    gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu_types and all(t["min_workers"] == 0 for t in gpu_types), "GPU workers should scale from zero"
    broken = {**config, "setup_comands": config["setup_commands"]}  # the schema rejects unknown keys
    assert any(not e.absolute_path for e in validator.iter_errors(broken))
