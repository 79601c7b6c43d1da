"""``neox-ray generate`` and ``neox-ray score``: flags on top of an optional YAML config, then run the job.

Flags override the config file key by key (``--num-replicas`` maps to ``replicas.num_replicas``, ...);
validation happens once, on the merged result (:mod:`neox_ray.batch.config`). Engine and sampling flags are
generated from the ``EngineConfig`` / ``SamplingParams`` fields tagged ``flag`` (name, type, help and all).
``jobs/generate.py`` and ``jobs/score.py`` call :func:`main` with the same options, for ``ray job submit``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from neox_ray.engine.engine_config import flag_fields
from neox_ray.engine.sampling_params import SamplingParams

# Flags that come from the settings schemas: EngineConfig / SamplingParams fields tagged "flag", named after
# the field (--max-tokens), typed and described by it. ``seed`` is the job seed, not sampling.seed.
_ENGINE_FLAG_SPECS = flag_fields()
_SAMPLING_FLAG_SPECS = SamplingParams.specs("flag")
_SAMPLING_NOTES = {"n": "n > 1 adds sample_index"}  # what a field means in a batch job in particular

# flag destination -> dotted config key
_COMMON_FLAGS: dict[str, str] = {
    "model": "model", "input": "input", "output": "output", "id_column": "id_column",
    "num_replicas": "replicas.num_replicas", "min_replicas": "replicas.min_replicas",
    "max_replicas": "replicas.max_replicas", "num_cpus_per_replica": "replicas.num_cpus",
    "num_gpus_per_replica": "replicas.num_gpus", "batch_size": "replicas.batch_size",
    **{spec.name: f"engine.{spec.name}" for spec in _ENGINE_FLAG_SPECS},
    "rows_per_file": "rows_per_file", "dry_run": "dry_run",
    "ray_address": "ray.address", "progress_interval": "progress_interval_s",
}
_GENERATE_FLAGS: dict[str, str] = {
    "prompt_column": "prompt_column", "messages_column": "messages_column", "chat_template": "chat_template",
    "seed": "seed", "logprobs": "logprobs", "top_logprobs": "top_logprobs",
    **{spec.name: f"sampling.{spec.name}" for spec in _SAMPLING_FLAG_SPECS},
}
_SCORE_FLAGS: dict[str, str] = {"text_column": "text_column", "window": "window", "stride": "stride",
                                "mode": "mode", "perplexity": "perplexity", "context_column": "context_column",
                                "continuation_column": "continuation_column", "token_logprobs": "token_logprobs"}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML job config; the flags below override its keys")
    parser.add_argument("--model", action="append",
                        help="checkpoint directory (HF format) readable from every node, or a hub id "
                             "ORG/NAME[@REVISION]; score: repeat it to sweep checkpoints (one output "
                             "subdirectory each, plus sweep.json and sweep.png)")
    parser.add_argument("--input", help="Parquet file or directory (local path or URI)")
    parser.add_argument("--output", help="output directory; rerunning with the same one resumes the job")
    parser.add_argument("--id-column", help="column holding unique row ids (default: id; derived from file and "
                                            "row position when the input has none)")
    pool = parser.add_argument_group("engine replicas")
    pool.add_argument("--num-replicas", type=int, help="fixed number of engine actors (each one LLM / TP group)")
    pool.add_argument("--min-replicas", type=int, help="autoscaling: fewest engine actors")
    pool.add_argument("--max-replicas", type=int, help="autoscaling: most engine actors")
    pool.add_argument("--num-cpus-per-replica", type=float,
                      help="CPUs each engine actor reserves (default: a local Ray's CPUs shared by the replicas)")
    pool.add_argument("--num-gpus-per-replica", type=float,
                      help="GPUs each engine actor reserves (default: 1 on a GPU cluster with TP=1, else 0)")
    pool.add_argument("--batch-size", type=int, help="rows per engine call (default 32)")
    for spec in _ENGINE_FLAG_SPECS:
        pool.add_argument(spec.flag, **spec.argparse_options(spec.default))
    run = parser.add_argument_group("run")
    run.add_argument("--rows-per-file", type=int, help="input rows per committed output file")
    run.add_argument("--dry-run", type=int, metavar="N",
                     help="run N sample rows, print them and the projected wall time; write nothing")
    run.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local Ray)")
    run.add_argument("--progress-interval", type=float, help="seconds between progress lines (default 10)")


def build_generate_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _add_common(parser)
    sampling = parser.add_argument_group(
        "generation", "The job's sampling defaults. Input columns named after a sampling field override it per "
                      f"row (null: the default): {', '.join(SamplingParams.row_override_fields())}.")
    sampling.add_argument("--prompt-column", help="column holding the prompts (default: prompt)")
    sampling.add_argument("--messages-column", help="column holding chat messages, used when the input has no "
                                                    "prompt column (default: messages)")
    sampling.add_argument("--chat-template", help="jinja file overriding the model's chat template")
    job_defaults = _job_sampling_defaults()
    for spec in _SAMPLING_FLAG_SPECS:
        shown_default = job_defaults.get(spec.name, spec.default)
        sampling.add_argument(spec.flag, **spec.argparse_options(shown_default, _SAMPLING_NOTES.get(spec.name, "")))
    sampling.add_argument("--seed", type=int, help="job seed; each row's seed derives from it and the row id")
    sampling.add_argument("--logprobs", action="store_true", default=None,
                          help="add token_ids, token_logprobs (of the chosen tokens) and cumulative_logprob")
    sampling.add_argument("--top-logprobs", type=int, metavar="K",
                          help="also add top_logprobs: the K likeliest tokens per step, as {token_id, logprob} "
                               "(implies --logprobs)")
    return parser


def _job_sampling_defaults() -> dict[str, Any]:
    """The sampling defaults a generate job starts from (they differ from SamplingParams' own: max_tokens)."""
    from neox_ray.batch.config import GenerateJobConfig

    factory = GenerateJobConfig.model_fields["sampling"].default_factory
    return dict(factory()) if factory is not None else {}  # type: ignore[call-arg]


def build_score_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _add_common(parser)
    scoring = parser.add_argument_group("scoring")
    scoring.add_argument("--mode", choices=("perplexity", "loglikelihood"),
                         help="perplexity (default): a text per row -> NLL / perplexity; loglikelihood: (context, "
                              "continuation) rows -> lm-eval's logprob and is_greedy of the continuation")
    scoring.add_argument("--perplexity", choices=("sliding", "rolling"),
                         help="sliding (default): overlapping windows, more context per token; rolling: lm-eval's "
                              "loglikelihood_rolling (disjoint windows), the number lm-eval reports")
    scoring.add_argument("--text-column", help="column holding the texts (default: text)")
    scoring.add_argument("--context-column", help="loglikelihood: column holding the contexts (default: context)")
    scoring.add_argument("--continuation-column",
                         help="loglikelihood: column holding the continuations (default: continuation)")
    scoring.add_argument("--window", type=int, help="tokens per scoring window (default: max_model_len)")
    scoring.add_argument("--stride", type=int, help="tokens between window starts (default: window / 2)")
    scoring.add_argument("--token-logprobs", action="store_true", default=None,
                         help="add a token_logprobs column: the logprob of every scored token")
    return parser


def add_parser(subparsers: Any) -> None:
    generate = subparsers.add_parser(
        "generate", help="batch generation: Parquet prompts in, Parquet generations out (Ray Data)",
        description="Generate completions for every row of a Parquet dataset on a Ray cluster. Resumable: "
                    "rerun with the same --output to finish an interrupted job.")
    build_generate_parser(generate).set_defaults(func=lambda args: run_from_args("generate", args))
    score = subparsers.add_parser(
        "score", help="scoring: Parquet texts in, per-row NLL / perplexity out; or (context, continuation) "
                      "rows in, lm-eval loglikelihoods out (Ray Data)",
        description="Score every text of a Parquet dataset (sliding-window or rolling NLL, perplexity, bits per "
                    "byte), or every (context, continuation) row (--mode loglikelihood), and write summary.json "
                    "with the corpus totals.")
    build_score_parser(score).set_defaults(func=lambda args: run_from_args("score", args))


def overrides_from_args(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    flags = {**_COMMON_FLAGS, **(_GENERATE_FLAGS if kind == "generate" else _SCORE_FLAGS)}
    overrides = {key: getattr(args, dest) for dest, key in flags.items() if getattr(args, dest, None) is not None}
    models = overrides.pop("model", None)
    if models is not None:  # --model repeats: one checkpoint, or (score) a sweep
        if len(models) == 1:
            overrides["model"] = models[0]
            if kind == "score":
                overrides["models"] = None  # the flag replaces a sweep of the config file
        elif kind == "score":
            overrides.update(model=None, models=list(models))
        else:
            from neox_ray.batch.config import JobConfigError

            raise JobConfigError(f"{kind} takes one --model (got {len(models)}); only score sweeps checkpoints")
    if "replicas.num_replicas" in overrides:  # a fixed pool from the command line replaces autoscaling bounds
        overrides.setdefault("replicas.min_replicas", None)
        overrides.setdefault("replicas.max_replicas", None)
    elif "replicas.min_replicas" in overrides or "replicas.max_replicas" in overrides:
        overrides["replicas.num_replicas"] = None
    return overrides


def run_from_args(kind: str, args: argparse.Namespace) -> int:
    """Loads the config, runs the job, prints its summary. Errors propagate to :func:`neox_ray.cli.run_guarded`,
    which prints them as one line and exits 2 for a user mistake."""
    from neox_ray.batch.config import load_job_config
    from neox_ray.batch.progress import format_summary
    from neox_ray.batch.runner import run_job

    config = load_job_config(kind, args.config, overrides_from_args(kind, args))  # type: ignore[arg-type]
    summary = run_job(config)
    if "sweep" in summary:
        from neox_ray.batch.sweep import format_sweep

        print(format_sweep(summary))
    elif "dry_run_rows" in summary:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    return 0


def main(kind: str, argv: list[str] | None = None) -> int:
    """Entry point of ``jobs/<kind>.py``: the same options as ``neox-ray <kind>``."""
    from neox_ray.cli import add_debug_flag, run_guarded

    parser = argparse.ArgumentParser(prog=f"jobs/{kind}.py")
    (build_generate_parser if kind == "generate" else build_score_parser)(parser)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    return run_guarded(lambda: run_from_args(kind, args), debug=args.debug)
