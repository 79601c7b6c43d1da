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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import checkpoint, timed, workload  # noqa: E402


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


def run_transformers(model_dir: Path, jobs, args) -> tuple[int, float]:
    from transformers import GPTNeoXForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = GPTNeoXForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    results = {}
    useful = 0
    with timed("transformers generate", results):
        for start in range(0, len(jobs), args.hf_batch_size):
            batch = jobs[start:start + args.hf_batch_size]
            width = max(len(p) for p, _ in batch)
            ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch], device=args.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device=args.device)
            longest = max(m for _, m in batch)
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                               do_sample=False, pad_token_id=0)
            useful += sum(m for _, m in batch)
    return useful, results["transformers generate"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="pythia-160m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=96)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=96)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model_dir = checkpoint(args.shape, dtype=torch.float32 if args.device == "cpu" else dtype)
    jobs = workload(args.num_prompts, (16, 256), (16, 128))
    print(f"{args.num_prompts} prompts, {sum(len(p) for p, _ in jobs)} prompt tokens, "
          f"{sum(m for _, m in jobs)} requested tokens; {args.shape} {args.dtype} on {args.device} "
          f"({torch.get_num_threads()} threads)")
    ours_tokens, ours_s = run_neox_ray(model_dir, jobs, args)
    print(f"neox-ray:     {ours_tokens / ours_s:8.1f} useful generated tok/s")
    if args.skip_baseline:
        return
    hf_tokens, hf_s = run_transformers(model_dir, jobs, args)
    print(f"transformers: {hf_tokens / hf_s:8.1f} useful generated tok/s (batch {args.hf_batch_size}, left padded)")
    print(f"ratio neox-ray / transformers: {(ours_tokens / ours_s) / (hf_tokens / hf_s):.2f}x  (target >= 4x)")


if __name__ == "__main__":
    main()
