"""Shared benchmark plumbing: a cached random-weight checkpoint of a Pythia shape, workloads, timing.

Both sides of every benchmark load the *same* checkpoint directory, so the comparison is the engine,
not the weights. Weights are random (no model hub here); token ids are drawn directly.
"""

from __future__ import annotations

import os
import random
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from neox_ray.demo import create_demo_checkpoint

REAL_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt-neox-20b-tokenizer.json"


def checkpoint(shape: str, root: str | None = None, dtype: torch.dtype = torch.float32) -> Path:
    root_dir = Path(root or os.environ.get("NEOX_RAY_BENCH_DIR", Path.home() / ".cache" / "neox-ray-bench"))
    directory = root_dir / f"{shape}-{str(dtype).removeprefix('torch.')}"
    if not (directory / "model.safetensors").exists():
        tokenizer = REAL_TOKENIZER if REAL_TOKENIZER.exists() else None
        create_demo_checkpoint(directory, shape=shape, seed=0, tokenizer_json=tokenizer, dtype=dtype)
    return directory


def workload(num_prompts: int, prompt_len: tuple[int, int], max_tokens: tuple[int, int], vocab: int = 50000,
             seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(10, vocab) for _ in range(rng.randint(*prompt_len))], rng.randint(*max_tokens))
            for _ in range(num_prompts)]


@contextmanager
def timed(label: str, results: dict[str, float]):
    start = time.perf_counter()
    yield
    results[label] = time.perf_counter() - start
    print(f"  {label}: {results[label]:.1f} s", flush=True)
