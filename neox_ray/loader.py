"""Builds a model on the meta device and fills it from a HuggingFace checkpoint directory, slice by slice.

Supported layouts: ``model.safetensors``; sharded ``model-0000x-of-0000y.safetensors`` with
``model.safetensors.index.json``; pickle ``pytorch_model*.bin`` only when the caller opts in
(``allow_pickle=True``, then read with ``torch.load(weights_only=True)``).

Each parameter says which checkpoint dimension this rank holds a slice of (``shard_dim``, set by the
layers in :mod:`neox_ray.layers.linear`); the loader reads only that slice through safetensors'
``get_slice``, converts it to the target dtype on the target device, and assigns it. No full copy of a
sharded weight ever exists on a rank, and no second copy of the model is made.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neox_ray.config import ModelConfig
from neox_ray.distributed import tp_rank, tp_world_size
from neox_ray.layers.rotary import RotaryEmbedding
from neox_ray.models.gpt_neox import GPTNeoXForCausalLM

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "float": torch.float32, "half": torch.float16}


class CheckpointError(ValueError):
    """The checkpoint directory is missing something, or holds tensors that do not fit the config."""


def resolve_dtype(requested: str | torch.dtype, config: ModelConfig, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA (fp16 Pythia overflows in attention); on CPU the checkpoint's dtype, except
    float16, which becomes float32 (CPU half kernels are slow and overflow-prone).

    Even on a CPU with native bfloat16 (AVX512-BF16, AMX), ``auto`` stays float32 for float32 and float16
    checkpoints: scores then match transformers/lm-eval in float32 to ~1e-5, and results do not depend on
    the host's instruction set (benchmarks/README.md, "Precision and dtype=auto", has the measured drift and
    speed). bfloat16 and int8 are one option away; a log line says so once."""
    if isinstance(requested, torch.dtype):
        return requested
    if requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        saved = DTYPES.get(str(config.torch_dtype), torch.float32)
        resolved = torch.float32 if saved == torch.float16 else saved
        if resolved == torch.float32:
            _suggest_bfloat16_once()
        return resolved
    try:
        return DTYPES[requested]
    except KeyError:
        raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {requested!r}") from None


@functools.cache
def _suggest_bfloat16_once() -> None:
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    if native:
        logger.info("dtype=auto runs float32 on CPU; this CPU has native bfloat16: dtype='bfloat16' (or "
                    "quantization='int8') is several times faster at ~3e-3 nats of logprob drift")


class _TensorSource:
    """Uniform ``(name) -> sliceable`` access over safetensors files or an opted-in pickle checkpoint."""

    def __init__(self, model_dir: Path, allow_pickle: bool):
        self.model_dir = model_dir
        self._handles: dict[str, Any] = {}
        self.name_to_file: dict[str, str] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        safetensors_index = model_dir / "model.safetensors.index.json"
        single = model_dir / "model.safetensors"
        if safetensors_index.is_file():
            self._index_files(safetensors_index, self._open_safetensors)
        elif single.is_file():
            self._open_safetensors(single.name)
        else:
            self._load_pickle(allow_pickle)

    def _index_files(self, index_path: Path, open_file) -> None:
        try:
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index_path} is not a valid index (no weight_map): {exc}") from exc
        for file_name in sorted(set(weight_map.values())):
            if not (self.model_dir / file_name).is_file():
                raise CheckpointError(f"checkpoint shard {file_name} listed in {index_path.name} is missing "
                                      f"from {self.model_dir}")
            open_file(file_name)

    def _open_safetensors(self, file_name: str) -> None:
        from safetensors import safe_open

        try:
            handle = safe_open(str(self.model_dir / file_name), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"cannot read {self.model_dir / file_name}: {exc}") from exc
        self._handles[file_name] = handle
        self.name_to_file.update(dict.fromkeys(handle.keys(), file_name))

    def _load_pickle(self, allow_pickle: bool) -> None:
        index = self.model_dir / "pytorch_model.bin.index.json"
        single = self.model_dir / "pytorch_model.bin"
        if not index.is_file() and not single.is_file():
            raise CheckpointError(f"no weights in {self.model_dir}: expected model.safetensors, or "
                                  "model.safetensors.index.json with its shards")
        if not allow_pickle:
            found = index.name if index.is_file() else single.name
            raise CheckpointError(
                f"{self.model_dir} holds only a pickle checkpoint ({found}); pickle can run arbitrary code on "
                "load, so neox-ray refuses it unless you opt in with allow_pickle=True (it is then read with "
                "torch.load(weights_only=True)). Better: convert it to safetensors.")

        def open_pickle(file_name: str) -> None:
            state = torch.load(self.model_dir / file_name, map_location="cpu", weights_only=True, mmap=True)
            for name, tensor in state.items():
                self._pickled[name] = tensor
                self.name_to_file[name] = file_name

        if index.is_file():
            self._index_files(index, open_pickle)
        else:
            open_pickle(single.name)

    def get(self, name: str) -> Any:
        """An object supporting ``get_shape()`` and ``[slices]`` (a safetensors slice, or a tensor)."""
        if name in self._pickled:
            return _TensorSlice(self._pickled[name])
        return self._handles[self.name_to_file[name]].get_slice(name)


