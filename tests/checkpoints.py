"""Tiny random GPT-NeoX checkpoints written by transformers itself (the real on-disk format), for tests.

transformers is the numerical oracle: tests load the same directory into ``GPTNeoXForCausalLM`` and
into neox_ray and compare.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from neox_ray.demo import train_tiny_tokenizer

TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=256, eos_token_id=0, bos_token_id=0)

# Six+ variants covering the GPT-NeoX surface transformers supports.
VARIANTS: dict[str, dict[str, Any]] = {
    "pythia": dict(rotary_pct=0.25),
    "sequential_full_rotary": dict(use_parallel_residual=False, rotary_pct=1.0),
    "no_bias_tied_theta": dict(attention_bias=False, tie_word_embeddings=True, rotary_emb_base=500.0),
    "head_dim_80_gelu_new": dict(hidden_size=160, num_attention_heads=2, intermediate_size=320,
                                 hidden_act="gelu_new", layer_norm_eps=1e-6, rotary_pct=0.5),
    "linear_scaling": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "dynamic_scaling": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=32),
    "relu_head_dim_32": dict(num_attention_heads=2, hidden_act="relu", rotary_pct=0.5),
}


def build_hf_checkpoint(directory: Path, seed: int = 0, max_shard_size: str | None = None,
                        **overrides: Any) -> Path:
    """Saves a random GPTNeoXForCausalLM with save_pretrained (safetensors) and a tiny BPE tokenizer."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    settings = {**TINY, **overrides}
    config = GPTNeoXConfig(**settings)
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():  # default init gives near-zero layer norms' biases; make every parameter matter
        for name, param in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
            else:
                param.normal_(0.0, 0.08)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    train_tiny_tokenizer(directory, vocab_size=min(400, settings["vocab_size"]))
    return directory


def load_hf_model(directory: Path):
    from transformers import GPTNeoXForCausalLM

    return GPTNeoXForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()


def read_config(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "config.json").read_text())
