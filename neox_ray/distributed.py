"""Tensor-parallel process-group state and the few collectives the sharded layers call.

This module knows torch.distributed and nothing of Ray: whoever starts the worker processes (the Ray shard
group in :mod:`neox_ray.ray.shard_group`, or a test) calls :func:`init_tensor_parallel` once per process.
With a world size of 1 every collective is the identity, so TP=1 runs the same layer classes with no
communication and no process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class TensorParallelState:
    rank: int = 0
    world_size: int = 1


_STATE = TensorParallelState()


def init_tensor_parallel(rank: int, world_size: int, init_method: str, backend: str = "gloo",
                         timeout_s: float = 120.0) -> None:
    """Joins this process to the tensor-parallel group (``init_method`` like ``tcp://127.0.0.1:29511``)."""
    if world_size > 1:
        dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
    _STATE.rank, _STATE.world_size = rank, world_size


def tp_rank() -> int:
    return _STATE.rank


def tp_world_size() -> int:
    return _STATE.world_size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sums ``x`` over the tensor-parallel ranks, in place."""
    if _STATE.world_size > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenates every rank's ``x`` along the last dimension (rank order)."""
    if _STATE.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_STATE.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)
