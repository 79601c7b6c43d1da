"""Side by side: neox-ray, transformers ``generate``, llama.cpp and CTranslate2 on one workload, one machine, one run.

Every leg runs alone in its own process, one after another, so each engine has the machine to itself and
its peak RSS is its own (the process's VmHWM; for llama.cpp the server's, for CTranslate2 its worker's):

- ``hf-fp32``, ``hf-fp32-sampled``: transformers ``generate``, batches of 16, left padded, each batch run to
  its longest ``max_tokens`` (as in ``throughput.py``);
- ``neox-{fp32,bf16,int8}[-sampled]``: ``LLM.generate`` of all prompts at once; int8 is
  ``LLM(..., quantization="int8")``;
- ``llamacpp-{f32,bf16,q8_0}``: ``llama-server``, 16 slots, continuous batching, prompts as token ids
  (``peers/llamacpp.py``);
- ``ct2-{float32,bfloat16,int8}``: ``ctranslate2.Generator``, batches of 16 sorted by ``max_tokens``
  (``peers/ctranslate2_peer.py``).

Workload (fixed seed; ``sampling.py``'s): ``--num-prompts`` prompts of 16-128 random token ids in the real
tokenizer's range, ``max_tokens`` 32-96, ``ignore_eos``; every leg must return exactly the requested tokens and
counts only those (useful tok/s). Greedy legs take the argmax; sampled legs use temperature 0.8, top-p 0.95 (and
for neox-ray a seed per request). Every leg gets one warm-up request that is not timed and ``--threads``
threads (torch threads, llama.cpp ``-t``/``-tb``, CTranslate2 ``intra_threads``, and ``OMP_NUM_THREADS`` of its
process). The random-weight checkpoint is ``benchmarks/common.py``'s; the peers prepare on first use (a
virtual environment, a llama.cpp build, GGUF and CTranslate2 conversions, all cached; see benchmarks/README.md)
and a peer that cannot be prepared here is reported unavailable, not a failure.

It prints a table (useful tok/s, seconds, peak RSS beside HF's, ratio vs HF fp32 greedy) and one line per target:
neox-ray sampled >= 0.9x greedy at each precision; fp32 >= 4x HF generate; each precision >= 1.5x the best peer at
that precision (fp32: llama.cpp f32, CTranslate2 float32; bf16: llama.cpp bf16 and CTranslate2 bfloat16 where it
runs; int8: llama.cpp q8_0, CTranslate2 int8); the fastest neox-ray leg >= 12x HF fp32 greedy.

With ``--passes N`` every leg runs the whole workload N times in its process and reports its fastest pass (the
first pass of a process pays one-time costs: ~10 % for neox-ray's fastest mode here, see benchmarks/README.md);
the default, 1, times that first pass for every engine. ``--async-scheduling`` runs the neox-ray legs with
``async_scheduling=True`` (each forward pass on a worker thread while the previous step's output is processed);
``--kv-cache-dtype int8`` runs them with ``kv_cache_dtype="int8"`` (keys and values stored as int8, a float32 scale
per token and head: half the bytes decode attention streams from a bfloat16 cache, a quarter of a float32 one).

    python benchmarks/compare.py --shape pythia-70m                  # every leg, 48 prompts, 2 threads
    python benchmarks/compare.py --legs hf-fp32,neox-fp32,llamacpp-f32 --num-prompts 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import checkpoint, hf_generate_batch, workload  # noqa: E402
from peers import PeerUnavailable, process_peak_rss_mib  # noqa: E402

PROMPT_LEN = (16, 128)
MAX_TOKENS = (32, 96)
HF_BATCH_SIZE = 16
TEMPERATURE, TOP_P = 0.8, 0.95


@dataclass(frozen=True)
class Leg:
    engine: str  # hf, neox, llamacpp, ct2
    precision: str  # the engine's own name for it
    family: str  # fp32, bf16 or int8: which legs compare with which
    sampled: bool = False


# neox-ray's modes: int8 weights with float32 activations and KV cache, and with bfloat16 ones (half the KV
# cache bytes that decode attention streams; what llama.cpp's f16 KV cache does for its q8_0).
NEOX_OPTIONS: dict[str, dict[str, Any]] = {
    "fp32": {"dtype": "float32"}, "bf16": {"dtype": "bfloat16"},
    "int8": {"dtype": "float32", "quantization": "int8"}, "int8-bf16": {"dtype": "bfloat16", "quantization": "int8"}}
NEOX_PRECISIONS = tuple(NEOX_OPTIONS)

LEGS: dict[str, Leg] = {
    "hf-fp32": Leg("hf", "float32", "fp32"),
    "hf-fp32-sampled": Leg("hf", "float32", "fp32", sampled=True),
    **{f"neox-{precision}{suffix}": Leg("neox", precision, precision.split("-")[0], sampled=bool(suffix))
       for precision in NEOX_PRECISIONS for suffix in ("", "-sampled")},
    "llamacpp-f32": Leg("llamacpp", "f32", "fp32"),
    "llamacpp-bf16": Leg("llamacpp", "bf16", "bf16"),
    "llamacpp-q8_0": Leg("llamacpp", "q8_0", "int8"),
    "ct2-float32": Leg("ct2", "float32", "fp32"),
    "ct2-bfloat16": Leg("ct2", "bfloat16", "bf16"),
    "ct2-int8": Leg("ct2", "int8", "int8"),
}
BASELINE = "hf-fp32"
PEER_ENGINES = {"llamacpp": "llama.cpp", "ct2": "CTranslate2"}


# ---- one leg, in its own process ----------------------------------------------------------------------------

def pass_note(detail: str, seconds: list[float]) -> str:
    """The leg's detail, with every pass's time when there were several (the fastest is the one reported)."""
    return detail if len(seconds) == 1 else f"{detail}, passes {' / '.join(f'{s:.2f}' for s in seconds)} s"


def run_hf(model_dir: Path, jobs: list[tuple[list[int], int]], sampled: bool, passes: int) -> tuple[int, float, str]:
    import torch
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    options: dict[str, Any] = (dict(do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, top_k=0) if sampled
                               else dict(do_sample=False))

    hf_generate_batch(model, [([11] * 16, 4)], **options)  # warm-up
    seconds = []
    for _ in range(passes):
        start = time.perf_counter()
        for first in range(0, len(jobs), HF_BATCH_SIZE):
            hf_generate_batch(model, jobs[first:first + HF_BATCH_SIZE], **options)
        seconds.append(time.perf_counter() - start)
    return sum(max_tokens for _, max_tokens in jobs), min(seconds), pass_note(f"batches of {HF_BATCH_SIZE}", seconds)


class LegUnavailable(Exception):
    """The leg cannot run here (an engine option it needs does not exist yet, a peer that cannot be prepared)."""


def run_neox(model_dir: Path, jobs: list[tuple[list[int], int]], leg: Leg, max_num_seqs: int, passes: int,
             async_scheduling: bool = False, kv_cache_dtype: str = "auto") -> tuple[int, float, str]:
    from neox_ray import LLM, SamplingParams

    options = NEOX_OPTIONS[leg.precision]
    # The KV cache is sized to the workload, as llama-server's context is: max_num_seqs sequences of the longest
    # job (the engine's CPU default reserves room for 128k tokens, which would dominate the peak RSS).
    config = json.loads((model_dir / "config.json").read_text())
    element = 2 if options["dtype"] == "bfloat16" else 4
    if kv_cache_dtype == "int8":  # one byte a value, plus a float32 scale per head of head_dim values
        element = 1 + 4 * config["num_attention_heads"] / config["hidden_size"]
    longest = max(len(prompt) + max_tokens for prompt, max_tokens in jobs)
    kv_cache_memory = int(max_num_seqs * (longest + 16) * 2 * config["num_hidden_layers"] * config["hidden_size"]
                          * element)
    try:
        llm = LLM(str(model_dir), device="cpu", max_num_seqs=max_num_seqs, block_size=16,
                  enable_prefix_caching=False, kv_cache_memory=kv_cache_memory, async_scheduling=async_scheduling,
                  kv_cache_dtype=kv_cache_dtype, **options)
    except (TypeError, ValueError) as exc:
        raise LegUnavailable(f"LLM({', '.join(f'{k}={v!r}' for k, v in options.items())}): {exc}") from None

    def params(index: int, max_tokens: int) -> Any:
        if leg.sampled:
            return SamplingParams(temperature=TEMPERATURE, top_p=TOP_P, max_tokens=max_tokens, ignore_eos=True,
                                  seed=index)
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    llm.generate([[7] * 16, [8] * 16], [params(0, 4), params(1, 4)])  # warm-up
    seconds = []
    for _ in range(passes):
        start = time.perf_counter()
        outputs = llm.generate([prompt for prompt, _ in jobs], [params(i, m) for i, (_, m) in enumerate(jobs)])
        seconds.append(time.perf_counter() - start)
        for index, (output, (_, max_tokens)) in enumerate(zip(outputs, jobs, strict=True)):
            if len(output.outputs[0].token_ids) != max_tokens:
                raise RuntimeError(f"job {index}: {len(output.outputs[0].token_ids)} tokens, {max_tokens} requested")
    return (sum(max_tokens for _, max_tokens in jobs), min(seconds),
            pass_note(f"max_num_seqs {max_num_seqs}, KV cache {kv_cache_memory / 2**20:.0f} MiB"
                      + (", async scheduling" if async_scheduling else "")
                      + (", int8 KV cache" if kv_cache_dtype == "int8" else ""), seconds))


def run_leg(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Runs one leg in this process and returns its result (``status`` ok, unavailable or failed)."""
    leg = LEGS[name]
    model_dir = checkpoint(args.shape)
    jobs = workload(args.num_prompts, PROMPT_LEN, MAX_TOKENS)
    peak: float | None
    try:
        if leg.engine in ("hf", "neox"):
            import torch

            torch.set_num_threads(args.threads)
            if leg.engine == "hf":
                tokens, seconds, detail = run_hf(model_dir, jobs, leg.sampled, args.passes)
            else:
                tokens, seconds, detail = run_neox(model_dir, jobs, leg, args.max_num_seqs, args.passes,
                                                   args.async_scheduling, args.kv_cache_dtype)
            peak = process_peak_rss_mib(os.getpid())
        else:
            if leg.engine == "llamacpp":
                from peers import llamacpp as peer
            else:
                from peers import ctranslate2_peer as peer  # type: ignore[no-redef]
            outcome = peer.run(model_dir, jobs, args.threads, leg.precision, args.passes)
            tokens, seconds, peak = outcome.tokens, min(outcome.seconds), outcome.peak_rss_mib
            detail = pass_note(outcome.detail, outcome.seconds)
    except (LegUnavailable, PeerUnavailable) as exc:
        return {"status": "unavailable", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - the table reports a failed leg and the others go on
        traceback.print_exc()
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    return {"status": "ok", "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "peak_rss_mib": peak, "detail": detail}


# ---- the comparison, in the parent process ------------------------------------------------------------------

def prepare_peers(names: list[str], model_dir: Path) -> dict[str, str]:
    """Prepares the peers the chosen legs need (first run: builds and conversions); returns the legs that
    cannot run here, each with the reason."""
    unavailable: dict[str, str] = {}
    for engine, label in PEER_ENGINES.items():
        legs = [name for name in names if LEGS[name].engine == engine]
        if not legs:
            continue
        start = time.perf_counter()
        try:
            if engine == "llamacpp":
                from peers import llamacpp

                llamacpp.prepare(model_dir, tuple(LEGS[name].precision for name in legs))
            else:
                from peers import ctranslate2_peer

                offered = ctranslate2_peer.supported_precisions()
                for name in legs:
                    if LEGS[name].precision not in offered:
                        unavailable[name] = (f"this CPU build of CTranslate2 offers no {LEGS[name].precision} "
                                             f"compute type (it offers {', '.join(offered)})")
                ctranslate2_peer.prepare(model_dir, tuple(LEGS[name].precision for name in legs
                                                          if name not in unavailable))
        except PeerUnavailable as exc:
            print(f"{label} is unavailable here, its legs are skipped: {exc}", flush=True)
            unavailable.update({name: str(exc) for name in legs})
            continue
        print(f"{label} ready ({time.perf_counter() - start:.0f} s to prepare)", flush=True)
    return unavailable


def run_leg_process(name: str, args: argparse.Namespace) -> dict[str, Any]:
    threads = str(args.threads)
    environment = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    with tempfile.TemporaryDirectory() as scratch:
        result_file = Path(scratch) / "result.json"
        command = [sys.executable, __file__, "--run-leg", name, "--leg-result", str(result_file),
                   "--shape", args.shape, "--threads", threads, "--num-prompts", str(args.num_prompts),
                   "--max-num-seqs", str(args.max_num_seqs), "--passes", str(args.passes)]
        command += ["--async-scheduling"] if args.async_scheduling else []
        command += ["--kv-cache-dtype", args.kv_cache_dtype]
        done = subprocess.run(command, env=environment)
        if not result_file.exists():
            return {"status": "failed", "reason": f"the leg's process exited with {done.returncode}"}
        return json.loads(result_file.read_text())


def target_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """One PASS / FAIL / SKIP line per target, with the numbers behind it."""
    rates: dict[str, float] = {name: result["tokens_per_s"] for name, result in results.items()
                               if result["status"] == "ok"}

    def why_missing(*names: str) -> str:
        return "; ".join(f"{name} {results[name]['status'] if name in results else 'not run'}"
                         for name in names if name not in rates)

    def check(target: str, value: float, threshold: float, numbers: str) -> str:
        return f"{'PASS' if value >= threshold else 'FAIL'}: {target}: {value:.2f}x ({numbers})"

    lines = []
    for precision in NEOX_PRECISIONS:
        target = f"neox-ray {precision} sampled >= 0.9x greedy"
        greedy, sampled = f"neox-{precision}", f"neox-{precision}-sampled"
        if greedy in rates and sampled in rates:
            lines.append(check(target, rates[sampled] / rates[greedy], 0.9,
                               f"{rates[sampled]:.1f} vs {rates[greedy]:.1f} tok/s"))
        else:
            lines.append(f"SKIP: {target}: {why_missing(greedy, sampled)}")
    target = "neox-ray fp32 >= 4x HF generate fp32"
    if "neox-fp32" in rates and BASELINE in rates:
        lines.append(check(target, rates["neox-fp32"] / rates[BASELINE], 4.0,
                           f"{rates['neox-fp32']:.1f} vs {rates[BASELINE]:.1f} tok/s"))
    else:
        lines.append(f"SKIP: {target}: {why_missing('neox-fp32', BASELINE)}")
    for family in ("fp32", "bf16", "int8"):
        target = f"neox-ray {family} >= 1.5x the best peer at {family}"
        mine = [name for name, leg in LEGS.items() if leg.family == family and leg.engine == "neox" and not leg.sampled]
        peers = [name for name, leg in LEGS.items() if leg.family == family and leg.engine in PEER_ENGINES]
        measured = {name: rates[name] for name in peers if name in rates}
        if not measured or not any(name in rates for name in mine):
            lines.append(f"SKIP: {target}: {why_missing(*mine, *peers)}")
            continue
        ours = max((name for name in mine if name in rates), key=rates.__getitem__)
        best = max(measured, key=measured.__getitem__)
        others = "".join(f"; {name} {value:.1f}" for name, value in measured.items() if name != best)
        lines.append(check(target, rates[ours] / measured[best], 1.5,
                           f"{ours} {rates[ours]:.1f} vs {best} {measured[best]:.1f} tok/s{others}"))
    target = "fastest neox-ray mode >= 12x HF fp32 generate"
    neox = {name: rate for name, rate in rates.items() if LEGS[name].engine == "neox"}
    if neox and BASELINE in rates:
        fastest = max(neox, key=neox.__getitem__)
        lines.append(check(target, neox[fastest] / rates[BASELINE], 12.0,
                           f"{fastest} {neox[fastest]:.1f} vs {rates[BASELINE]:.1f} tok/s"))
    else:
        lines.append(f"SKIP: {target}: {'no neox-ray leg ran' if not neox else why_missing(BASELINE)}")
    return lines


def print_table(results: dict[str, dict[str, Any]]) -> None:
    baseline = results.get(BASELINE, {})
    hf_rate = baseline.get("tokens_per_s")
    hf_rss = baseline.get("peak_rss_mib")
    print(f"\n{'leg':18} {'tok/s':>8} {'seconds':>8} {'peak RSS MiB':>13} {'RSS / HF':>9} {'vs HF fp32':>11}  detail")
    for name, result in results.items():
        if result["status"] != "ok":
            print(f"{name:18} {result['status']}: {result['reason']}")
            continue
        rss = result["peak_rss_mib"]
        rss_text = f"{rss:13.0f}" if rss is not None else f"{'-':>13}"
        rss_ratio = f"{rss / hf_rss:8.2f}x" if rss and hf_rss else f"{'-':>9}"
        speed_ratio = f"{result['tokens_per_s'] / hf_rate:10.2f}x" if hf_rate else f"{'-':>11}"
        print(f"{name:18} {result['tokens_per_s']:8.1f} {result['seconds']:8.1f} {rss_text} {rss_ratio} "
              f"{speed_ratio}  {result['detail']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="pythia-70m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--max-num-seqs", type=int, default=48, help="neox-ray's max_num_seqs")
    parser.add_argument("--legs", default=",".join(LEGS), help=f"comma-separated subset of: {', '.join(LEGS)}")
    parser.add_argument("--passes", type=int, default=1,
                        help="time the workload this many times in each leg's process and keep the fastest pass")
    parser.add_argument("--kv-cache-dtype", choices=("auto", "int8"), default="auto",
                        help="neox-ray legs' KV cache: auto (the model's dtype) or int8 (a scale per token and head)")
    parser.add_argument("--async-scheduling", action="store_true",
                        help="neox-ray legs run with async_scheduling (next forward pass overlaps output processing)")
    parser.add_argument("--json", type=Path, help="also write the results and target lines to this file")
    parser.add_argument("--run-leg", choices=list(LEGS), help=argparse.SUPPRESS)
    parser.add_argument("--leg-result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.run_leg:  # a child process: one leg
        args.leg_result.write_text(json.dumps(run_leg(args.run_leg, args)))
        return

    names = [name.strip() for name in args.legs.split(",") if name.strip()]
    unknown = [name for name in names if name not in LEGS]
    if unknown:
        parser.error(f"unknown leg(s) {', '.join(unknown)}; choose from {', '.join(LEGS)}")
    for option in ("passes", "threads", "num_prompts", "max_num_seqs"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    model_dir = checkpoint(args.shape)
    jobs = workload(args.num_prompts, PROMPT_LEN, MAX_TOKENS)
    print(f"{args.num_prompts} prompts, {sum(len(p) for p, _ in jobs)} prompt tokens, "
          f"{sum(m for _, m in jobs)} requested tokens; {args.shape} on CPU, {args.threads} threads", flush=True)
    unavailable = prepare_peers(names, model_dir)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        if name in unavailable:
            results[name] = {"status": "unavailable", "reason": unavailable[name]}
            continue
        print(f"\n== {name}", flush=True)
        results[name] = run_leg_process(name, args)
        result = results[name]
        print(f"   {name}: " + (f"{result['tokens_per_s']:.1f} useful tok/s, {result['seconds']:.1f} s"
                                 if result["status"] == "ok" else f"{result['status']}: {result['reason']}"),
              flush=True)
    print_table(results)
    lines = target_lines(results)
    print()
    for line in lines:
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "threads": args.threads,
                                         "num_prompts": args.num_prompts, "legs": results, "targets": lines},
                                        indent=2))


if __name__ == "__main__":
    main()
