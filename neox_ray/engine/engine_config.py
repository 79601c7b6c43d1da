"""Engine settings, typed and validated once, with messages that name the field. Pure Python."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class EngineConfig:
    model: str
    dtype: str = "auto"
    device: str = "auto"
    attention_backend: str = "auto"
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None        # bytes per rank
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    max_model_len: int | None = None          # default: the model's max_position_embeddings
    tensor_parallel_size: int = 1
    allow_pickle: bool = False
    seed: int | None = None                   # seeds the generator of requests that bring no seed
    # Ray shard group (tensor_parallel_size > 1) settings.
    worker_num_cpus: float = 0.5
    worker_num_gpus: float | None = None      # None: 1 when CUDA is visible to the cluster, else 0
    placement_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a checkpoint directory path, got {self.model!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("num_kv_blocks", "kv_cache_memory", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.num_kv_blocks is not None and self.kv_cache_memory is not None:
            raise ValueError("give num_kv_blocks or kv_cache_memory, not both")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"):
            raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {self.dtype!r}")
        if self.attention_backend not in ("auto", "sdpa", "flash_attn", "eager"):
            raise ValueError("attention_backend must be one of auto, sdpa, flash_attn, eager; "
                             f"got {self.attention_backend!r}")
        if self.worker_num_cpus < 0:
            raise ValueError(f"worker_num_cpus must be >= 0, got {self.worker_num_cpus}")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(model=model, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
