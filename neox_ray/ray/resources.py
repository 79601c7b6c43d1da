"""The one resource policy: engine settings + what the Ray cluster has -> what each Ray process reserves.

Three kinds of process host the engine, and all of them ask this module what to reserve:

- the process that owns one ``LLM`` (a Ray Data engine actor of a batch job, a Serve replica):
  :func:`engine_actor_options`;
- the workers of a tensor-parallel shard group (``tensor_parallel_size > 1``): :func:`shard_worker_resources`,
  :func:`shard_group_bundles`, :func:`shard_worker_options`;
- a whole batch job (actor pool + its CPU tasks), checked against the cluster before the pool starts:
  :class:`BatchResourcePlan`, with :func:`size_engine_actor_cpus` sizing the default CPUs per actor to a
  locally started Ray.

The rules, in one place:

- The engine uses a GPU when ``device`` is ``cuda*``, never when it is ``cpu``, and with ``auto`` when the
  cluster has GPUs.
- With ``tensor_parallel_size > 1`` the shard group's bundles hold the GPUs (one per worker unless
  ``worker_num_gpus`` says otherwise); the process that owns the ``LLM`` only schedules and holds none, so
  nothing is counted twice. A CPU group (``device=cpu``) reserves no GPU, even on a GPU cluster.
- GPUs asked for explicitly while the engine runs on CPU are a configuration error (they would sit idle).

Pure Python, no torch: Ray is imported only by :meth:`ClusterResources.current`. Starting actors, placement
groups and waiting for them stays with the callers (:mod:`neox_ray.ray.shard_group`,
:mod:`neox_ray.batch.runner`, :mod:`neox_ray.serve.deployment`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# A Serve replica driving a CPU engine (or only scheduling for a shard group) shares the node with others.
SERVE_CPU_REPLICA_NUM_CPUS = 0.5
# A replica feeding one GPU needs a whole core for scheduling, tokenization and the HTTP side.
GPU_ENGINE_ACTOR_NUM_CPUS = 1.0
# A batch engine actor on a cluster we did not start (we cannot see what it will grow to).
BATCH_ENGINE_ACTOR_NUM_CPUS = 1.0
# The fewest CPUs a batch engine actor is sized to on a local Ray, however many replicas share it.
MIN_ENGINE_ACTOR_NUM_CPUS = 0.1
# Read/prepare and commit tasks running next to the actor pool when sizing the default: one of each, so
# reading the next block overlaps committing the last. The fit check itself needs only one (progress).
CPU_TASKS_RESERVED_WHEN_SIZING = 2


class EngineResourceSettings(Protocol):
    """The engine settings this policy reads (``EngineConfig`` has them all; read by attribute only)."""

    @property
    def device(self) -> str: ...

    @property
    def tensor_parallel_size(self) -> int: ...

    @property
    def worker_num_cpus(self) -> float: ...

    @property
    def worker_num_gpus(self) -> float | None: ...


@dataclass(frozen=True)
class ClusterResources:
    """What the Ray cluster holds in total (not what is free now)."""

    cpus: float = 0.0
    gpus: float = 0.0

    @classmethod
    def current(cls) -> ClusterResources:
        """The connected cluster's totals; empty (no GPUs) when Ray is not initialized."""
        import ray

        if not ray.is_initialized():
            return cls()
        total = ray.cluster_resources()
        return cls(cpus=float(total.get("CPU", 0.0)), gpus=float(total.get("GPU", 0.0)))


def engine_uses_gpu(engine: EngineResourceSettings, cluster: ClusterResources) -> bool:
    if engine.device == "cpu":
        return False
    if engine.device.startswith("cuda"):
        return True
    return cluster.gpus > 0  # "auto"


def shard_worker_resources(engine: EngineResourceSettings, cluster: ClusterResources) -> dict[str, float]:
    """One shard-group worker's placement-group bundle, in Ray's resource names (``CPU``, ``GPU``)."""
    gpus = engine.worker_num_gpus
    if gpus is None:
        gpus = 1.0 if engine_uses_gpu(engine, cluster) else 0.0
    elif gpus > 0 and engine.device == "cpu":
        raise ValueError(f"worker_num_gpus={gpus:g} with device=cpu would hold GPUs the engine never uses")
    bundle = {"CPU": float(engine.worker_num_cpus)}
    if gpus:
        bundle["GPU"] = float(gpus)
    return bundle


def shard_group_bundles(engine: EngineResourceSettings, cluster: ClusterResources) -> list[dict[str, float]]:
    """The ``STRICT_PACK`` placement group of a tensor-parallel group: one bundle per rank."""
    return [shard_worker_resources(engine, cluster) for _ in range(engine.tensor_parallel_size)]


def shard_worker_options(engine: EngineResourceSettings, cluster: ClusterResources) -> dict[str, float]:
    """``num_cpus`` / ``num_gpus`` of a worker actor, equal to its bundle (it must fit inside it)."""
    bundle = shard_worker_resources(engine, cluster)
    return {"num_cpus": bundle["CPU"], "num_gpus": bundle.get("GPU", 0.0)}


def shard_worker_threads(engine: EngineResourceSettings) -> int:
    """torch threads per worker: its whole reserved CPUs, at least one."""
    return max(1, int(engine.worker_num_cpus))


