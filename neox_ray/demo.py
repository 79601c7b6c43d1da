"""Random-weight GPT-NeoX checkpoints in the HuggingFace on-disk format, made with runtime dependencies only.

Used by the quick start, the benchmarks and tests where no real weights exist (no model hub here). The
weights are random: generated text is gibberish, but shapes, memory and speed are those of the named
Pythia size. The tokenizer is either a tiny byte-level BPE trained on the spot or a ``tokenizer.json``
the caller points to (e.g. the real GPT-NeoX tokenizer).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

DEMO_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Ray Data reads prompts from Parquet and writes generations back.",
    "GPT-NeoX models use rotary embeddings and parallel residual blocks.",
    "A naïve café owner served crème brûlée in Zürich and São Paulo.",
    "日本語のテキストを少し書きます。 Emoji: 🙂🚀",
    "def add(a, b):\n    return a + b",
    "Numbers like 3.14159 and 2718 appear often in scientific text.",
    "Once upon a time, in a cluster far away, many GPUs generated text together.",
] * 8

# Pythia shapes (hidden, layers, heads); intermediate is 4 * hidden, vocab 50304 (padded beyond the tokenizer).
PYTHIA_SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=512),
    "pythia-70m": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, vocab_size=50304),
    "pythia-160m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, vocab_size=50304),
    "pythia-410m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, vocab_size=50304),
    "pythia-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=8, vocab_size=50304),
    "pythia-1.4b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, vocab_size=50304),
}


def train_tiny_tokenizer(directory: str | Path, vocab_size: int = 400) -> Path:
    """Trains a small byte-level BPE (specials <|endoftext|>=0, <|padding|>=1) into directory/tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(DEMO_SENTENCES, trainer=trainer)
    path = directory / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def create_demo_checkpoint(directory: str | Path, shape: str = "tiny", seed: int = 0,
                           tokenizer_json: str | Path | None = None, dtype: torch.dtype = torch.float32,
                           max_position_embeddings: int = 2048) -> Path:
    """Writes config.json, model.safetensors (random weights) and tokenizer.json for a Pythia-shaped model."""
    from safetensors.torch import save_file

    if shape not in PYTHIA_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(PYTHIA_SHAPES)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dims = PYTHIA_SHAPES[shape]
    hidden, vocab = dims["hidden_size"], dims["vocab_size"]
    config: dict[str, Any] = {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", **dims,
        "intermediate_size": 4 * hidden, "max_position_embeddings": max_position_embeddings,
        "hidden_act": "gelu", "rotary_pct": 0.25, "rotary_emb_base": 10000, "layer_norm_eps": 1e-5,
        "use_parallel_residual": True, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0,
        "torch_dtype": str(dtype).removeprefix("torch."), "neox_ray_note": "RANDOM WEIGHTS (demo checkpoint)",
    }
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape_: int) -> torch.Tensor:
        return (torch.randn(*shape_, generator=generator) * 0.02).to(dtype)

    tensors = {"gpt_neox.embed_in.weight": normal(vocab, hidden), "embed_out.weight": normal(vocab, hidden),
               "gpt_neox.final_layer_norm.weight": torch.ones(hidden, dtype=dtype),
               "gpt_neox.final_layer_norm.bias": torch.zeros(hidden, dtype=dtype)}
    for i in range(dims["num_hidden_layers"]):
        prefix = f"gpt_neox.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[prefix + norm + ".weight"] = torch.ones(hidden, dtype=dtype)
            tensors[prefix + norm + ".bias"] = torch.zeros(hidden, dtype=dtype)
        for name, (rows, cols) in {"attention.query_key_value": (3 * hidden, hidden),
                                   "attention.dense": (hidden, hidden),
                                   "mlp.dense_h_to_4h": (4 * hidden, hidden),
                                   "mlp.dense_4h_to_h": (hidden, 4 * hidden)}.items():
            tensors[prefix + name + ".weight"] = normal(rows, cols)
            tensors[prefix + name + ".bias"] = normal(rows)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_json is not None:
        shutil.copyfile(tokenizer_json, directory / "tokenizer.json")
    else:
        train_tiny_tokenizer(directory, vocab_size=min(400, vocab))
    return directory
