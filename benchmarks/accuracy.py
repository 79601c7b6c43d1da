"""Numerical accuracy of reduced precision against float32: bf16 (``dtype="bfloat16"``) and int8
(``quantization="int8"``, where this engine build accepts it) and the int8 KV cache (``kv_cache_dtype="int8"``:
modes ``kv8``, ``bf16-kv8``, ``int8-bf16-kv8``), each compared with a float32 run of the same checkpoint in the
same process.

What is measured, on real English text (docstrings of Python's standard library: the Zen of Python, the
heapq essay, argparse, unittest, doctest, ...; fixed for a given Python version) tokenized with the real
gpt-neox-20b tokenizer and cut into documents:

* teacher-forced scoring through ``LLM.score`` (one window per document, ``[eot] + tokens``): the mean and
  the largest |logprob(mode) - logprob(fp32)| per token, and each mode's perplexity (the NLL summed over all
  documents in nats, divided once by the token count) with its relative change against fp32;
* teacher-forced argmax agreement through ``prompt_logprobs=2``: the share of text positions where the mode's
  likeliest next token is fp32's. Every position sees the same (true) prefix, so one flip does not cascade;
  it is also given over the positions where fp32's top-1 leads its top-2 by at least ``--margin`` nats;
* greedy agreement: ``--prompts`` prefixes of ``--prompt-tokens`` tokens, ``--new-tokens`` greedy tokens
  each; the mean length of the prefix the mode's continuation shares with fp32's, over ``--new-tokens``
  (one early flip makes the rest of a continuation differ, so this is the strictest number).

**The weights are random** (``common.checkpoint``: no model hub here). A random GPT-NeoX puts a near-flat
distribution over the 50k-token vocabulary (perplexity in the tens of thousands): absolute perplexities
mean nothing, the top-1 token leads the runner-up by about a tenth of a nat, so reduced precision flips the
argmax far more often than it would with a trained model's peaked distributions. What the numbers do measure
is the numerical drift of the kernels (matmuls, attention, layer norms, logits) in each precision, which is
the same arithmetic a trained checkpoint goes through; the ``--margin`` column shows agreement where the
reference is not a near-tie. Run on a real checkpoint (``--model DIR``) for numbers that carry over.

``--modes fp32-again`` adds a control: a second float32 engine, which must match the reference exactly (it
shows that the differences come from the precision, not from run-to-run nondeterminism). The wall and CPU
times printed are one first pass per mode, warm-up included: an indication, not a speed benchmark.

    python benchmarks/accuracy.py --shape pythia-70m            # CPU, 2 threads, ~4k tokens of text
    python benchmarks/accuracy.py --shape pythia-160m --json accuracy-160m.json
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import importlib
import io
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REAL_TOKENIZER, checkpoint  # noqa: E402

from neox_ray.engine.sampling_params import SamplingParams  # noqa: E402
from neox_ray.llm import LLM  # noqa: E402

REFERENCE_OPTIONS: dict[str, Any] = {"dtype": "float32"}
# "fp32-again" is a control: a second float32 engine must agree with the reference exactly.
MODE_OPTIONS: dict[str, dict[str, Any]] = {"bf16": {"dtype": "bfloat16"}, "int8": {"quantization": "int8"},
                                           "int8-bf16": {"quantization": "int8", "dtype": "bfloat16"},
                                           "kv8": {"kv_cache_dtype": "int8"},
                                           "bf16-kv8": {"dtype": "bfloat16", "kv_cache_dtype": "int8"},
                                           "int8-bf16-kv8": {"quantization": "int8", "dtype": "bfloat16",
                                                             "kv_cache_dtype": "int8"},
                                           "fp32-again": {"dtype": "float32"}}
# Prose-heavy module docstrings, in this order; the Zen of Python and heapq's essay open the text.
TEXT_MODULES = ("heapq", "argparse", "unittest", "doctest", "timeit", "tempfile", "sched", "inspect", "csv",
                "statistics", "collections", "typing", "http.cookies", "pdb")


def english_text() -> tuple[str, list[str]]:
    """Real English text available offline: the Zen of Python, heapq's ``__about__`` essay and the module
    docstrings of :data:`TEXT_MODULES`. Returns the text and the names of its sources."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing ``this`` prints the Zen
        import this
    parts, sources = [codecs.decode(this.s, "rot13")], ["this (the Zen of Python)"]
    heapq = importlib.import_module("heapq")
    parts.append(heapq.__about__)
    sources.append("heapq.__about__")
    for name in TEXT_MODULES:
        doc = importlib.import_module(name).__doc__
        if doc and doc.strip():
            parts.append(doc.strip())
            sources.append(f"{name}.__doc__")
    return "\n\n".join(part.strip() for part in parts), sources


def text_documents(max_tokens: int, document_tokens: int) -> tuple[list[list[int]], list[str]]:
    """The text's first ``max_tokens`` token ids (real tokenizer), cut into documents of ``document_tokens``."""
    from tokenizers import Tokenizer

    if not REAL_TOKENIZER.exists():
        raise SystemExit(f"the real tokenizer is missing: {REAL_TOKENIZER}")
    text, sources = english_text()
    ids = Tokenizer.from_file(str(REAL_TOKENIZER)).encode(text).ids[:max_tokens]
    documents = [ids[i:i + document_tokens] for i in range(0, len(ids), document_tokens)]
    return [doc for doc in documents if len(doc) >= 2], sources


