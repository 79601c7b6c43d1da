"""GPT-NeoX (Pythia, gpt-neox-20b) composed from neox_ray's tensor-parallel layers.

Parameter names follow transformers' ``GPTNeoXForCausalLM`` so checkpoint keys map 1:1 onto
``named_parameters()``. The forward pass takes a flattened, padding-free batch (token ids and positions of
every sequence's new tokens, concatenated) plus :class:`AttentionMetadata`, and returns hidden states;
:meth:`GPTNeoXForCausalLM.compute_logits` turns only the rows the caller needs into logits.

The model knows nothing of scheduling, sampling or Ray.
"""

from __future__ import annotations

import torch
from torch import nn

from neox_ray.config import ModelConfig
from neox_ray.distributed import all_reduce, tp_world_size
from neox_ray.layers.attention import Attention, AttentionMetadata
from neox_ray.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from neox_ray.layers.linear import ColumnParallelLinear, PackableWeight, RowParallelLinear, divide, sharded_parameter
from neox_ray.layers.rotary import RotaryEmbedding


class LayerNorm(nn.LayerNorm):
    """Replicated on every rank; parameters marked unsharded for the loader."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__(hidden_size, eps=eps)
        self.weight = sharded_parameter((hidden_size,), shard_dim=None)
        self.bias = sharded_parameter((hidden_size,), shard_dim=None)
    # forward is nn.LayerNorm's: its kernels accumulate statistics in float32 for bf16/fp16 inputs.


class GPTNeoXAttention(nn.Module):
    def __init__(self, config: ModelConfig, attention_backend: str, rotary: RotaryEmbedding):
        super().__init__()
        self.num_local_heads = divide(config.num_attention_heads, tp_world_size(), "num_attention_heads")
        self.head_dim = config.head_dim
        self.query_key_value = ColumnParallelLinear(config.hidden_size, 3 * config.hidden_size,
                                                    bias=config.attention_bias, what="3 * hidden_size")
        # Partial sums: the decoder layer does the all-reduce (once, for attention + MLP with parallel residual).
        self.dense = RowParallelLinear(config.hidden_size, config.hidden_size, bias=config.attention_bias,
                                       reduce_results=False, what="hidden_size")
        self.rotary = rotary
        self.attn = Attention(self.num_local_heads, self.head_dim, attention_backend)

    def forward(self, rotary_cos_sin: tuple[torch.Tensor, torch.Tensor], hidden_states: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.query_key_value(hidden_states)
        # Fused rows are laid out (heads, 3, head_dim), not (3, heads, head_dim).
        qkv = qkv.view(-1, self.num_local_heads, 3, self.head_dim)
        query, key, value = self.rotary.split_and_rotate(qkv, rotary_cos_sin)  # each (tokens, local_heads, head_dim)
        context = self.attn(query, key, value, meta)
        return self.dense(context.flatten(1))


class GPTNeoXMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        # The activation belongs to the up projection (fused into its GEMM when the weight is packed).
        self.dense_h_to_4h = ColumnParallelLinear(config.hidden_size, config.intermediate_size,
                                                  what="intermediate_size", activation=config.hidden_act)
        self.dense_4h_to_h = RowParallelLinear(config.intermediate_size, config.hidden_size,
                                               reduce_results=False, what="intermediate_size")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.dense_h_to_4h(hidden_states))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: ModelConfig, attention_backend: str, rotary: RotaryEmbedding):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.attention = GPTNeoXAttention(config, attention_backend, rotary)
        self.mlp = GPTNeoXMLP(config)

    def forward(self, rotary_cos_sin: tuple[torch.Tensor, torch.Tensor], hidden_states: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        attn_partial = self.attention(rotary_cos_sin, self.input_layernorm(hidden_states), meta)
        if self.use_parallel_residual:
            # x + attn(ln1(x)) + mlp(ln2(x)): both partial sums share one all-reduce.
            mlp_partial = self.mlp(self.post_attention_layernorm(hidden_states))
            return hidden_states + all_reduce(attn_partial + mlp_partial)
        attn_output = hidden_states + all_reduce(attn_partial)
        return attn_output + all_reduce(self.mlp(self.post_attention_layernorm(attn_output)))


class GPTNeoXModel(nn.Module):
    def __init__(self, config: ModelConfig, attention_backend: str):
        super().__init__()
        self.embed_in = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.rotary = rotary = RotaryEmbedding(config)
        self.layers = nn.ModuleList(GPTNeoXLayer(config, attention_backend, rotary)
                                    for _ in range(config.num_hidden_layers))
        self.final_layer_norm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        hidden_states = self.embed_in(input_ids)
        rotary_cos_sin = self.rotary(positions, meta.token_sequence_lens)
        for layer in self.layers:
            hidden_states = layer(rotary_cos_sin, hidden_states, meta)
        return self.final_layer_norm(hidden_states)


class GPTNeoXForCausalLM(nn.Module):
    # Buffers some checkpoints carry that are not parameters here (recomputed or implied by causality).
    IGNORED_CHECKPOINT_SUFFIXES = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")

    def __init__(self, config: ModelConfig, attention_backend: str = "sdpa"):
        super().__init__()
        self.config = config
        self.gpt_neox = GPTNeoXModel(config, attention_backend)
        self.embed_out = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.embed_out.weight = self.gpt_neox.embed_in.weight

    @property
    def attention_layers(self) -> list[Attention]:
        return [module for module in self.gpt_neox.modules() if isinstance(module, Attention)]  # layer order

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: (tokens,) -> hidden states (tokens, hidden)."""
        return self.gpt_neox(input_ids, positions, meta)

    def pack_weights_for_cpu(self, quantize_int8: bool = False) -> None:
        """Swaps every linear weight (and the LM head) for a oneDNN-packed copy (layers/cpu_gemm.py), or with
        ``quantize_int8`` an int8 one (layers/cpu_int8.py). A tied LM head keeps its plain weight: the input
        embedding still reads rows from it."""
        for module in self.modules():
            if isinstance(module, PackableWeight):
                release = not (module is self.embed_out and self.config.tie_word_embeddings)
                if quantize_int8:
                    module.quantize_for_cpu(release_original=release)
                else:
                    module.pack_for_cpu(release_original=release)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(rows, hidden) -> (rows, vocab_size) in float32, gathered over tensor-parallel ranks."""
        return self.embed_out(hidden_states).float()
