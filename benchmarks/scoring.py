"""Perplexity scoring throughput: ``LLM.score`` vs a transformers forward pass in padded batches.

Documents of mixed length (fixed seed) are scored as ``[eot] + tokens`` in one window each. Baseline:
transformers' forward over right-padded batches (``--hf-batch-size``), log-softmax over the vocabulary,
gather of each next token's logprob: the usual recipe. Both sides use the same random checkpoint in the
same run; the script checks the two NLLs agree before printing scored tokens/s and the ratio.

    python benchmarks/scoring.py                 # CPU default: pythia-160m shape, fp32, 2 threads
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_model_arguments, prepare_model, timed, workload  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, "pythia-160m")
    parser.add_argument("--num-docs", type=int, default=32)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=768)
    parser.add_argument("--hf-batch-size", type=int, default=8)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    model_dir = prepare_model(args)
    docs = [tokens for tokens, _ in workload(args.num_docs, (args.min_len, args.max_len), (1, 1), seed=1)]
    total_tokens = sum(len(d) for d in docs)
    print(f"{len(docs)} documents, {total_tokens} tokens; {args.shape} {args.dtype} on {args.device}")

    from neox_ray import LLM

    llm = LLM(str(model_dir), dtype=args.dtype, device=args.device, max_num_batched_tokens=2048)
    llm.score([[5] * 32])  # warm-up
    results: dict[str, float] = {}
    with timed("neox-ray score", results):
        ours = llm.score(docs)
    ours_nll = sum(r.nll for r in ours)

    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    eot = llm.engine.eot_token_id
    hf_nll = 0.0
    with timed("transformers forward", results):
        for start in range(0, len(docs), args.hf_batch_size):
            batch = [[eot] + d for d in docs[start:start + args.hf_batch_size]]
            width = max(len(d) for d in batch)
            ids = torch.tensor([d + [0] * (width - len(d)) for d in batch], device=args.device)
            mask = torch.tensor([[1] * len(d) + [0] * (width - len(d)) for d in batch], device=args.device)
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            token_logprobs = logprobs[:, :-1].gather(2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            hf_nll -= float((token_logprobs * mask[:, 1:]).sum())
    assert math.isclose(ours_nll, hf_nll, rel_tol=1e-4), (ours_nll, hf_nll)
    ours_rate = total_tokens / results["neox-ray score"]
    hf_rate = total_tokens / results["transformers forward"]
    print(f"neox-ray:     {ours_rate:8.1f} scored tok/s")
    print(f"transformers: {hf_rate:8.1f} scored tok/s (batch {args.hf_batch_size}, right padded)")
    print(f"NLL agrees: {ours_nll:.3f} vs {hf_nll:.3f}")
    print(f"ratio neox-ray / transformers: {ours_rate / hf_rate:.2f}x  (target >= 3x)")


if __name__ == "__main__":
    main()
