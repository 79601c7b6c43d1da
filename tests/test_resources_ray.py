"""The resource policy on real local Rays of a chosen shape, each started in its own subprocess (the test
session's Ray has 4 CPUs and no GPU; these need 2 CPUs, or a fake GPU that no CUDA stands behind):

- a CPU tensor-parallel group on a Ray that advertises a GPU reserves no GPU and still runs;
- ``neox-ray generate --num-replicas 2`` on a 2-CPU local Ray finishes (CPUs per replica sized to fit);
- an explicit request that cannot fit exits non-zero within seconds with one line naming the resource;
- on a cluster the job did not start (which may grow), a job whose actors cannot be placed yet says so
  every progress interval, and runs once they can.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent

FAKE_GPU_SCRIPT = r"""
import json, sys
import ray

ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, configure_logging=False,
         runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
from neox_ray import LLM, SamplingParams
from neox_ray.engine.engine_config import EngineConfig
from neox_ray.ray.resources import BatchResourcePlan, ClusterResources, shard_group_bundles
from neox_ray.serve.deployment import ServeArgs, replica_actor_options

checkpoint = sys.argv[1]
worker_module = ray.get(ray.remote(num_cpus=0)(lambda: __import__("neox_ray").__file__).remote())
llm = LLM(checkpoint, tensor_parallel_size=2, device="cpu", dtype="float32", block_size=4, worker_num_cpus=0.25,
          placement_timeout_s=30)
bundles = llm.engine.executor.placement_group.bundle_specs
out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
llm.shutdown()
cluster = ClusterResources.current()
cpu_tp = EngineConfig.from_kwargs(checkpoint, device="cpu", tensor_parallel_size=2)
plan = BatchResourcePlan.build(cpu_tp, cluster, replicas=1, num_cpus=None, num_gpus=None, cpu_task_num_cpus=0.25,
                               size_to_cluster=True)
print("REPORT " + json.dumps({
    "cluster": [cluster.cpus, cluster.gpus], "worker_module": worker_module, "bundles": bundles,
    "generated": len(out[0].outputs[0].token_ids),
    "serve_cpu": replica_actor_options(ServeArgs(model=checkpoint, engine={"device": "cpu"})),
    "serve_cpu_tp": replica_actor_options(ServeArgs(model=checkpoint, engine={"device": "cpu",
                                                                             "tensor_parallel_size": 2})),
    "serve_auto": replica_actor_options(ServeArgs(model=checkpoint)),
    "auto_tp_bundles": shard_group_bundles(EngineConfig.from_kwargs(checkpoint, tensor_parallel_size=2), cluster),
    "batch_cpu_tp_gpus": plan.needed("GPU"), "batch_cpu_tp_bundles": plan.worker_bundles}))
ray.shutdown()
"""

BUSY_CLUSTER_SCRIPT = r"""
import json, sys, threading, time
import ray

ray.init(address="local", num_cpus=2, include_dashboard=True, configure_logging=False,
         runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
from neox_ray.batch.config import validate_job_config
from neox_ray.batch.runner import run_job

checkpoint, input_path, output = sys.argv[1:4]
blocker = ray.util.placement_group([{"CPU": 1.5}])  # another tenant: 0.5 CPU stays free
ray.get(blocker.ready(), timeout=30)
config = validate_job_config("generate", {
    "model": checkpoint, "input": input_path, "output": output, "sampling": {"max_tokens": 2},
    "engine": {"device": "cpu", "dtype": "float32", "max_num_seqs": 8},
    "replicas": {"num_replicas": 1, "num_cpus": 1.0, "batch_size": 4}, "progress_interval_s": 0.5})
lines, result = [], {}
thread = threading.Thread(target=lambda: result.update(run_job(config, log=lines.append)), daemon=True)
thread.start()
deadline = time.monotonic() + 60
while time.monotonic() < deadline and not any(line.startswith("waiting for resources") for line in lines):
    time.sleep(0.2)
waiting = [line for line in lines if line.startswith("waiting for resources")]
ray.util.remove_placement_group(blocker)
thread.join(timeout=240)
print("REPORT " + json.dumps({"waiting": waiting[:1], "rows": result.get("rows")}))
ray.shutdown()
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a fresh local Ray
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_cpu_tensor_parallel_group_reserves_no_gpu_on_a_gpu_cluster(tiny_checkpoint: Path) -> None:
    result = subprocess.run([sys.executable, "-c", FAKE_GPU_SCRIPT, str(tiny_checkpoint)], env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))[7:])
    assert report["cluster"] == [2.0, 1.0]
    assert report["worker_module"].startswith(str(REPO))
    assert report["bundles"] == [{"CPU": 0.25}, {"CPU": 0.25}] and report["generated"] == 2
    assert report["serve_cpu"]["num_gpus"] == 0 and report["serve_cpu_tp"]["num_gpus"] == 0
    assert report["batch_cpu_tp_gpus"] == 0 and all("GPU" not in b for b in report["batch_cpu_tp_bundles"])
    # The same cluster with device=auto: the GPU is used, by the replica or by each shard worker.
    assert report["serve_auto"]["num_gpus"] == 1
    assert report["auto_tp_bundles"] == [{"CPU": 0.5, "GPU": 1.0}] * 2