class _TensorSlice:
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def get_shape(self) -> list[int]:
        return list(self.tensor.shape)

    def __getitem__(self, item: Any) -> torch.Tensor:
        return self.tensor[item]


def _read_shard(source: _TensorSource, name: str, param: nn.Parameter) -> torch.Tensor:
    """Reads this rank's slice of checkpoint tensor ``name`` for ``param`` (zero-padded past the end)."""
    view = source.get(name)
    full_shape = list(view.get_shape())
    local_shape = list(param.shape)
    shard_dim = getattr(param, "shard_dim", None)
    if shard_dim is None:
        if full_shape != local_shape:
            raise CheckpointError(f"tensor {name}: checkpoint shape {full_shape} does not match the model's "
                                  f"{local_shape} (does config.json match the weights?)")
        return view[:]
    other_full = full_shape[:shard_dim] + full_shape[shard_dim + 1:]
    other_local = local_shape[:shard_dim] + local_shape[shard_dim + 1:]
    if len(full_shape) != len(local_shape) or other_full != other_local:
        raise CheckpointError(f"tensor {name}: checkpoint shape {full_shape} does not match the model's "
                              f"per-rank shape {local_shape} split on dim {shard_dim}")
    shard_size = local_shape[shard_dim]
    world_size = tp_world_size()
    # Vocab shards are ceil(vocab / tp) rows each, the last one padded; everything else splits exactly.
    is_vocab = name.endswith(("embed_in.weight", "embed_out.weight"))
    expected_full = -(-full_shape[shard_dim] // world_size) if is_vocab else full_shape[shard_dim] / world_size
    if expected_full != shard_size:
        raise CheckpointError(f"tensor {name}: checkpoint shape {full_shape} does not match the model's "
                              f"per-rank shape {local_shape} (dim {shard_dim} split over {world_size} ranks; "
                              "does config.json match the weights?)")
    start = tp_rank() * shard_size
    stop = min(start + shard_size, full_shape[shard_dim])
    index = tuple([slice(None)] * shard_dim + [slice(start, max(start, stop))])
    tensor = view[index]
    if tensor.shape[shard_dim] < shard_size:  # the last vocab shard runs past the vocabulary: zero rows
        padding = list(tensor.shape)
        padding[shard_dim] = shard_size - tensor.shape[shard_dim]
        tensor = torch.cat([tensor, torch.zeros(padding, dtype=tensor.dtype)], dim=shard_dim)
    return tensor


def iter_checkpoint_params(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    """(checkpoint name, owning module, attribute, parameter) for every distinct parameter."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue  # tied embeddings: embed_out shares embed_in's tensor
            seen.add(id(param))
            yield (f"{module_name}.{attr}" if module_name else attr), module, attr, param


def load_model(model_dir: str | os.PathLike, config: ModelConfig | None = None, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "cpu", attention_backend: str = "sdpa",
               allow_pickle: bool = False) -> GPTNeoXForCausalLM:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {model_dir} does not exist")
    config = config or ModelConfig.from_pretrained(model_dir)
    device = torch.device(device)
    target_dtype = resolve_dtype(dtype, config, device)
    source = _TensorSource(model_dir, allow_pickle)

    with torch.device("meta"):
        model = GPTNeoXForCausalLM(config, attention_backend)
    expected: set[str] = set()
    for name, module, attr, param in iter_checkpoint_params(model):
        checkpoint_name = name
        if name not in source.name_to_file and name == "embed_out.weight" and config.tie_word_embeddings:
            checkpoint_name = "gpt_neox.embed_in.weight"
        if checkpoint_name not in source.name_to_file:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint in {model_dir}")
        expected.add(checkpoint_name)
        tensor = _read_shard(source, checkpoint_name, param).to(device=device, dtype=target_dtype)
        loaded = nn.Parameter(tensor, requires_grad=False)
        loaded.shard_dim = getattr(param, "shard_dim", None)  # type: ignore[attr-defined]
        setattr(module, attr, loaded)
    if config.tie_word_embeddings:
        model.embed_out.weight = model.gpt_neox.embed_in.weight
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.materialize(device)
    unexpected = [n for n in source.name_to_file if n not in expected
                  and not n.endswith(GPTNeoXForCausalLM.IGNORED_CHECKPOINT_SUFFIXES)]
    if unexpected:
        logger.warning("ignoring %d checkpoint tensors the model does not use, e.g. %s",
                       len(unexpected), unexpected[:3])
    return model.eval()
