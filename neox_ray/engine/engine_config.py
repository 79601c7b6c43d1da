"""``EngineConfig``: engine settings, one strict typed model validated once, with messages that name the field.

Pure Python. ``LLM(model, **kwargs)``, the Serve application's ``engine:`` mapping and the batch job's
``engine:`` mapping all validate through :meth:`EngineConfig.from_kwargs`. Fields tagged ``flag`` become
``--kebab-name`` options of the batch and serve commands (:func:`flag_fields`), with the description as help.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, model_validator

from neox_ray.engine.schema import FieldSpec, StrictSettings, field_specs, setting

FLAG = "flag"  # a command-line option of ``neox-ray generate|score|serve``

DType = Literal["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"]
AttentionBackend = Literal["auto", "sdpa", "flash_attn", "eager"]
Quantization = Literal["none", "int8"]
KVCacheDType = Literal["auto", "int8"]


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _known_device(device: str) -> str:
    if not _DEVICE.fullmatch(device):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return device


def check_int8_device(device: str, setting: str = "quantization int8") -> None:
    """Also called by the model runner once ``auto`` has become a real device."""
    if device.startswith("cuda"):
        raise ValueError(f"{setting} runs on CPU only for now (device is {device!r}); use device=cpu")


class EngineConfig(StrictSettings):
    model: str = setting(min_length=1, description="checkpoint directory or hub id (ORG/NAME, or ORG/NAME@REVISION)")
    revision: str | None = setting(None, min_length=1, tags=[FLAG],
                                   description="hub revision of the model: branch (e.g. step1000), tag or commit sha")
    dtype: DType = setting("auto", tags=[FLAG], description="weights and activations dtype")
    device: Annotated[str, AfterValidator(_known_device)] = setting("auto", tags=[FLAG],
                                                                    description="auto, cpu, cuda or cuda:N")
    attention_backend: AttentionBackend = setting("auto", tags=[FLAG], description="attention implementation")
    quantization: Quantization | None = setting(
        None, tags=[FLAG], description="int8: int8 weights (a scale per output channel) and activations quantized "
                                       "at each matmul, CPU only; activations between layers keep dtype (default off)")
    kv_cache_dtype: KVCacheDType = setting(
        "auto", tags=[FLAG], description="auto: the model's dtype; int8: keys and values stored as int8 with a scale "
                                         "per token and head (half a bfloat16 cache's bytes, a quarter of float32's; "
                                         "CPU only)")
    max_num_seqs: int = setting(128, ge=1, tags=[FLAG], description="most sequences in one engine step")
    max_num_batched_tokens: int = setting(2048, ge=1, description="most tokens in one engine step")
    block_size: int = setting(16, ge=1, description="tokens per KV-cache block")
    num_kv_blocks: int | None = setting(None, ge=1, description="KV-cache blocks per rank (default: from memory)")
    kv_cache_memory: int | None = setting(
        None, ge=1, description="KV-cache bytes per rank (default: GPU, what profiling leaves free; CPU, room "
                                "for max_num_seqs x max_model_len tokens up to 128k, 4 GiB and half the free memory)")
    gpu_memory_utilization: float = setting(0.9, gt=0.0, le=1.0, allow_inf_nan=False,
                                            description="share of GPU memory the engine may fill")
    enable_prefix_caching: bool = setting(True, description="reuse cached blocks of shared prompt prefixes")
    async_scheduling: bool = setting(
        False, tags=[FLAG], description="run each forward pass on a worker thread while the previous step's "
                                        "tokens are detokenized, stop-checked and returned (off by default: on a "
                                        "CPU whose cores all run the forward pass's threads it was 18-36% slower)")
    max_model_len: int | None = setting(None, ge=1, tags=[FLAG],
                                        description="context length (default: the model's max_position_embeddings)")
    tensor_parallel_size: int = setting(1, ge=1, tags=[FLAG], description="GPUs (shard-group workers) per engine")
    allow_pickle: bool = setting(False, description="allow loading pickled (.bin) checkpoints")
    seed: int | None = setting(None, ge=0, le=2**64 - 1,
                               description="seeds the generator of requests that bring no seed")
    # Ray shard group (tensor_parallel_size > 1) settings.
    worker_num_cpus: float = setting(0.5, ge=0.0, allow_inf_nan=False, description="CPUs per shard-group worker")
    worker_num_gpus: float | None = setting(None, ge=0.0, allow_inf_nan=False,
                                            description="GPUs per shard-group worker (default: 1 with CUDA, else 0)")
    placement_timeout_s: float = setting(60.0, gt=0.0, allow_inf_nan=False,
                                         description="seconds to wait for the shard group's placement group")

    @model_validator(mode="after")
    def _one_kv_cache_size(self) -> EngineConfig:
        if self.num_kv_blocks is not None and self.kv_cache_memory is not None:
            raise ValueError("give num_kv_blocks or kv_cache_memory, not both")
        return self

    @model_validator(mode="after")
    def _quantization_fits(self) -> EngineConfig:
        if self.quantization == "int8":
            check_int8_device(self.device)
            if self.device == "auto":  # int8 is a CPU mode: auto means the CPU (and no GPU is reserved for it)
                self.device = "cpu"
            if self.dtype in ("float16", "fp16"):
                raise ValueError(f"quantization int8 takes dtype float32 or bfloat16 activations, not {self.dtype}")
        return self

    @model_validator(mode="after")
    def _kv_cache_dtype_fits(self) -> EngineConfig:
        if self.kv_cache_dtype == "int8":
            check_int8_device(self.device, "kv_cache_dtype int8")
            if self.attention_backend == "flash_attn":
                raise ValueError("kv_cache_dtype int8 is read by the CPU attention paths; attention_backend "
                                 "flash_attn needs a cache in the model's dtype")
            if self.device == "auto":  # an int8 cache is a CPU mode: auto means the CPU
                self.device = "cpu"
        return self

    @property
    def int8(self) -> bool:
        return self.quantization == "int8"

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> EngineConfig:
        """Raises TypeError naming unknown options, :class:`SettingsError` (ValueError) for bad values."""
        unknown = sorted(set(kwargs) - set(cls.model_fields))
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(model=model, **kwargs)


def flag_fields() -> list[FieldSpec]:
    """The engine settings that the batch and serve commands take as flags."""
    return field_specs(EngineConfig, FLAG)
