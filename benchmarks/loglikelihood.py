"""Multiple-choice loglikelihood: prefix caching on vs off, in the same run, on the same checkpoint.

A multiple-choice-shaped workload (fixed seed): ``--num-questions`` contexts of ``--context-len`` tokens, each
with ``--choices`` short continuations, scored with ``LLM.engine.loglikelihood`` (lm-eval's definition).
With prefix caching on, the first continuation of each context computes it and the others are served its
KV blocks from the cache; off, every row recomputes its context. The script checks both give the same
logprobs, then prints the wall times, their ratio and the engine's prefix-cache counters (hit / queried
blocks). The counters are exact; timings on a shared or busy machine are noisy: rerun, or compare the
counters, before reading much into the ratio.

    python benchmarks/loglikelihood.py           # CPU default: pythia-160m shape, fp32, 2 threads
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_model_arguments, prepare_model, timed  # noqa: E402


def multiple_choice(num_questions: int, context_len: int, choices: int, choice_len: tuple[int, int],
                    vocab: int = 50000, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(num_questions):
        context = [rng.randrange(10, vocab) for _ in range(context_len)]
        for _ in range(choices):
            pairs.append((context, [rng.randrange(10, vocab) for _ in range(rng.randint(*choice_len))]))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, "pythia-160m")
    parser.add_argument("--num-questions", type=int, default=16)
    parser.add_argument("--context-len", type=int, default=384)
    parser.add_argument("--choices", type=int, default=4)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    args = parser.parse_args()
    model_dir = prepare_model(args)
    vocab = min(50000, json.loads((model_dir / "config.json").read_text())["vocab_size"])
    pairs = multiple_choice(args.num_questions, args.context_len, args.choices, (2, 12), vocab=vocab)
    context_tokens = sum(len(c) for c, _ in pairs)
    continuation_tokens = sum(len(c) for _, c in pairs)
    print(f"{args.num_questions} contexts x {args.choices} choices = {len(pairs)} rows; {context_tokens} context + "
          f"{continuation_tokens} continuation tokens; {args.shape} {args.dtype} on {args.device}")

    from neox_ray import LLM

    results: dict[str, float] = {}
    logprobs: dict[bool, list[float]] = {}
    for caching in (False, True):
        llm = LLM(str(model_dir), dtype=args.dtype, device=args.device, enable_prefix_caching=caching,
                  max_num_batched_tokens=args.max_num_batched_tokens)
        llm.engine.loglikelihood([([5] * 32, [6, 7])])  # warm-up
        before = llm.engine.stats()
        label = f"prefix caching {'on' if caching else 'off'}"
        with timed(label, results):
            outputs = llm.engine.loglikelihood(pairs)
        after = llm.engine.stats()
        hits = after["prefix_cache_hit_blocks"] - before["prefix_cache_hit_blocks"]
        queried = after["prefix_cache_queried_blocks"] - before["prefix_cache_queried_blocks"]
        print(f"    prefix cache: {hits:.0f} hit / {queried:.0f} queried blocks "
              f"(block size {llm.engine.config.block_size})", flush=True)
        logprobs[caching] = [o.logprob for o in outputs]
        llm.shutdown()
        del llm
    worst = max(abs(a - b) / max(abs(b), 1e-9) for a, b in zip(logprobs[True], logprobs[False], strict=True))
    print(f"max relative logprob difference on vs off: {worst:.2e}")
    assert worst < 1e-3, "prefix caching changed the numbers"
    off, on = results["prefix caching off"], results["prefix caching on"]
    print(f"rows/s: off {len(pairs) / off:.2f}, on {len(pairs) / on:.2f}; speed-up with prefix caching: "
          f"{off / on:.2f}x (timings are noisy on a shared machine; the hit counts are not)")


if __name__ == "__main__":
    main()
