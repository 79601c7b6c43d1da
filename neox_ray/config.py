"""Typed model configuration, parsed and validated once from a HuggingFace ``config.json``.

Accepts both GPT-NeoX config styles: old Pythia (``rotary_pct``, ``rotary_emb_base``, ``rope_scaling``)
and transformers 5 (``rope_parameters`` with ``rope_theta``, ``partial_rotary_factor``, ``rope_type``).
Anything this package does not implement (another ``model_type``, an unknown rope type or activation)
raises :class:`ConfigError` here, at load time, so nothing downstream computes silently wrong numbers.

Engine settings (block size, batch limits, ...) live in :mod:`neox_ray.engine.engine_config`; this module
only describes the network.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A checkpoint's config.json describes something neox-ray cannot run (or runs differently)."""


SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic")
# transformers' ACT2FN names that GPT-NeoX checkpoints use; see neox_ray.layers.activation.
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu", "swish", "quick_gelu")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    rope_type: str = "default"
    factor: float = 1.0  # linear / dynamic scaling factor


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 2048
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    bos_token_id: int | None = 0
    eos_token_ids: tuple[int, ...] = (0,)
    torch_dtype: str | None = None  # the checkpoint's dtype, used by dtype="auto"

    # Derived once, never recomputed by callers.
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope.partial_rotary_factor)

    @property
    def default_max_model_len(self) -> int:
        """Scaled rope exists to stretch the context: linear / dynamic allow ``factor`` times the positions."""
        if self.rope.rope_type in ("linear", "dynamic"):
            return int(self.max_position_embeddings * self.rope.factor)
        return self.max_position_embeddings

    def resolve_max_model_len(self, requested: int | None) -> int:
        """The context length every surface uses (``LLMEngine``, the batch preflight, the server's
        ``/v1/models``): the engine's ``max_model_len`` when set, else :attr:`default_max_model_len`."""
        return requested if requested is not None else self.default_max_model_len

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"config.json: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"config.json: hidden_act {self.hidden_act!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
        if self.rope.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"config.json: rope type {self.rope.rope_type!r} is not supported by neox-ray "
                              f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        if not 0.0 < self.rope.partial_rotary_factor <= 1.0:
            raise ConfigError("config.json: partial_rotary_factor / rotary_pct must be in (0, 1], "
                              f"got {self.rope.partial_rotary_factor}")
        if self.rotary_dim % 2:
            raise ConfigError(f"config.json: rotary dims {self.rotary_dim} (head_dim * rotary_pct) must be even")
        if self.rope.rope_type != "default" and self.rope.factor <= 0:
            raise ConfigError(f"config.json: rope scaling factor must be > 0, got {self.rope.factor}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type != "gpt_neox":
            raise ConfigError(f"config.json: model_type {model_type!r} is not supported; neox-ray runs 'gpt_neox' "
                              "checkpoints (Pythia, gpt-neox-20b)")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
                   if k not in raw]
        if missing:
            raise ConfigError(f"config.json: missing required field(s) {', '.join(missing)}")
        hidden_size = raw["hidden_size"]
        eos = raw.get("eos_token_id", 0)
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=hidden_size,
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            intermediate_size=raw.get("intermediate_size", 4 * hidden_size if isinstance(hidden_size, int) else 0),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            hidden_act=raw.get("hidden_act", "gelu"),
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-5)),
            use_parallel_residual=bool(raw.get("use_parallel_residual", True)),
            attention_bias=bool(raw.get("attention_bias", True)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            rope=_parse_rope(raw),
            bos_token_id=raw.get("bos_token_id", 0),
            eos_token_ids=eos_ids,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in checkpoint directory {model_dir} (looked for {path})")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(raw)


def _parse_rope(raw: dict[str, Any]) -> RopeConfig:
    """Merges the two config styles. transformers 5 writes ``rope_parameters``; Pythia writes
    ``rotary_pct`` / ``rotary_emb_base`` and optionally ``rope_scaling`` ({"type"|"rope_type", "factor"})."""
    params: dict[str, Any] = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    if scaling and not isinstance(scaling, dict):
        raise ConfigError(f"config.json: rope_scaling must be an object, got {scaling!r}")
    for key, value in scaling.items():
        params.setdefault(key, value)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = params.get("rope_theta", raw.get("rotary_emb_base", raw.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", raw.get("rotary_pct", raw.get("partial_rotary_factor", 0.25)))
    factor = params.get("factor", 1.0)
    if rope_type in ("linear", "dynamic") and "factor" not in params:
        raise ConfigError(f"config.json: rope type {rope_type!r} needs a scaling 'factor'")
    return RopeConfig(theta=float(theta), partial_rotary_factor=float(partial), rope_type=str(rope_type),
                      factor=float(factor))
