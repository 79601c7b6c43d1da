"""``neox-ray demo``: the one-command quick start, end to end on a laptop with no network and no GPU.

It writes a tiny GPT-NeoX checkpoint with RANDOM weights (:func:`neox_ray.demo.create_demo_checkpoint`) and a
Parquet file of sample prompts under ``--dir``, runs the real batch generation job on them on a local Ray
instance it starts itself (the same pipeline a cluster runs: Ray Data, an engine actor pool, atomic Parquet
commits), and prints a few output rows. The text is gibberish by construction; the demo shows the
pipeline, not a model. Everything here is a thin caller of :mod:`neox_ray.batch`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

BANNER = ("!! RANDOM WEIGHTS: the demo checkpoint was never trained, so its text is gibberish. The demo runs the "
          "real batch pipeline; point --model at a real checkpoint (e.g. EleutherAI/pythia-1.4b) for real text.")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo", help="quick start: random-weight demo checkpoint + sample prompts, then a batch generation job",
        description="Creates a demo checkpoint (RANDOM WEIGHTS) and sample prompts under --dir, runs a batch "
                    "generation job on a local Ray instance and prints a few output rows.")
    parser.add_argument("--dir", default="demo", help="where the checkpoint, prompts and outputs go (default ./demo)")
    parser.add_argument("--rows", type=int, default=64, help="number of sample prompts (default 64)")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens to generate per prompt (default 24)")
    parser.add_argument("--num-replicas", type=int, default=2, help="engine actors (default 2, half a CPU each)")
    parser.add_argument("--show", type=int, default=5, help="output rows to print (default 5)")
    parser.set_defaults(func=run_demo)


def write_sample_prompts(path: Path, rows: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from neox_ray.demo import DEMO_SENTENCES

    sentences = DEMO_SENTENCES[: len(DEMO_SENTENCES) // 8]  # the list repeats its 8 sentences
    prompts = [" ".join(sentences[i % len(sentences)].split()[: 3 + i % 5]) for i in range(rows)]
    table = pa.table({"id": [f"demo-{i:04d}" for i in range(rows)], "prompt": prompts,
                      "source": [f"sentence-{i % len(sentences)}" for i in range(rows)]})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def demo_config(directory: Path, rows: int, max_tokens: int, num_replicas: int) -> dict[str, Any]:
    """The settings of ``configs/generate-cpu-demo.yaml``, with this demo's paths."""
    return {
        "model": str(directory / "checkpoint"), "input": str(directory / "prompts.parquet"),
        "output": str(directory / "outputs" / "generate"), "seed": 0,
        "sampling": {"max_tokens": max_tokens, "temperature": 0.8, "top_p": 0.95},
        "engine": {"device": "cpu", "dtype": "float32", "max_num_seqs": 32, "max_model_len": 512},
        "replicas": {"num_replicas": num_replicas, "num_cpus": 0.5, "batch_size": 8, "max_concurrent_batches": 2},
        "rows_per_block": 16, "rows_per_file": 32, "cpu_stage_num_cpus": 0.25, "progress_interval_s": 2.0,
    }


def run_demo(args: argparse.Namespace) -> int:
    from neox_ray.batch.config import validate_job_config
    from neox_ray.batch.progress import format_summary
    from neox_ray.batch.runner import run_job
    from neox_ray.batch.sink import read_output
    from neox_ray.demo import create_demo_checkpoint

    directory = Path(args.dir).resolve()
    print(BANNER, file=sys.stderr)
    checkpoint = directory / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        print(f"[demo] writing a tiny random-weight GPT-NeoX checkpoint to {checkpoint}", file=sys.stderr)
        create_demo_checkpoint(checkpoint, shape="tiny", max_position_embeddings=512)
    prompts = write_sample_prompts(directory / "prompts.parquet", args.rows)
    print(f"[demo] wrote {args.rows} sample prompts to {prompts}", file=sys.stderr)
    config = validate_job_config("generate", demo_config(directory, args.rows, args.max_tokens, args.num_replicas),
                                 source="demo")
    shutil.rmtree(config.output, ignore_errors=True)  # a demo always runs from scratch
    summary = run_job(config)
    print(format_summary(summary))
    table = read_output(config.output, columns=["id", "prompt", "generated_text", "num_generated_tokens",
                                                  "finish_reason", "error"]).sort_by("id")
    print(f"\nfirst {args.show} of {table.num_rows} output rows ({config.output}):")
    for row in table.slice(0, args.show).to_pylist():
        print(f"  {row['id']}  prompt={row['prompt']!r}\n      -> {row['generated_text']!r} "
              f"({row['num_generated_tokens']} tokens, {row['finish_reason']})")
    print(BANNER, file=sys.stderr)
    return 0
