"""Vocabulary-parallel input embedding and LM head.

Each rank holds a contiguous block of ``ceil(vocab / tp)`` rows; the last rank's block may run past the
checkpoint's (already padded) vocabulary, and the loader zero-fills the rows beyond it. The embedding
all-reduces (each token's row lives on exactly one rank); the LM head all-gathers logits for sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neox_ray.distributed import all_gather_last_dim, all_reduce, tp_rank, tp_world_size
from neox_ray.layers.linear import PackableWeight, sharded_parameter


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // tp_world_size())
        self.vocab_start = tp_rank() * self.rows_per_rank
        self.weight = sharded_parameter((self.rows_per_rank, hidden_size), shard_dim=0)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if tp_world_size() == 1:
            return F.embedding(token_ids, self.weight)
        local_ids = token_ids - self.vocab_start
        on_this_rank = (local_ids >= 0) & (local_ids < self.rows_per_rank)
        embedded = F.embedding(local_ids.clamp(0, self.rows_per_rank - 1), self.weight)
        embedded = embedded * on_this_rank.unsqueeze(-1).to(embedded.dtype)
        return all_reduce(embedded)


class ParallelLMHead(VocabParallelEmbedding, PackableWeight):
    """``embed_out``: hidden states -> logits over the full vocabulary (gathered from every rank).
    Packable for CPU like the linear layers (pack it without releasing the weight when it is tied to the
    input embedding, which still looks rows up in it)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (tokens, hidden) -> (tokens, vocab)
        # An int8 head writes float32 logits directly (the sampler and scoring want float32 anyway).
        local_logits = self._linear(hidden_states, None, int8_output_dtype=torch.float32)
        return all_gather_last_dim(local_logits)[..., : self.vocab_size]