@pytest.fixture(scope="module")
def two_cpu_job(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """A job config for a locally started 2-CPU Ray, 16 short prompts."""
    directory = tmp_path_factory.mktemp("two_cpu")
    pq.write_table(pa.table({"prompt": [f"the quick brown fox {i}" for i in range(16)]}), directory / "in.parquet")
    config = {"model": str(tiny_checkpoint), "input": str(directory / "in.parquet"),
              "engine": {"device": "cpu", "dtype": "float32", "max_num_seqs": 8},
              "sampling": {"max_tokens": 2}, "replicas": {"batch_size": 4, "max_concurrent_batches": 1},
              "ray": {"local_num_cpus": 2}, "rows_per_block": 4, "rows_per_file": 8, "progress_interval_s": 5.0}
    (directory / "job.yaml").write_text(yaml.safe_dump(config))
    return directory


def _generate(job: Path, output: Path, *flags: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neox_ray.cli", "generate", "--config", str(job / "job.yaml"),
                           "--output", str(output), *flags], env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_two_replicas_on_a_two_cpu_local_ray_finish(two_cpu_job: Path, tmp_path: Path) -> None:
    result = _generate(two_cpu_job, tmp_path / "out", "--num-replicas", "2", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    from neox_ray.batch.sink import read_output

    out = read_output(str(tmp_path / "out"))
    assert out.num_rows == 16 and all(e is None for e in out.column("error").to_pylist())


@pytest.mark.parametrize("flags, line", [
    (["--num-replicas", "3", "--num-cpus-per-replica", "1"],
     "error: 3 engine replicas x 1 CPU + 0.25 CPU for the read/write tasks need 3.25 CPUs; the Ray cluster has 2"),
    (["--num-replicas", "1", "--num-cpus-per-replica", "4"],
     "error: 1 engine replica x 4 CPU + 0.25 CPU for the read/write tasks need 4.25 CPUs; the Ray cluster has 2"),
    (["--device", "auto", "--num-gpus-per-replica", "1"],
     "error: 1 engine replica x 1 GPU needs 1 GPU; the Ray cluster has 0"),
])
def test_a_request_that_cannot_fit_fails_fast_naming_the_resource(two_cpu_job: Path, tmp_path: Path,
                                                                    flags: list[str], line: str) -> None:
    start = time.monotonic()
    result = _generate(two_cpu_job, tmp_path / "out", *flags, timeout=60)
    assert time.monotonic() - start < 30
    assert result.returncode == 1
    errors = [text for text in result.stderr.splitlines() if text.startswith("error:")]
    assert errors == [line], result.stderr[-3000:]


def test_pending_actors_on_a_busy_cluster_are_reported_then_run(tiny_checkpoint: Path, tmp_path: Path) -> None:
    pq.write_table(pa.table({"prompt": [f"the quick brown fox {i}" for i in range(8)]}), tmp_path / "in.parquet")
    result = subprocess.run([sys.executable, "-c", BUSY_CLUSTER_SCRIPT, str(tiny_checkpoint),
                             str(tmp_path / "in.parquet"), str(tmp_path / "out")],
                            env=_env(), capture_output=True, text=True, timeout=360)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))[7:])
    assert report["rows"] == 8
    assert report["waiting"] and report["waiting"][0].startswith("waiting for resources: 1 engine actor(s) pending; "
                                                                 "each needs 1 CPU; free now: "), report