@dataclass
class ModeRun:
    """One precision's outputs on the shared text and prompts."""
    token_logprobs: list[list[float]]   # per document, per token (LLM.score)
    argmax: list[list[int]]             # per document, per token: the likeliest token given the true prefix
    top2_margin: list[list[float]]      # per document, per token: top-1 minus top-2 logprob
    greedy: list[list[int]]             # per prompt: the greedy continuation
    greedy_margins: list[list[float]]   # per prompt, per generated token: top-1 minus top-2 logprob
    seconds: float                      # wall time of the passes
    cpu_seconds: float                  # CPU time of this process (all threads) over the passes


def top2_margin(entry: dict[int, float]) -> float:
    """Top-1 minus top-2 logprob of a ``{token: logprob}`` entry holding (at least) the top 2."""
    first, second = sorted(entry.values(), reverse=True)[:2] if len(entry) > 1 else (0.0, -math.inf)
    return first - second


def run_mode(llm: LLM, documents: list[list[int]], prompts: list[list[int]], new_tokens: int) -> ModeRun:
    start, start_cpu = time.perf_counter(), time.process_time()
    scores = llm.score(documents, window=max(len(doc) for doc in documents) + 1, return_token_logprobs=True)
    token_logprobs = [list(score.token_logprobs or []) for score in scores]
    eot = llm.engine.eot_token_id
    teacher_forced = llm.generate([[eot, *doc] for doc in documents],
                                  SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2))
    argmax, margins = [], []
    for output in teacher_forced:
        doc_argmax, doc_margins = [], []
        for entry in (output.prompt_logprobs or [])[1:]:  # the first (eot) position predicts nothing
            assert entry is not None
            doc_argmax.append(max(entry, key=entry.__getitem__))
            doc_margins.append(top2_margin(entry))
        argmax.append(doc_argmax)
        margins.append(doc_margins)
    greedy = llm.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True,
                                                  logprobs=2))
    return ModeRun(token_logprobs, argmax, margins, [list(out.outputs[0].token_ids) for out in greedy],
                   [[top2_margin(entry) for entry in out.outputs[0].logprobs or []] for out in greedy],
                   time.perf_counter() - start, time.process_time() - start_cpu)


def perplexity(run: ModeRun) -> float:
    logprobs = [lp for doc in run.token_logprobs for lp in doc]
    return math.exp(-math.fsum(logprobs) / len(logprobs))


