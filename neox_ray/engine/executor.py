"""Executors run a :class:`StepInput` on the model's rank(s) and return rank 0's :class:`StepOutput`.

:class:`UniprocExecutor` hosts the single :class:`ModelRunner` in this process (tensor_parallel_size=1).
The Ray shard group executor for tensor_parallel_size > 1 lives in :mod:`neox_ray.ray.shard_group`; the
engine only sees this small protocol.
"""

from __future__ import annotations

from typing import Protocol

from neox_ray.config import ModelConfig
from neox_ray.engine.engine_config import EngineConfig
from neox_ray.engine.step import StepInput, StepOutput


class Executor(Protocol):
    num_kv_blocks: int
    prefers_contiguous_kv: bool  # the attention path reads consecutive cache blocks as views (CPU)

    def execute(self, step: StepInput) -> StepOutput: ...

    def shutdown(self) -> None: ...


def runner_config_for(config: EngineConfig, max_model_len: int):
    from neox_ray.engine.model_runner import RunnerConfig

    return RunnerConfig(
        model_dir=config.model, dtype=config.dtype, device=config.device,
        attention_backend=config.attention_backend, block_size=config.block_size,
        num_kv_blocks=config.num_kv_blocks, kv_cache_memory=config.kv_cache_memory,
        gpu_memory_utilization=config.gpu_memory_utilization,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_cache_tokens_hint=min(config.max_num_seqs * max_model_len, 1 << 17),
        allow_pickle=config.allow_pickle, seed=config.seed)


class UniprocExecutor:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int):
        from neox_ray.engine.model_runner import ModelRunner

        self.runner = ModelRunner(runner_config_for(config, max_model_len), model_config)
        self.num_kv_blocks = self.runner.num_kv_blocks
        self.prefers_contiguous_kv = self.runner.device.type == "cpu"

    def execute(self, step: StepInput) -> StepOutput:
        return self.runner.execute(step)

    def shutdown(self) -> None:
        self.runner = None
