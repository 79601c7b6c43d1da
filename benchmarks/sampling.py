"""Sampling path cost: the same workload greedy and sampled in one run, and the ratio sampled / greedy.

Workload (fixed seed): ``--num-prompts`` prompts of 16-128 tokens, ``max_tokens`` 32-96, ignore_eos. The
sampled run uses ``--temperature`` / ``--top-p`` and, with ``--seeded``, a seed per request (the case
that needs per-request reproducible randomness). Both runs count only the requested tokens. With
``--repeats`` the two runs alternate and each keeps the one with the least CPU time; both wall and CPU
time (all threads of the process) are printed, and on a shared machine CPU time is the steadier of the
two. With ``--breakdown`` each run also reports where its CPU time went (model forward, logits, sampler,
the runner's input building, scheduler, engine-side output processing and detokenization), measured with
timers wrapped around those calls (cheap, unlike cProfile, which inflates Python-heavy parts).

    python benchmarks/sampling.py                           # CPU default: pythia-70m shape, fp32, 2 threads
    python benchmarks/sampling.py --breakdown --seeded --top-p 0.95
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import checkpoint, workload  # noqa: E402

# The phases --breakdown reports. "runner" is what the model runner's execute spends outside the model, the
# logits and the sampler (building the packed batch and metadata); "outputs" is the engine's per-token
# bookkeeping, stop checks and detokenization.
TIMED_CALLS = ("forward", "logits", "sampler", "runner", "scheduler", "build step", "outputs")


@contextmanager
def timed_calls(llm: Any) -> Iterator[dict[str, float]]:
    """Wraps the engine's step phases with CPU-time timers; yields the CPU seconds spent per phase."""
    engine = llm.engine
    runner = engine.executor.runner
    totals: dict[str, float] = defaultdict(float)
    patched: list[tuple[Any, str, Any, bool]] = []

    def wrap(owner: Any, name: str, label: str) -> None:
        original: Callable[..., Any] = getattr(owner, name)
        patched.append((owner, name, original, name in vars(owner)))

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                totals[label] += time.process_time() - start

        setattr(owner, name, timed)

    wrap(runner.model, "compute_logits", "logits")
    wrap(runner, "model", "forward")
    wrap(runner, "sampler", "sampler")
    wrap(runner, "execute", "execute")
    wrap(engine.scheduler, "schedule", "scheduler")
    wrap(engine.scheduler, "update", "scheduler")
    wrap(engine, "_sequence_step", "build step")
    wrap(engine, "_on_new_token", "outputs")
    wrap(engine, "_make_output", "outputs")
    try:
        yield totals
    finally:
        for owner, name, original, was_instance_attribute in reversed(patched):
            if was_instance_attribute:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
        totals["runner"] = totals.pop("execute", 0.0) - totals["forward"] - totals["logits"] - totals["sampler"]


def run(llm: Any, jobs: list[tuple[list[int], int]], make_params: Callable[[int, int], Any],
        breakdown: bool) -> tuple[float, float, dict[str, float]]:
    """Returns wall seconds, CPU seconds (all threads of this process) and the CPU seconds per phase."""
    prompts = [p for p, _ in jobs]
    params = [make_params(i, m) for i, (_, m) in enumerate(jobs)]
    phases: dict[str, float] = {}
    start, start_cpu = time.perf_counter(), time.process_time()
    if breakdown:
        with timed_calls(llm) as totals:
            outputs = llm.generate(prompts, params)
        phases = dict(totals)
    else:
        outputs = llm.generate(prompts, params)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    assert sum(len(o.outputs[0].token_ids) for o in outputs) == sum(m for _, m in jobs)
    return wall, cpu, phases


def print_breakdown(label: str, cpu_seconds: float, phases: dict[str, float]) -> None:
    accounted = sum(phases.get(name, 0.0) for name in TIMED_CALLS)
    parts = [f"{name} {phases.get(name, 0.0) / cpu_seconds:.0%}" for name in TIMED_CALLS]
    print(f"  {label} CPU time: " + ", ".join(parts) + f", other {(cpu_seconds - accounted) / cpu_seconds:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="pythia-70m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantization", default=None, help="e.g. int8 (both runs)")
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--max-num-seqs", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seeded", action="store_true", help="give every sampled request its own seed")
    parser.add_argument("--repeats", type=int, default=3, help="alternate greedy and sampled runs, keep the fastest")
    parser.add_argument("--breakdown", action="store_true", help="time the step phases of both runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from neox_ray import LLM, SamplingParams

    model_dir = checkpoint(args.shape)
    jobs = workload(args.num_prompts, (16, 128), (32, 96))
    requested = sum(m for _, m in jobs)
    print(f"{args.num_prompts} prompts, {sum(len(p) for p, _ in jobs)} prompt tokens, {requested} requested "
          f"tokens; {args.shape} {args.dtype}{' ' + args.quantization if args.quantization else ''} on {args.device} "
          f"({torch.get_num_threads()} threads)")
    quantization = {"quantization": args.quantization} if args.quantization else {}
    llm = LLM(str(model_dir), device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs, block_size=16,
              enable_prefix_caching=False, **quantization)
    llm.generate([[7] * 16, [8] * 16], SamplingParams(temperature=0.8, max_tokens=4, seed=1))  # warm-up

    def greedy(index: int, max_tokens: int) -> Any:
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    def sampled(index: int, max_tokens: int) -> Any:
        return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              max_tokens=max_tokens, ignore_eos=True, seed=index if args.seeded else None)

    best: dict[str, tuple[float, float, dict[str, float]]] = {}
    for _ in range(args.repeats):
        for label, make_params in (("greedy", greedy), ("sampled", sampled)):
            wall, cpu, phases = run(llm, jobs, make_params, args.breakdown)
            print(f"  {label}: {wall:.1f} s wall, {cpu:.1f} s CPU")
            if label not in best or cpu < best[label][1]:
                best[label] = (wall, cpu, phases)
    seeding = "a seed per request" if args.seeded else "unseeded"
    sampled_detail = f" (temperature {args.temperature}, top_p {args.top_p}, top_k {args.top_k}, {seeding})"
    for label, detail in (("greedy", ""), ("sampled", sampled_detail)):
        wall, cpu, phases = best[label]
        print(f"{label + ':':9}{requested / wall:8.1f} useful tok/s wall, {requested / cpu:8.1f} per CPU s{detail}")
        if args.breakdown:
            print_breakdown(label, cpu, phases)
    print(f"ratio sampled / greedy (run with the least CPU time of {args.repeats} each): "
          f"{best['greedy'][1] / best['sampled'][1]:.2f}x CPU time, {best['greedy'][0] / best['sampled'][0]:.2f}x wall "
          f"(1.00x = sampling is free; target >= 0.9x)")


if __name__ == "__main__":
    main()