def common_prefix(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


def compare(reference: ModeRun, run: ModeRun, margin: float, new_tokens: int) -> dict[str, float]:
    deltas = [abs(x - y) for ref_doc, doc in zip(reference.token_logprobs, run.token_logprobs, strict=True)
              for x, y in zip(ref_doc, doc, strict=True)]
    positions = [(ref_top == top, ref_margin)
                 for ref_doc, doc, ref_margins in zip(reference.argmax, run.argmax, reference.top2_margin, strict=True)
                 for ref_top, top, ref_margin in zip(ref_doc, doc, ref_margins, strict=True)]
    clear = [same for same, ref_margin in positions if ref_margin >= margin]
    prefixes = [common_prefix(ref, out) for ref, out in zip(reference.greedy, run.greedy, strict=True)]
    # Where a continuation first differs both runs had the same prefix: fp32's lead there says how close a call it was.
    divergence_leads = [margins[p] for p, margins in zip(prefixes, reference.greedy_margins, strict=True)
                        if p < new_tokens]
    ref_ppl, ppl = perplexity(reference), perplexity(run)
    return {
        "mean_abs_delta_logprob": math.fsum(deltas) / len(deltas),
        "max_abs_delta_logprob": max(deltas),
        "perplexity": ppl,
        "perplexity_rel_change": ppl / ref_ppl - 1.0,
        "teacher_forced_argmax_agreement": sum(same for same, _ in positions) / len(positions),
        "teacher_forced_argmax_agreement_clear": sum(clear) / len(clear) if clear else math.nan,
        "clear_positions_share": len(clear) / len(positions),
        "greedy_prefix_match": sum(prefixes) / (len(prefixes) * new_tokens),
        "greedy_identical_share": sum(p == new_tokens for p in prefixes) / len(prefixes),
        "greedy_divergence_max_lead": max(divergence_leads) if divergence_leads else math.nan,
        "seconds": run.seconds,
        "cpu_seconds": run.cpu_seconds,
    }


ROWS = [  # (label, key, format)
    ("mean |Δ logprob| vs fp32 (nats)", "mean_abs_delta_logprob", "{:.2e}"),
    ("max |Δ logprob| vs fp32 (nats)", "max_abs_delta_logprob", "{:.2e}"),
    ("perplexity (random weights)", "perplexity", "{:.1f}"),
    ("perplexity change vs fp32", "perplexity_rel_change", "{:+.3%}"),
    ("teacher-forced argmax agreement", "teacher_forced_argmax_agreement", "{:.2%}"),
    ("  where fp32 top-1 leads by ≥ margin", "teacher_forced_argmax_agreement_clear", "{:.2%}"),
    ("greedy: mean matching prefix / new tokens", "greedy_prefix_match", "{:.2%}"),
    ("greedy: continuations identical", "greedy_identical_share", "{:.2%}"),
    ("  fp32's top-1 lead at first divergence, max", "greedy_divergence_max_lead", "{:.2e}"),
    ("wall time of the mode's passes (s)", "seconds", "{:.1f}"),
    ("CPU time of the mode's passes (s)", "cpu_seconds", "{:.1f}"),
]


def print_table(columns: dict[str, dict[str, float]], unavailable: dict[str, str]) -> None:
    names = list(columns)
    width = max(len(label) for label, _, _ in ROWS) + 2
    print("\n" + "".ljust(width) + "".join(name.rjust(14) for name in names))
    for label, key, fmt in ROWS:
        cells = []
        for name in names:
            value = columns[name].get(key)
            cells.append(("-" if value is None or (isinstance(value, float) and math.isnan(value))
                          else fmt.format(value)).rjust(14))
        print(label.ljust(width) + "".join(cells))
    for name, reason in unavailable.items():
        print(f"{name}: unavailable ({reason})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="pythia-70m", help="random-weight Pythia shape (benchmarks/common.py)")
    parser.add_argument("--model", default=None, help="a checkpoint directory to use instead of --shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="bf16,int8,int8-bf16", help=f"comma-separated, of {', '.join(MODE_OPTIONS)}")
    parser.add_argument("--text-tokens", type=int, default=4096, help="tokens of text scored")
    parser.add_argument("--document-tokens", type=int, default=256, help="tokens per scored document")
    parser.add_argument("--prompts", type=int, default=16, help="greedy prompts (prefixes of the documents)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens generated per prompt")
    parser.add_argument("--margin", type=float, default=0.1,
                        help="nats: argmax agreement is also given where fp32's top-1 leads its top-2 by this much")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON here")
    args = parser.parse_args()
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = [mode for mode in modes if mode not in MODE_OPTIONS]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODE_OPTIONS)}")
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else checkpoint(args.shape)
    random_weights = args.model is None
    documents, sources = text_documents(args.text_tokens, args.document_tokens)
    prompts = [doc[:args.prompt_tokens] for doc in documents[:args.prompts]]
    weights_note = " (RANDOM WEIGHTS: near-flat distributions, read the drift, not the perplexity)"
    print(f"{model_dir.name}{weights_note if random_weights else ''} on {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"text: {sum(map(len, documents))} tokens in {len(documents)} documents (gpt-neox-20b tokenizer), "
          f"Python {platform.python_version()} docstrings: {', '.join(sources)}")
    print(f"greedy: {len(prompts)} prompts of {args.prompt_tokens} tokens, {args.new_tokens} new tokens each")

    def load(options: dict[str, Any]) -> LLM:
        return LLM(str(model_dir), device=args.device, max_num_seqs=max(len(documents), len(prompts)), **options)

    print("fp32 (reference) ...", flush=True)
    reference_llm = load(REFERENCE_OPTIONS)
    reference = run_mode(reference_llm, documents, prompts, args.new_tokens)
    reference_llm.shutdown()
    del reference_llm
    columns: dict[str, dict[str, float]] = {"fp32": {"perplexity": perplexity(reference), "seconds": reference.seconds,
                                                   "cpu_seconds": reference.cpu_seconds}}
    unavailable: dict[str, str] = {}
    for mode in modes:
        print(f"{mode} ...", flush=True)
        try:
            llm = load(MODE_OPTIONS[mode])
        except (TypeError, ValueError) as exc:  # an engine without this mode, or not on this device
            unavailable[mode] = str(exc).splitlines()[0]
            continue
        run = run_mode(llm, documents, prompts, args.new_tokens)
        llm.shutdown()
        del llm
        columns[mode] = compare(reference, run, args.margin, args.new_tokens)
    clear_share = next((c["clear_positions_share"] for c in columns.values() if "clear_positions_share" in c), None)
    print_table(columns, unavailable)
    median_lead = statistics.median_high([m for doc in reference.top2_margin for m in doc])
    print(f"margin = {args.margin} nats; fp32's top-1 leads its top-2 by at least that at "
          + (f"{clear_share:.1%}" if clear_share is not None else "-")
          + f" of positions (median lead {median_lead:.3f} nats)")
    if random_weights:
        print("random weights: the drift numbers measure the kernels; argmax/greedy agreement is pessimistic "
              "(near-ties everywhere), perplexities are meaningless in absolute terms")
    if args.json:
        result = {"model": str(model_dir), "random_weights": random_weights, "device": args.device,
                  "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "python": platform.python_version(), "text_sources": sources,
                  "text_tokens": sum(map(len, documents)), "documents": len(documents),
                  "prompts": len(prompts), "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                  "margin": args.margin, "modes": columns, "unavailable": unavailable}
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
