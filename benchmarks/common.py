"""Shared benchmark plumbing: a cached random-weight checkpoint of a Pythia shape, workloads, timing.

Both sides of every benchmark load the *same* checkpoint directory, so the comparison is the engine,
not the weights. Weights are random (no model hub here); token ids are drawn directly.
"""

from __future__ import annotations

import argparse
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


def add_model_arguments(parser: argparse.ArgumentParser, shape: str) -> None:
    """The options every engine benchmark takes: which random-weight shape, where, in what dtype, on how
    many threads."""
    parser.add_argument("--shape", default=shape)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)


def prepare_model(args: argparse.Namespace) -> Path:
    """Sets torch's threads and returns the checkpoint for ``add_model_arguments``' options (float32 weights
    on CPU, where the engine casts at load; the benchmark dtype on GPU)."""
    torch.set_num_threads(args.threads)
    return checkpoint(args.shape, dtype=torch.float32 if args.device == "cpu" else getattr(torch, args.dtype))


def workload(num_prompts: int, prompt_len: tuple[int, int], max_tokens: tuple[int, int], vocab: int = 50000,
             seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(10, vocab) for _ in range(rng.randint(*prompt_len))], rng.randint(*max_tokens))
            for _ in range(num_prompts)]


def hf_generate_batch(model, batch: list[tuple[list[int], int]], device: str = "cpu", **options) -> int:
    """One batch through transformers ``generate`` as its users run it: left padded, every row to the batch's
    longest ``max_tokens`` (``options`` add e.g. sampling). Returns the batch's useful (requested) tokens."""
    width = max(len(prompt) for prompt, _ in batch)
    ids = torch.tensor([[0] * (width - len(prompt)) + prompt for prompt, _ in batch], device=device)
    mask = torch.tensor([[0] * (width - len(prompt)) + [1] * len(prompt) for prompt, _ in batch], device=device)
    longest = max(max_tokens for _, max_tokens in batch)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                             pad_token_id=0, **options)
    assert out.shape[1] == width + longest, "every row must run to the batch's longest max_tokens"
    return sum(max_tokens for _, max_tokens in batch)


@contextmanager
def timed(label: str, results: dict[str, float]):
    start = time.perf_counter()
    yield
    results[label] = time.perf_counter() - start
    print(f"  {label}: {results[label]:.1f} s", flush=True)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_physical_limits(device: str, dtype: torch.dtype, repeats: int = 5) -> dict[str, float]:
    """The two ceilings, measured here: dense matmul FLOP/s in ``dtype`` (4096^3 on GPU, 2048^3 on CPU,
    random data; on CPU the faster of MKL's ``torch.mm`` and oneDNN with a packed weight) and memory bandwidth
    (a large copy; bytes read + written). Medians of ``repeats``."""
    size = 4096 if device.startswith("cuda") else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    src = torch.randn(64 * 1024 * 1024 // 4 * 4, device=device)  # 256 MiB of fp32
    dst = torch.empty_like(src)

    def median_time(fn) -> float:
        fn()
        _synchronize(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            _synchronize(device)
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    matmul_s = median_time(lambda: torch.mm(a, b))
    if device == "cpu":  # the engine multiplies through oneDNN with packed weights: count the faster of the two
        from neox_ray.layers.cpu_gemm import pack_weight, packed_linear, packing_supported

        if packing_supported(dtype):
            packed = pack_weight(b)
            matmul_s = min(matmul_s, median_time(lambda: packed_linear(a, packed, None)))
    copy_s = median_time(lambda: dst.copy_(src))
    return {"matmul_flops": 2 * size ** 3 / matmul_s, "bandwidth_bytes": 2 * src.numel() * 4 / copy_s}


def parameter_counts(model_dir: Path) -> dict[str, int]:
    """Matmul parameters of a GPT-NeoX checkpoint: all decoder layers, and the LM head."""
    import json

    config = json.loads((model_dir / "config.json").read_text())
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    per_layer = 4 * hidden * hidden + 2 * hidden * config.get("intermediate_size", 4 * hidden)
    return {"layers": config["num_hidden_layers"] * per_layer, "lm_head": vocab * hidden}
