"""Checkpoint sweeps: one score job run under several checkpoints (``--model A --model A@step1000 ...`` or
``models:`` in the YAML), e.g. perplexity across a Pythia training run.

Each checkpoint is an ordinary score job (:func:`neox_ray.batch.runner.run_job`) writing to its own
subdirectory of the output, so it resumes, skips a finished checkpoint (its ``_SUCCESS``) and makes error
rows exactly like a single job. This module only names the subdirectories, runs them one after another on
one Ray connection and writes the comparison: ``sweep.json`` (one entry per checkpoint, in the order given)
and ``sweep.png`` (the metric against the checkpoint; ``stepN`` revisions on a log axis), when matplotlib
is installed.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from typing import Any

from neox_ray.batch.config import ScoreJobConfig
from neox_ray.batch.progress import print_to_stderr
from neox_ray.batch.sink import SUCCESS, TMP, OutputDir
from neox_ray.hub import parse_model_ref

SWEEP_JSON = "sweep.json"
SWEEP_PNG = "sweep.png"
_STEP = re.compile(r"^step(\d+)$")


def checkpoint_dir_name(ref: str) -> str:
    """A readable, unique-per-reference subdirectory name: ``EleutherAI/pythia-70m@step1000`` ->
    ``EleutherAI--pythia-70m@step1000``; a local path keeps its components joined the same way."""
    name = re.sub(r"[^A-Za-z0-9._@=+-]+", "--", ref.strip()).strip("-.")
    return name or "checkpoint"


def sweep_entry(ref: str, revision: str | None, summary: dict[str, Any]) -> dict[str, Any]:
    parsed = parse_model_ref(ref, revision)
    entry: dict[str, Any] = {"model": parsed.name, "revision": parsed.revision, "output": checkpoint_dir_name(ref),
                             "rows_ok": summary.get("rows_ok"), "rows_failed": summary.get("rows_failed"),
                             "num_tokens": summary.get("num_tokens")}
    if summary.get("mode") == "loglikelihood":
        entry.update(logprob=summary.get("logprob"), mean_logprob=summary.get("mean_logprob"),
                     greedy_rows=summary.get("greedy_rows"))
    else:
        entry.update(perplexity=summary.get("perplexity"), nll=summary.get("nll"),
                     bits_per_byte=summary.get("bits_per_byte"))
    return entry


def run_sweep(config: ScoreJobConfig, log: Callable[[str], None] = print_to_stderr) -> dict[str, Any]:
    """Runs (or resumes) the job once per checkpoint of ``config.models``; returns the sweep summary."""
    from neox_ray.batch.runner import JobError, _shutdown, connect_ray, run_job

    models = list(config.models or [])
    if config.dry_run is not None:
        raise JobError("dry_run with several models: dry-run one --model at a time")
    names = [checkpoint_dir_name(ref) for ref in models]
    if len(set(names)) != len(names):
        raise JobError(f"models {models} repeat a checkpoint (subdirectories {names})")
    output = OutputDir(config.output)
    output.check_writable()
    revision = config.engine.get("revision")
    jobs = [config.model_copy(update={"model": ref, "models": None, "output": f"{config.output.rstrip('/')}/{name}"})
            for ref, name in zip(models, names, strict=True)]
    started_ray = False
    entries = []
    try:
        for index, (ref, job) in enumerate(zip(models, jobs, strict=True)):
            log(f"[sweep] checkpoint {index + 1}/{len(models)}: {ref} -> {job.output}")
            if not started_ray and not (OutputDir(job.output).exists(SUCCESS)):
                started_ray = connect_ray(config)  # one Ray for every checkpoint (run_job reuses it)
            entries.append(sweep_entry(ref, revision, run_job(job, log)))
    finally:
        _shutdown(started_ray)
    output.write_text_atomic(SWEEP_JSON, json.dumps(entries, indent=2))
    plotted = write_sweep_plot(output, entries, log)
    if output.exists(TMP):
        output.filesystem.delete_dir(output.path(TMP))
    return {"kind": "score", "sweep": entries, "output": config.output, "plot": SWEEP_PNG if plotted else None}


def _metric(entries: list[dict[str, Any]]) -> str:
    return "mean_logprob" if entries and "mean_logprob" in entries[0] else "perplexity"


def write_sweep_plot(output: OutputDir, entries: list[dict[str, Any]], log: Callable[[str], None]) -> bool:
    """``sweep.png``: the metric per checkpoint, one line per model; ``stepN`` revisions on a log x axis
    (symlog, so step0 shows), anything else in the order given. False (and a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"[sweep] matplotlib is not installed: skipping {SWEEP_PNG} ({SWEEP_JSON} has the numbers)")
        return False
    metric = _metric(entries)
    steps = [_STEP.match(e["revision"] or "") for e in entries]
    figure, axes = plt.subplots(figsize=(7, 4))
    if entries and all(steps):
        for model in dict.fromkeys(e["model"] for e in entries):
            points = sorted((int(m.group(1)), e[metric]) for e, m in zip(entries, steps, strict=True)
                            if m and e["model"] == model and e[metric] is not None)
            axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=model)
        axes.set_xscale("symlog", linthresh=1)
        axes.set_xlabel("training step (revision)")
    else:
        labels = [e["model"].rstrip("/").rsplit("/", 1)[-1] + (f"@{e['revision']}" if e["revision"] else "")
                  for e in entries]
        axes.plot(range(len(entries)), [e[metric] for e in entries], marker="o")
        axes.set_xticks(range(len(entries)), labels, rotation=30, ha="right")
        axes.set_xlabel("checkpoint")
    axes.set_ylabel(metric.replace("_", " "))
    if metric == "perplexity":
        axes.set_yscale("log")
    axes.grid(True, alpha=0.3)
    if entries and all(steps) and len({e["model"] for e in entries}) > 1:
        axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    with output.filesystem.open_output_stream(output.path(SWEEP_PNG)) as stream:
        stream.write(buffer.getvalue())
    return True


def format_sweep(summary: dict[str, Any]) -> str:
    entries = summary["sweep"]
    metric = _metric(entries)
    lines = [f"== score sweep complete: {len(entries)} checkpoint(s) in {summary['output']}"]
    for entry in entries:
        value = entry.get(metric)
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        name = entry["model"] + (f"@{entry['revision']}" if entry["revision"] else "")
        lines.append(f"   {name}: {metric.replace('_', ' ')} {shown} | tokens {entry['num_tokens']} | "
                     f"rows ok {entry['rows_ok']}, failed {entry['rows_failed']}")
    lines.append(f"   {SWEEP_JSON}" + (f", {summary['plot']}" if summary.get("plot") else " (no plot: no matplotlib)"))
    return "\n".join(lines)