def engine_actor_gpus(engine: EngineResourceSettings, cluster: ClusterResources,
                      num_gpus: float | None = None) -> float:
    """GPUs of the process that owns one ``LLM``; ``num_gpus`` is what the user asked for (None: decide)."""
    if num_gpus is not None and num_gpus > 0:
        if engine.device == "cpu":
            raise ValueError(f"num_gpus={num_gpus:g} with device=cpu would hold GPUs the engine never uses")
        if engine.tensor_parallel_size > 1:
            raise ValueError(f"num_gpus must be 0 (or unset) with tensor_parallel_size={engine.tensor_parallel_size}:"
                             " the shard group's placement group holds the GPUs")
        return float(num_gpus)
    if num_gpus is not None or engine.tensor_parallel_size > 1:
        return 0.0
    return 1.0 if engine_uses_gpu(engine, cluster) else 0.0


def engine_actor_options(engine: EngineResourceSettings, cluster: ClusterResources, *,
                         num_cpus: float | None = None, num_gpus: float | None = None,
                         cpu_engine_num_cpus: float = BATCH_ENGINE_ACTOR_NUM_CPUS) -> dict[str, float]:
    """``num_cpus`` / ``num_gpus`` of a Ray Data engine actor or Serve replica (the process owning one ``LLM``).

    Explicit values win. Otherwise: one GPU and :data:`GPU_ENGINE_ACTOR_NUM_CPUS` when the engine runs on a
    GPU in this process; ``cpu_engine_num_cpus`` when it runs on CPU or only schedules for a shard group.
    """
    gpus = engine_actor_gpus(engine, cluster, num_gpus)
    if num_cpus is None:
        num_cpus = GPU_ENGINE_ACTOR_NUM_CPUS if gpus else cpu_engine_num_cpus
    return {"num_cpus": float(num_cpus), "num_gpus": gpus}


def size_engine_actor_cpus(cluster_cpus: float, replicas: int, cpu_task_num_cpus: float,
                           shard_worker_cpus: float = 0.0) -> float:
    """Default CPUs per batch engine actor on a Ray we started: the machine shared among the replicas after
    room for the read/prepare and commit tasks (and each replica's shard workers), at least
    :data:`MIN_ENGINE_ACTOR_NUM_CPUS`. ``shard_worker_cpus``: the CPUs of one replica's shard workers."""
    free = cluster_cpus - CPU_TASKS_RESERVED_WHEN_SIZING * cpu_task_num_cpus
    per_replica = free / max(replicas, 1) - shard_worker_cpus
    return round(max(MIN_ENGINE_ACTOR_NUM_CPUS, per_replica), 4)  # Ray keeps 4 decimals of a resource


@dataclass(frozen=True)
class BatchResourcePlan:
    """What a batch job reserves: ``replicas`` engine actors (each maybe with a shard group) + CPU tasks."""

    replicas: int
    actor_options: dict[str, float]
    worker_bundles: list[dict[str, float]]  # one replica's shard group (empty with tensor_parallel_size 1)
    cpu_task_num_cpus: float

    @classmethod
    def build(cls, engine: EngineResourceSettings, cluster: ClusterResources, *, replicas: int,
              num_cpus: float | None, num_gpus: float | None, cpu_task_num_cpus: float,
              size_to_cluster: bool) -> BatchResourcePlan:
        """``size_to_cluster``: the job started this Ray, so unset CPUs per actor are fitted to it."""
        bundles = shard_group_bundles(engine, cluster) if engine.tensor_parallel_size > 1 else []
        if num_cpus is None and size_to_cluster:
            num_cpus = size_engine_actor_cpus(cluster.cpus, replicas, cpu_task_num_cpus,
                                              sum(b["CPU"] for b in bundles))
        options = engine_actor_options(engine, cluster, num_cpus=num_cpus, num_gpus=num_gpus)
        return cls(replicas, options, bundles, cpu_task_num_cpus)

    def _per_replica(self, resource: str) -> float:
        own = self.actor_options["num_cpus" if resource == "CPU" else "num_gpus"]
        return own + sum(bundle.get(resource, 0.0) for bundle in self.worker_bundles)

    def needed(self, resource: str) -> float:
        tasks = self.cpu_task_num_cpus if resource == "CPU" else 0.0
        return self.replicas * self._per_replica(resource) + tasks

    def _describe(self, resource: str) -> str:
        replicas = f"{self.replicas} engine replica{'s' if self.replicas != 1 else ''}"
        own = self.actor_options["num_cpus" if resource == "CPU" else "num_gpus"]
        per = f"{own:g} {resource}"
        if self.worker_bundles:
            per = (f"({own:g} {resource} + {len(self.worker_bundles)} shard workers x "
                   f"{self.worker_bundles[0].get(resource, 0.0):g} {resource})")
        text = f"{replicas} x {per}"
        if resource == "CPU" and self.cpu_task_num_cpus:
            text += f" + {self.cpu_task_num_cpus:g} CPU for the read/write tasks"
        verb = "need" if self.replicas != 1 or " + " in text else "needs"
        needed = self.needed(resource)
        return f"{text} {verb} {needed:g} {resource}{'s' if needed != 1 else ''}"

    def shortfall(self, cluster: ClusterResources) -> str | None:
        """One line naming the first resource (GPUs, then CPUs) the cluster has too little of, else None."""
        for resource, has in (("GPU", cluster.gpus), ("CPU", cluster.cpus)):
            if self.needed(resource) > has + 1e-9:
                return f"{self._describe(resource)}; the Ray cluster has {has:g}"
        return None
