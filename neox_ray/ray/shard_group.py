"""A tensor-parallel shard group on Ray: N worker actors, one per GPU, driven as one engine executor.

``LLM(..., tensor_parallel_size=N)`` builds a :class:`RayShardGroupExecutor`. It reserves N bundles in one
``STRICT_PACK`` placement group, sized by :mod:`neox_ray.ray.resources` (one GPU each when the engine runs
on GPUs, none for ``device=cpu`` even on a GPU cluster; ``worker_num_cpus`` CPUs each), starts one
:class:`ShardWorker` per bundle, and joins them in a torch.distributed group (NCCL when the bundles hold
GPUs, gloo otherwise) on a free port chosen by rank 0 at start. Each worker loads only its slices of the checkpoint.

The scheduler runs once, on the driver side (whatever process built the ``LLM``: a script, a Ray Data
actor, a Serve replica). Every step the same :class:`StepInput` goes to all ranks; rank 0's sampled tokens
come back. The enclosing process asks for no GPU itself: the group's bundles hold them, so nothing is
counted twice.

Failure behaviour: placement that cannot be satisfied fails within ``placement_timeout_s`` with a message
(never a silent hang); a worker that dies mid-step makes ``execute`` raise :class:`ShardGroupError` naming
the rank within about a second, and the whole group is torn down so a new ``LLM`` can rebuild it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from neox_ray.config import ModelConfig
from neox_ray.engine.engine_config import EngineConfig
from neox_ray.engine.step import StepInput, StepOutput
from neox_ray.ray.resources import ClusterResources, shard_group_bundles, shard_worker_options, shard_worker_threads

if TYPE_CHECKING:
    from neox_ray.engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)

WORKER_START_TIMEOUT_S = 300.0


class ShardGroupError(RuntimeError):
    """The shard group could not be placed, or one of its workers died."""


class ShardWorker:
    """One rank: joins the tensor-parallel group, loads its shard, runs steps. Hosted as a Ray actor."""

    def __init__(self, rank: int, world_size: int, num_threads: int):
        import torch

        self.rank, self.world_size = rank, world_size
        torch.set_num_threads(max(1, num_threads))
        self.runner: ModelRunner | None = None

    def address(self) -> tuple[str, int]:
        """A free port on this worker's node (called on rank 0 to rendezvous)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, init_method: str, backend: str, config: EngineConfig, max_model_len: int,
              model_config: ModelConfig) -> tuple[int, str]:
        """Joins the group over ``backend`` (nccl when the workers hold GPUs, else gloo); returns this rank's
        KV cache size in blocks and its decode attention path."""
        from neox_ray.distributed import init_tensor_parallel
        from neox_ray.engine.model_runner import ModelRunner

        init_tensor_parallel(self.rank, self.world_size, init_method, backend)
        self.runner = runner = ModelRunner(config, max_model_len, model_config)
        return runner.num_kv_blocks, runner.decode_path

    def execute(self, step: StepInput) -> StepOutput | None:
        assert self.runner is not None, "setup() runs before any step"
        output = self.runner.execute(step)
        return output if self.rank == 0 else None


class RayShardGroupExecutor:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int):
        tp = config.tensor_parallel_size
        if model_config.num_attention_heads % tp:
            raise ValueError(f"num_attention_heads ({model_config.num_attention_heads}) is not divisible by "
                             f"tensor_parallel_size ({tp})")
        if model_config.intermediate_size % tp:
            raise ValueError(f"intermediate_size ({model_config.intermediate_size}) is not divisible by "
                             f"tensor_parallel_size ({tp})")
        if not ray.is_initialized():
            ray.init()
        self.workers: list[Any] = []
        self.placement_group: PlacementGroup | None = None
        try:
            self._start(config, model_config, max_model_len)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int) -> None:
        tp = config.tensor_parallel_size
        cluster = ClusterResources.current()
        bundles = shard_group_bundles(config, cluster)
        total = ray.cluster_resources()
        for resource, amount in bundles[0].items():
            if amount * tp > total.get(resource, 0):
                raise ShardGroupError(
                    f"tensor_parallel_size={tp} needs {amount * tp:g} {resource} in one node "
                    f"({amount:g} per worker) but the whole cluster has {total.get(resource, 0):g}")
        self.placement_group = group = placement_group(bundles, strategy="STRICT_PACK")
        try:
            ray.get(group.ready(), timeout=config.placement_timeout_s)
        except GetTimeoutError:
            raise ShardGroupError(
                f"could not place {tp} workers of {bundles[0]} on one node within {config.placement_timeout_s:g} s "
                f"(cluster resources: {total}, available now: {ray.available_resources()})") from None
        worker_class = ray.remote(ShardWorker)
        options = shard_worker_options(config, cluster)
        threads = shard_worker_threads(config)
        backend = "nccl" if "GPU" in bundles[0] else "gloo"
        for rank in range(tp):
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank)
            self.workers.append(worker_class.options(
                **options, scheduling_strategy=strategy, max_restarts=0, name=None).remote(rank, tp, threads))
        # Worker processes import torch first: allow for slow starts on a busy node.
        host, port = self._gather([self.workers[0].address.remote()], timeout_s=WORKER_START_TIMEOUT_S)[0]
        refs = [w.setup.remote(f"tcp://{host}:{port}", backend, config, max_model_len, model_config)
                for w in self.workers]
        ranks = self._gather(refs, timeout_s=WORKER_START_TIMEOUT_S + 600.0)
        self.num_kv_blocks = min(blocks for blocks, _ in ranks)
        self.prefers_contiguous_kv = any(path == "views" for _, path in ranks)

    def _gather(self, refs: list[Any], timeout_s: float | None = None) -> list[Any]:
        """Waits for every rank; a rank that dies fails the call at once (its peers would block forever
        inside a collective), naming the rank."""
        index = {ref: rank for rank, ref in enumerate(refs)}
        pending = list(refs)
        results: dict[int, Any] = {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in ready:
                rank = index[ref]
                try:
                    results[rank] = ray.get(ref)
                except RayActorError as exc:
                    self.shutdown()
                    raise ShardGroupError(f"tensor-parallel worker rank {rank} died: {exc}") from exc
            if deadline is not None and time.monotonic() > deadline:
                self.shutdown()
                raise ShardGroupError(f"tensor-parallel workers timed out after {timeout_s:g} s")
        return [results[rank] for rank in range(len(refs))]

    def execute(self, step: StepInput) -> StepOutput:
        if not self.workers:
            raise ShardGroupError("the shard group was shut down; build a new LLM to rebuild it")
        step_ref = ray.put(step)
        return self._gather([w.execute.remote(step_ref) for w in self.workers])[0]

    def shutdown(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(Exception):  # already dead
                ray.kill(worker)
        self.workers = []
        if self.placement_group is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(self.placement_group)
            self.placement_group = None
