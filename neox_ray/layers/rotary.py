"""Rotary position embedding over the first ``rotary_dim`` dims of each head (GPT-NeoX "rotate half").

Scaling types: ``default``; ``linear`` (frequencies divided by the factor); ``dynamic`` NTK, where a
sequence longer than ``max_position_embeddings`` rotates its new tokens with a base stretched for the
sequence's current length. That is decided per sequence, not per batch, so a request's numbers never
depend on what else is batched with it (for a lone sequence it equals transformers).
"""

from __future__ import annotations

import torch
from torch import nn

from neox_ray.config import ModelConfig
from neox_ray.kernels import cpu_rotary


def _inverse_frequencies(base: float | torch.Tensor, rotary_dim: int) -> torch.Tensor:
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    if isinstance(base, torch.Tensor):  # one base per token: (tokens, rotary_dim / 2)
        return 1.0 / (base.unsqueeze(-1) ** exponents)
    return 1.0 / (base ** exponents)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.rotary_dim = config.rotary_dim
        self.rope = config.rope
        self.max_position_embeddings = config.max_position_embeddings
        self.register_buffer("inv_freq", self._base_inverse_frequencies(), persistent=False)

    def _base_inverse_frequencies(self) -> torch.Tensor:
        inv_freq = _inverse_frequencies(self.rope.theta, self.rotary_dim)
        return inv_freq / self.rope.factor if self.rope.rope_type == "linear" else inv_freq

    def materialize(self, device: torch.device) -> None:
        """Recomputes the frequency buffer after construction on the meta device."""
        self.inv_freq = self._base_inverse_frequencies().to(device)

    def _angles(self, positions: torch.Tensor, sequence_lengths: torch.Tensor | None) -> torch.Tensor:
        positions = positions.float()
        if self.rope.rope_type == "dynamic" and sequence_lengths is not None:
            seq_len = sequence_lengths.float().clamp(min=self.max_position_embeddings)
            factor, max_pos, dim = self.rope.factor, self.max_position_embeddings, self.rotary_dim
            base = self.rope.theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
            stretched = sequence_lengths > self.max_position_embeddings
            inv_freq = torch.where(stretched.unsqueeze(-1), _inverse_frequencies(base, dim).to(positions.device),
                                   self.inv_freq.float().unsqueeze(0))
            return positions.unsqueeze(-1) * inv_freq
        return positions.unsqueeze(-1) * self.inv_freq.float()

    def forward(self, positions: torch.Tensor, sequence_lengths: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (tokens,); sequence_lengths: (tokens,) the length of each token's sequence after this
        step (used by dynamic scaling only). Returns cos, sin: (tokens, 1, rotary_dim), computed once per
        forward pass and shared by every layer."""
        angles = self._angles(positions, sequence_lengths)  # (tokens, rotary_dim / 2)
        angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)
        return angles.cos(), angles.sin()

    def split_and_rotate(self, qkv: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv: (tokens, heads, 3, head_dim), a fused projection's rows -> contiguous (tokens, heads, head_dim)
        query and key, rotated, and value. One C pass on CPU when the kernel is built, else torch ops."""
        fused = cpu_rotary.rotate_split(qkv, *cos_sin, self.rotary_dim)
        if fused is not None:
            return fused
        query, key, value = qkv.unbind(dim=2)
        query, key = self.rotate_query_key(query, key, cos_sin)
        return query, key.contiguous(), value.contiguous()

    def rotate_query_key(self, query: torch.Tensor, key: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """query/key: (tokens, heads, head_dim), rotated on their first rotary_dim dims."""
        cos, sin = cos_sin
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, passthrough = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        half = self.rotary_dim // 2
        rotated_half = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        if x.dtype == torch.float32:
            rot = rot * cos + rotated_half * sin
        else:  # rotate in float32, store in the model dtype
            rot = (rot.float() * cos + rotated_half.float() * sin).to(x.dtype)
        return torch.cat((rot, passthrough), dim=-1)
