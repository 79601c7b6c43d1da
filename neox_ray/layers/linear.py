"""Linear layers sharded over the tensor-parallel group, Megatron style.

Each parameter carries ``shard_dim``: the checkpoint dimension this rank holds a contiguous slice of
(``None`` means replicated). The loader (:mod:`neox_ray.loader`) reads exactly that slice from safetensors,
so no rank ever materializes a full sharded weight. The collective each layer needs is in its ``forward``.

On CPU the model runner may call :meth:`PackableWeight.pack_for_cpu`: the layer then multiplies with a
oneDNN copy of its weight packed once (:mod:`neox_ray.layers.cpu_gemm`) and drops the plain one; with
``quantization="int8"`` it calls :meth:`PackableWeight.quantize_for_cpu` instead: an int8 copy quantized per
output channel of this rank's slice (:mod:`neox_ray.layers.cpu_int8`), exact per-channel under any TP split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neox_ray.distributed import all_reduce, tp_rank, tp_world_size
from neox_ray.layers.activation import get_activation
from neox_ray.layers.cpu_gemm import pack_weight, packed_linear
from neox_ray.layers.cpu_int8 import Int8Weight, int8_linear, pack_int8_weight


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by tensor_parallel_size ({denominator})")
    return numerator // denominator


def sharded_parameter(shape: tuple[int, ...], shard_dim: int | None) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape), requires_grad=False)
    param.shard_dim = shard_dim  # type: ignore[attr-defined]
    return param


class PackableWeight(nn.Module):
    """A layer whose ``weight`` (out_features, in_features) can be swapped for a packed (or int8) CPU copy."""

    weight: nn.Parameter
    packed_weight: torch.Tensor | None = None
    int8_weight: Int8Weight | None = None

    def pack_for_cpu(self, release_original: bool = True) -> None:
        """Packs ``weight`` for oneDNN; with ``release_original`` the plain weight is replaced by an empty
        placeholder (forward only reads the packed copy), so the model's memory does not double."""
        self.packed_weight = pack_weight(self.weight)
        if release_original:
            self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)

    def quantize_for_cpu(self, release_original: bool = True) -> None:
        """Quantizes ``weight`` to int8 per output channel and packs it for oneDNN and/or our int8 kernel
        (:func:`pack_int8_weight`); ``release_original`` as in :meth:`pack_for_cpu` (the int8 copy is a quarter
        of an fp32 weight)."""
        self.int8_weight = pack_int8_weight(self.weight)
        if release_original:
            self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None,
                int8_output_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``int8_output_dtype``: what the int8 GEMM writes (default: ``x``'s dtype); the other paths give x's."""
        if self.int8_weight is not None:
            return int8_linear(x, self.int8_weight, bias, activation, int8_output_dtype)
        if self.packed_weight is not None:
            return packed_linear(x, self.packed_weight, bias, activation)
        out = F.linear(x, self.weight, bias)
        return get_activation(activation)(out) if activation else out


class ColumnParallelLinear(PackableWeight):
    """``y = act(x W^T + b)`` with W's output rows split across ranks; each rank returns its slice of y.

    No collective: the row-parallel layer that follows consumes the sliced activations directly.
    GPT-NeoX's fused ``query_key_value`` rows are laid out (heads, 3, head_dim), so a contiguous row
    split hands every rank whole heads with their q, k and v. ``activation`` (a ``hidden_act`` name, the
    MLP's up projection) is elementwise, so applying it to a slice is exact; packed, it is fused.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, what: str = "out_features",
                 activation: str | None = None):
        super().__init__()
        self.out_features_per_rank = divide(out_features, tp_world_size(), what)
        self.weight = sharded_parameter((self.out_features_per_rank, in_features), shard_dim=0)
        self.bias = sharded_parameter((self.out_features_per_rank,), shard_dim=0) if bias else None
        if activation is not None:
            get_activation(activation)  # unknown names fail at construction, not at the first forward
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.bias, self.activation)


class RowParallelLinear(PackableWeight):
    """``y = x W^T + b`` with W's input columns split across ranks; each rank's product is a partial sum.

    With ``reduce_results=True`` the partial sums are all-reduced here. With ``False`` the caller reduces
    (GPT-NeoX's parallel residual sums attention and MLP partials first: one all-reduce per layer);
    the bias is then added by rank 0 only, so the later sum still counts it once.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, reduce_results: bool = True,
                 what: str = "in_features"):
        super().__init__()
        self.reduce_results = reduce_results
        self.weight = sharded_parameter((out_features, divide(in_features, tp_world_size(), what)), shard_dim=1)
        self.bias = sharded_parameter((out_features,), shard_dim=None) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias_here = self.bias if tp_rank() == 0 else None
        if self.reduce_results:
            return all_reduce(self._linear(x, None)) + (self.bias if self.bias is not None else 0)
        return self._linear(x, bias_here)
