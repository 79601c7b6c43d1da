"""Batch generation throughput: neox-ray's continuous batching vs transformers ``generate``.

Workload (fixed seed): prompts with lengths spread over 16-256 tokens and ``max_tokens`` spread over
16-128, greedy, ignore_eos. Baseline: transformers ``generate`` in batches of ``--hf-batch-size`` with
left padding, each batch run to its longest ``max_tokens`` (what HF users do). Both count only the
*requested* tokens (useful tokens/s). Same random checkpoint, same machine, same run.

    python benchmarks/throughput.py                     # CPU default: pythia-160m shape, fp32, 2 threads
    python benchmarks/throughput.py --device cuda --shape pythia-410m --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_model_arguments,
    hf_generate_batch,
    measure_physical_limits,
    parameter_counts,
    prepare_model,
    timed,
    workload,
)


def run_neox_ray(model_dir: Path, jobs, args) -> int:
    from neox_ray import LLM, SamplingParams

    llm = LLM(str(model_dir), dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, block_size=16)
    prompts = [p for p, _ in jobs]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for _, m in jobs]
    llm.generate([[7] * 16, [8] * 16], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up, no shared prefix
    results = {}
    with timed("neox-ray generate", results):
        outputs = llm.generate(prompts, params)
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert produced == sum(m for _, m in jobs), "every request must produce exactly max_tokens tokens"
    print(f"  engine stats: {llm.engine.stats()}")
    return produced, results["neox-ray generate"]


def report_physical_limits(model_dir: Path, jobs, ours_s: float, args) -> None:
    """Prints what fraction of this machine's two ceilings the engine reached: large-batch generation vs
    matmul peak (FLOPs the workload needs / time), and batch-1 decode vs the memory-bandwidth bound
    (every weight read once per token)."""
    from neox_ray import LLM, SamplingParams

    dtype = getattr(torch, args.dtype)
    limits = measure_physical_limits(args.device, dtype)
    params = parameter_counts(model_dir)
    element = torch.tensor([], dtype=dtype).element_size()
    prompt_tokens = sum(len(p) for p, _ in jobs)
    generated = sum(m for _, m in jobs)
    # Prefill tokens go through the layers only (logits for the last prompt token are counted as decode).
    flops = 2 * (prompt_tokens * params["layers"] + generated * (params["layers"] + params["lm_head"]))
    weight_bytes = (params["layers"] + params["lm_head"]) * element  # read once per batch-1 decode step
    print(f"ceilings here: {limits['matmul_flops'] / 1e9:.1f} GFLOP/s matmul ({args.dtype}), "
          f"{limits['bandwidth_bytes'] / 1e9:.1f} GB/s copy")
    print(f"large-batch generation: {flops / ours_s / 1e9:.1f} GFLOP/s = "
          f"{flops / ours_s / limits['matmul_flops']:.0%} of matmul peak")
    llm = LLM(str(model_dir), dtype=args.dtype, device=args.device, max_num_seqs=1)
    sampling = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    llm.generate([[11] * 32], sampling)  # warm-up
    start = time.perf_counter()
    llm.generate([[12] * 32], sampling)
    per_token_s = (time.perf_counter() - start) / 64
    bound_s = weight_bytes / limits["bandwidth_bytes"]
    print(f"batch-1 decode: {1 / per_token_s:.1f} tok/s; bandwidth bound {1 / bound_s:.1f} tok/s "
          f"({weight_bytes / 1e6:.0f} MB of weights per token) = {bound_s / per_token_s:.0%} of it")


def run_transformers(model_dir: Path, jobs, args) -> tuple[int, float]:
    from transformers import GPTNeoXForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = GPTNeoXForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    results = {}
    useful = 0
    with timed("transformers generate", results):
        for start in range(0, len(jobs), args.hf_batch_size):
            useful += hf_generate_batch(model, jobs[start:start + args.hf_batch_size], args.device, do_sample=False)
    return useful, results["transformers generate"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, "pythia-160m")
    parser.add_argument("--num-prompts", type=int, default=96)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=96)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--physical-limits", action="store_true",
                        help="also measure matmul peak and memory bandwidth here and print the fractions reached")
    args = parser.parse_args()
    model_dir = prepare_model(args)
    jobs = workload(args.num_prompts, (16, 256), (16, 128))
    print(f"{args.num_prompts} prompts, {sum(len(p) for p, _ in jobs)} prompt tokens, "
          f"{sum(m for _, m in jobs)} requested tokens; {args.shape} {args.dtype} on {args.device} "
          f"({torch.get_num_threads()} threads)")
    ours_tokens, ours_s = run_neox_ray(model_dir, jobs, args)
    print(f"neox-ray:     {ours_tokens / ours_s:8.1f} useful generated tok/s")
    if args.physical_limits:
        report_physical_limits(model_dir, jobs, ours_s, args)
    if args.skip_baseline:
        return
    hf_tokens, hf_s = run_transformers(model_dir, jobs, args)
    print(f"transformers: {hf_tokens / hf_s:8.1f} useful generated tok/s (batch {args.hf_batch_size}, left padded)")
    print(f"ratio neox-ray / transformers: {(ours_tokens / ours_s) / (hf_tokens / hf_s):.2f}x  (target >= 4x)")


if __name__ == "__main__":
    main()
