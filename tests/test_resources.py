"""The one resource policy (neox_ray.ray.resources) without Ray, and the one max_model_len default on every
surface: ``LLM``, the batch job's preflight and the server's ``/v1/models`` agree on the same checkpoint."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from checkpoints import VARIANTS, build_hf_checkpoint

from neox_ray.engine.engine_config import EngineConfig
from neox_ray.ray.resources import (
    MIN_ENGINE_ACTOR_NUM_CPUS,
    BatchResourcePlan,
    ClusterResources,
    engine_actor_options,
    shard_group_bundles,
    shard_worker_options,
    size_engine_actor_cpus,
)

NO_GPU = ClusterResources(cpus=2, gpus=0)
WITH_GPUS = ClusterResources(cpus=16, gpus=8)


def engine(**kwargs) -> EngineConfig:
    return EngineConfig.from_kwargs("/m", **kwargs)


def test_cpu_engine_reserves_no_gpu_even_on_a_gpu_cluster() -> None:
    for tp in (1, 2, 4):
        config = engine(device="cpu", tensor_parallel_size=tp)
        assert engine_actor_options(config, WITH_GPUS)["num_gpus"] == 0
        bundles = shard_group_bundles(config, WITH_GPUS)
        assert len(bundles) == tp and all("GPU" not in b for b in bundles)
        assert shard_worker_options(config, WITH_GPUS)["num_gpus"] == 0


def test_int8_is_a_cpu_mode_auto_device_reserves_no_gpu() -> None:
    config = engine(quantization="int8")  # device auto
    assert config.device == "cpu"
    assert engine_actor_options(config, WITH_GPUS)["num_gpus"] == 0
    assert all("GPU" not in b for b in shard_group_bundles(engine(quantization="int8", tensor_parallel_size=2),
                                                          WITH_GPUS))
    with pytest.raises(ValueError, match="CPU only"):
        engine(quantization="int8", device="cuda")


def test_gpu_engine_reserves_gpus_where_the_model_runs() -> None:
    auto, cuda = engine(), engine(device="cuda")
    assert engine_actor_options(auto, WITH_GPUS) == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert engine_actor_options(auto, NO_GPU)["num_gpus"] == 0  # auto on a CPU cluster: CPU engine
    assert engine_actor_options(cuda, NO_GPU)["num_gpus"] == 1  # asked for: the fit check reports it
    sharded = engine(tensor_parallel_size=4)
    assert engine_actor_options(sharded, WITH_GPUS)["num_gpus"] == 0  # the bundles hold them
    assert shard_group_bundles(sharded, WITH_GPUS) == [{"CPU": 0.5, "GPU": 1.0}] * 4
    assert shard_group_bundles(engine(tensor_parallel_size=2, worker_num_gpus=0.5), WITH_GPUS)[0]["GPU"] == 0.5


def test_explicit_values_win_and_idle_gpus_are_refused() -> None:
    options = engine_actor_options(engine(device="cpu"), NO_GPU, num_cpus=3.0, cpu_engine_num_cpus=0.5)
    assert options == {"num_cpus": 3.0, "num_gpus": 0.0}
    assert engine_actor_options(engine(device="cpu"), NO_GPU, cpu_engine_num_cpus=0.5)["num_cpus"] == 0.5
    assert engine_actor_options(engine(), WITH_GPUS, num_gpus=0)["num_gpus"] == 0
    with pytest.raises(ValueError, match="device=cpu would hold GPUs"):
        engine_actor_options(engine(device="cpu"), WITH_GPUS, num_gpus=1)
    with pytest.raises(ValueError, match="placement group holds the GPUs"):
        engine_actor_options(engine(tensor_parallel_size=2), WITH_GPUS, num_gpus=1)
    with pytest.raises(ValueError, match="worker_num_gpus=1 with device=cpu"):
        shard_group_bundles(engine(device="cpu", tensor_parallel_size=2, worker_num_gpus=1.0), WITH_GPUS)


def test_sizing_leaves_room_for_the_cpu_tasks() -> None:
    assert size_engine_actor_cpus(2, 2, 0.25) == 0.75          # (2 - 2 x 0.25) / 2
    assert size_engine_actor_cpus(8, 1, 0.25) == 7.5
    assert size_engine_actor_cpus(8, 2, 0.25, shard_worker_cpus=1.0) == 2.75  # minus each replica's workers
    assert size_engine_actor_cpus(2, 64, 0.25) == MIN_ENGINE_ACTOR_NUM_CPUS


def test_default_plan_fits_a_local_ray_and_explicit_misfits_name_the_resource() -> None:
    plan = BatchResourcePlan.build(engine(device="cpu"), NO_GPU, replicas=2, num_cpus=None, num_gpus=None,
                                   cpu_task_num_cpus=0.25, size_to_cluster=True)
    assert plan.actor_options == {"num_cpus": 0.75, "num_gpus": 0.0} and plan.shortfall(NO_GPU) is None
    too_many = BatchResourcePlan.build(engine(device="cpu"), NO_GPU, replicas=3, num_cpus=1.0, num_gpus=None,
                                       cpu_task_num_cpus=0.25, size_to_cluster=True)
    assert too_many.shortfall(NO_GPU) == ("3 engine replicas x 1 CPU + 0.25 CPU for the read/write tasks need "
                                          "3.25 CPUs; the Ray cluster has 2")
    gpu = BatchResourcePlan.build(engine(), NO_GPU, replicas=1, num_cpus=None, num_gpus=1.0,
                                  cpu_task_num_cpus=0.25, size_to_cluster=True)
    assert gpu.shortfall(NO_GPU) == "1 engine replica x 1 GPU needs 1 GPU; the Ray cluster has 0"
    sharded = BatchResourcePlan.build(engine(device="cpu", tensor_parallel_size=2), NO_GPU, replicas=2,
                                      num_cpus=0.5, num_gpus=None, cpu_task_num_cpus=0.25, size_to_cluster=True)
    assert sharded.needed("CPU") == 2 * (0.5 + 2 * 0.5) + 0.25 and sharded.needed("GPU") == 0
    assert "2 engine replicas x (0.5 CPU + 2 shard workers x 0.5 CPU)" in (sharded.shortfall(NO_GPU) or "")
    # Not started by the job: unset CPUs keep the fixed default, whatever the cluster looks like now.
    remote = BatchResourcePlan.build(engine(device="cpu"), NO_GPU, replicas=2, num_cpus=None, num_gpus=None,
                                     cpu_task_num_cpus=0.25, size_to_cluster=False)
    assert remote.actor_options["num_cpus"] == 1.0


def test_max_model_len_agrees_across_llm_batch_and_server(tmp_path: Path) -> None:
    from neox_ray.batch.config import validate_job_config
    from neox_ray.batch.runner import preflight
    from neox_ray.engine.async_engine import AsyncLLMEngine
    from neox_ray.llm import LLM
    from neox_ray.serve.server import OpenAIServer, ServerSettings

    # Linear rope scaling x2 over 256 positions: the model's default context (512) is not max_position_embeddings.
    checkpoint = build_hf_checkpoint(tmp_path / "linear", **VARIANTS["linear_scaling"])
    pq.write_table(pa.table({"prompt": ["a b c"]}), tmp_path / "in.parquet")
    for explicit, expected in ((None, 512), (100, 100)):
        engine_options = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 64,
                          **({"max_model_len": explicit} if explicit else {})}
        job = validate_job_config("generate", {"model": str(checkpoint), "input": str(tmp_path / "in.parquet"),
                                               "output": str(tmp_path / "out"), "engine": engine_options})
        llm = LLM(str(checkpoint), **engine_options)
        async_engine = AsyncLLMEngine(llm.engine)
        try:
            served = OpenAIServer(async_engine, ServerSettings(served_model_name="m")).models().data[0].max_model_len
        finally:
            async_engine.shutdown()
        assert preflight(job).max_model_len == llm.engine.max_model_len == served == expected


def test_batch_check_fails_on_our_ray_and_waits_on_a_cluster_that_may_grow(
        tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from neox_ray.batch import runner
    from neox_ray.batch.config import validate_job_config

    monkeypatch.setattr(runner.ClusterResources, "current", classmethod(lambda cls: NO_GPU))
    job = validate_job_config("generate", {
        "model": str(tiny_checkpoint), "input": str(tmp_path / "in.parquet"), "output": str(tmp_path / "out"),
        "engine": {"device": "cpu"}, "replicas": {"num_replicas": 3, "num_cpus": 1.0}, "progress_interval_s": 0.1})
    with pytest.raises(runner.JobError, match=r"^3 engine replicas x 1 CPU .* need 3.25 CPUs; the Ray cluster has 2$"):
        runner.check_resources(job, runner.resource_plan(job, started_ray=True), started_ray=True, log=print)
    lines: list[str] = []
    notice = runner.check_resources(job, runner.resource_plan(job, started_ray=False), started_ray=False,
                                    log=lines.append)
    assert notice is not None
    try:
        time.sleep(0.35)
    finally:
        notice.stop()
    assert len(lines) >= 2
    assert all(line.startswith("waiting for resources: 3 engine replicas x 1 CPU") for line in lines)
    one = validate_job_config("generate", {**job.model_dump(), "replicas": {"num_replicas": 1}})
    quiet: list[str] = []
    notice = runner.check_resources(one, runner.resource_plan(one, started_ray=False), started_ray=False,
                                    log=quiet.append)
    assert notice is not None
    notice.stop()
    assert quiet == []  # 1 x 1 CPU + 0.25 fits: nothing to wait for
    two = validate_job_config("generate", {**job.model_dump(), "replicas": {"num_replicas": 2}})
    sized = runner.resource_plan(two, started_ray=True)  # on our own Ray, unset CPUs are sized to fit
    assert sized.actor_options["num_cpus"] == 0.75
    assert runner.check_resources(two, sized, started_ray=True, log=print) is None
