"""Executors run a :class:`StepInput` on the model's rank(s) and return rank 0's :class:`StepOutput`.

:class:`UniprocExecutor` hosts the single :class:`ModelRunner` in this process (tensor_parallel_size=1).
The Ray shard group executor for tensor_parallel_size > 1 lives in :mod:`neox_ray.ray.shard_group`; the
engine only sees this small protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from neox_ray.config import ModelConfig
from neox_ray.engine.engine_config import EngineConfig
from neox_ray.engine.step import StepInput, StepOutput

if TYPE_CHECKING:
    from neox_ray.engine.model_runner import ModelRunner


class Executor(Protocol):
    num_kv_blocks: int
    prefers_contiguous_kv: bool  # the decode path reads consecutive cache blocks as views (CPU, no kernel)

    def execute(self, step: StepInput) -> StepOutput: ...

    def shutdown(self) -> None: ...


class UniprocExecutor:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int):
        from neox_ray.engine.model_runner import ModelRunner

        self.runner: ModelRunner | None = ModelRunner(config, max_model_len, model_config)
        self.num_kv_blocks = self.runner.num_kv_blocks
        self.prefers_contiguous_kv = self.runner.decode_path == "views"

    def execute(self, step: StepInput) -> StepOutput:
        if self.runner is None:
            raise RuntimeError("the executor was shut down")
        return self.runner.execute(step)

    def shutdown(self) -> None:
        self.runner = None
