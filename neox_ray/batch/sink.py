"""The output side of a batch job: atomic per-block commits, resume, final verification, summary and marker.

Layout of an output directory::

    part-<hash of the block's ids>.parquet   committed blocks (the only files that count)
    _tmp/                                    blocks being written; cleared when a run starts
    _job.json                                what produced the output (a rerun must match it to resume)
    summary.json                             corpus-level results, written by the run that completes
    _SUCCESS                                 written last: the file list and row counts

A block is written under ``_tmp/`` and renamed into place, so a reader (or a rerun) never sees half a
file. Its name is a hash of its ids: a commit task that Ray retries after it already renamed its file
rewrites the same name with the same content instead of adding a duplicate. All samples of an input row
are in one file, so "id committed" means "every sample of it committed". A rerun with the same output
directory reads the committed ids and the read skips them. :func:`finalize` checks that every input id is
present exactly once (dropping any duplicate that slipped through from a later file) before it writes the
summary and the marker.

Before anything runs, :meth:`OutputDir.start` checks that the output path can be used (not an existing file,
creatable, writable) and fails with :class:`OutputError` naming the path. An input with 0 rows finishes at
once (:func:`finish_empty_input`): an empty result (summary.json and _SUCCESS with zero counts, no part
files) and exit code 0, like a Ray Data pipeline over an empty dataset; nothing starts Ray or loads a model.

What goes into each row is decided by :mod:`neox_ray.batch.stages`; this module only stores rows.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import posixpath
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from neox_ray.batch.source import ID, InputPlan, resolve_filesystem
from neox_ray.batch.stages import engine_span, format_generation, format_scores

SUCCESS = "_SUCCESS"
SUMMARY = "summary.json"
JOB = "_job.json"
TMP = "_tmp"
PART_PREFIX = "part-"


class OutputError(RuntimeError):
    """The output directory cannot be used (a file, not writable, another job's output) or is not complete
    after the run."""


@dataclass
class OutputDir:
    uri: str

    def __post_init__(self) -> None:
        self.filesystem, self.root = resolve_filesystem(self.uri)

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def exists(self, name: str) -> bool:
        try:
            return self.filesystem.get_file_info(self.path(name)).type != pafs.FileType.NotFound
        except OSError as exc:
            raise OutputError(f"cannot access output {self.uri}: {_reason(exc)}") from None

    def part_files(self) -> list[str]:
        if self.filesystem.get_file_info(self.root).type == pafs.FileType.NotFound:
            return []
        listing = self.filesystem.get_file_info(pafs.FileSelector(self.root, recursive=False))
        return sorted(i.path for i in listing if i.type == pafs.FileType.File
                      and posixpath.basename(i.path).startswith(PART_PREFIX) and i.path.endswith(".parquet"))

    def read_text(self, name: str) -> str:
        with self.filesystem.open_input_stream(self.path(name)) as stream:
            return stream.read().decode()

    def write_text_atomic(self, name: str, text: str) -> None:
        tmp = self.path(f"{TMP}/{name}.{uuid.uuid4().hex}")
        self.filesystem.create_dir(self.path(TMP), recursive=True)
        with self.filesystem.open_output_stream(tmp) as stream:
            stream.write(text.encode())
        self.filesystem.move(tmp, self.path(name))

    def write_table_atomic(self, name: str, table: pa.Table) -> None:
        tmp = self.path(f"{TMP}/{name}.{uuid.uuid4().hex}")
        self.filesystem.create_dir(self.path(TMP), recursive=True)
        pq.write_table(table, tmp, filesystem=self.filesystem)
        self.filesystem.move(tmp, self.path(name))

    # ---- run start ---------------------------------------------------------------------------------------
    def start(self, job_identity: dict[str, Any]) -> pa.Array | None:
        """Checks that this directory is new or holds this same job, clears stale temporaries, and returns
        the ids committed by earlier runs (None when there are none)."""
        self.check_writable()
        if self.exists(JOB):
            previous = json.loads(self.read_text(JOB))
            changed = [f"{k}: {previous.get(k)!r} then, {v!r} now" for k, v in job_identity.items()
                       if previous.get(k) != v]
            if changed:
                raise OutputError(f"output {self.uri} holds another job's results ({'; '.join(changed)}); "
                                  "use a new output path, or delete this one to start over")
        else:
            self.write_text_atomic(JOB, json.dumps(job_identity, indent=2, sort_keys=True, default=str))
        if self.exists(TMP):
            self.filesystem.delete_dir_contents(self.path(TMP))  # half-written blocks of a killed run
        ids = [self._read_ids(path) for path in self.part_files()]
        return pa.chunked_array(ids).combine_chunks() if ids else None

    def check_writable(self) -> None:
        """Creates the directory if missing and writes (then deletes) a probe file in it, so a path under a
        file, a read-only mount or a missing permission fails here, before Ray starts, and not in the first
        commit task after the model loaded. (A probe, not ``os.access``: root passes every access check, and
        object stores have no permission bits to read.)"""
        if self.filesystem.get_file_info(self.root).type == pafs.FileType.File:
            raise OutputError(f"output {self.uri} is an existing file; the output must be a directory (it is "
                              "created if missing)")
        probe = self.path(f"{TMP}/_write_probe.{uuid.uuid4().hex}")
        try:
            self.filesystem.create_dir(self.path(TMP), recursive=True)
            with self.filesystem.open_output_stream(probe) as stream:
                stream.write(b"")
            self.filesystem.delete_file(probe)
        except OSError as exc:
            raise OutputError(f"output directory {self.uri} is not writable: {_reason(exc)}") from None

    def _read_ids(self, path: str) -> pa.Array:
        try:
            return pq.read_table(path, columns=[ID], filesystem=self.filesystem).column(ID).combine_chunks()
        except Exception as exc:
            raise OutputError(f"committed output file {path} is unreadable ({exc}); delete it and rerun") from None


def read_output(uri: str, columns: list[str] | None = None) -> pa.Table:
    """All committed rows of an output directory. (``pq.read_table(dir)`` would also try ``summary.json``;
    ``ray.data.read_parquet(dir)`` filters by extension and works as is.)"""
    output = OutputDir(uri)
    tables = [pq.read_table(path, columns=columns, filesystem=output.filesystem) for path in output.part_files()]
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})


def _reason(exc: OSError) -> str:
    """The short cause of a filesystem error ("Not a directory", "Permission denied"), else its message."""
    if exc.errno in (errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EEXIST):
        reason = os.strerror(exc.errno)
        return f"{reason} (a parent of it is a file)" if exc.errno == errno.ENOTDIR else reason
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# ---- commit (CPU task) -----------------------------------------------------------------------------------
def block_file_name(ids: pa.ChunkedArray | pa.Array) -> str:
    digest = hashlib.sha1("\x00".join(sorted(str(v) for v in ids.to_pylist())).encode()).hexdigest()[:20]
    return f"{PART_PREFIX}{digest}.parquet"


def commit_block(batch: pa.Table, *, output: str, kind: str, num_samples: int,
                 top_logprobs: int | None = None) -> pa.Table:
    """Formats a block of engine output, writes it atomically, and returns one row of counts (for progress)."""
    span = engine_span(batch)
    table = format_generation(batch, num_samples, top_logprobs) if kind == "generate" else format_scores(batch)
    name = block_file_name(batch.column(ID))
    OutputDir(output).write_table_atomic(name, table)
    stats: dict[str, Any] = {
        "file": name, "rows": batch.num_rows,
        "errors": pc.count(batch.column("error"), mode="only_valid").as_py(),
        "engine_start": span[0] if span else None, "engine_end": span[1] if span else None,
    }
    ok = table.filter(pc.is_null(table.column("error")))
    if kind == "generate":
        stats["prompt_tokens"] = _sum(ok.column("num_prompt_tokens"))
        stats["generated_tokens"] = _sum(ok.column("num_generated_tokens"))
    else:
        stats["prompt_tokens"] = _sum(ok.column("num_tokens"))
        stats["generated_tokens"] = 0
    return pa.table({k: [v] for k, v in stats.items()})


def _sum(column: pa.ChunkedArray) -> int:
    value = pc.sum(column).as_py()
    return int(value or 0)


# ---- finish ----------------------------------------------------------------------------------------------
def finalize(output: OutputDir, plan: InputPlan, kind: str, num_samples: int,
             run_stats: dict[str, Any], score_mode: str = "perplexity") -> dict[str, Any]:
    """Verifies every input id is present exactly once, writes summary.json and then _SUCCESS."""
    files = output.part_files()
    if kind == "generate":
        value_columns = ["num_prompt_tokens", "num_generated_tokens"]
    elif score_mode == "loglikelihood":
        value_columns = ["num_tokens", "logprob", "is_greedy"]
    else:
        value_columns = ["num_tokens", "nll", "num_bytes", "num_words"]
    tables = []
    for index, path in enumerate(files):
        table = pq.read_table(path, columns=[ID, "error", *value_columns], filesystem=output.filesystem)
        tables.append(table.append_column("__file", pa.array([index] * table.num_rows, type=pa.int32())))
    if tables:
        rows = pa.concat_tables(tables)
        rows, removed = _drop_duplicate_ids(output, files, rows, num_samples)
        _check_complete(output, plan, rows, num_samples)
    elif plan.total_rows == 0:  # an empty input has an empty result: the counts below all come out 0
        rows = pa.table({ID: pa.array([], pa.string()), "error": pa.array([], pa.string()),
                         **{name: pa.array([], pa.bool_() if name == "is_greedy" else pa.float64())
                            for name in value_columns}})
        removed = 0
    else:
        raise OutputError(f"output {output.uri} has no committed files")

    num_failed = pc.count(rows["error"], mode="only_valid").as_py() // num_samples  # errors repeat per sample
    summary: dict[str, Any] = {"kind": kind, "rows": plan.total_rows, "output_rows": rows.num_rows,
                               "rows_ok": plan.total_rows - num_failed, "rows_failed": num_failed,
                               "files": len(files) - removed, "duplicates_removed": run_stats.pop("duplicates", 0)}
    ok = rows.filter(pc.is_null(rows["error"]))
    if kind == "generate":
        summary["samples_per_row"] = num_samples
        summary["prompt_tokens"] = _sum(ok["num_prompt_tokens"])
        summary["generated_tokens"] = _sum(ok["num_generated_tokens"])
    elif score_mode == "loglikelihood":
        summary.update(loglikelihood_summary(ok))
    else:
        nll, tokens = float(pc.sum(ok["nll"]).as_py() or 0.0), _sum(ok["num_tokens"])
        num_bytes, words = _sum(ok["num_bytes"]), _sum(ok["num_words"])
        summary.update(num_tokens=tokens, nll=nll, num_bytes=num_bytes, num_words=words,
                       perplexity=_exp(nll / tokens) if tokens else None,
                       bits_per_byte=nll / (num_bytes * math.log(2)) if num_bytes else None,
                       word_perplexity=_exp(nll / words) if words else None,
                       byte_perplexity=_exp(nll / num_bytes) if num_bytes else None)
    summary.update(run_stats)
    output.write_text_atomic(SUMMARY, json.dumps(summary, indent=2, default=str))
    output.filesystem.delete_dir(output.path(TMP))  # empty now: every temporary was renamed into place
    manifest = {"files": [posixpath.basename(p) for p in output.part_files()], "rows": plan.total_rows,
                "output_rows": rows.num_rows}
    with output.filesystem.open_output_stream(output.path(SUCCESS)) as stream:  # last, and tiny
        stream.write(json.dumps(manifest, indent=2).encode())
    return summary


def loglikelihood_summary(ok: pa.Table) -> dict[str, Any]:
    """Totals over the rows that scored: no accuracy (which rows are the right answers is the task's)."""
    logprob, tokens = float(pc.sum(ok["logprob"]).as_py() or 0.0), _sum(ok["num_tokens"])
    rows = ok.num_rows
    return {"mode": "loglikelihood", "num_tokens": tokens, "logprob": logprob,
            "mean_logprob": logprob / rows if rows else None,
            "mean_token_logprob": logprob / tokens if tokens else None,
            "greedy_rows": int(pc.sum(pc.cast(ok["is_greedy"], pa.int64())).as_py() or 0)}


def finish_empty_input(output_uri: str, dry_run: bool, plan: InputPlan, kind: str, job_identity: dict[str, Any],
                       log: Callable[[str], None]) -> dict[str, Any]:
    """A 0-row input: nothing to run, so no Ray and no model. A real run still claims the output directory
    (so the same checks as for any run apply) and writes an empty result: summary.json and _SUCCESS with
    zero counts. A dry run writes nothing and reports 0 rows."""
    files = f"{len(plan.files)} file(s)"
    if dry_run:
        log(f"[{kind}] dry run: the input has 0 rows ({files}); nothing to sample")
        return {"kind": kind, "dry_run_rows": 0, "errors": 0, "total_rows": 0, "projected_wall_time_s": 0.0}
    output = OutputDir(output_uri)
    output.start(job_identity)
    num_samples = int(job_identity.get("sampling", {}).get("n", 1)) if kind == "generate" else 1
    summary = finalize(output, plan, kind, num_samples, {"wall_time_s": 0.0, "rows_this_run": 0,
                                                         "rows_resumed": 0},
                       score_mode=str(job_identity.get("mode", "perplexity")))
    log(f"[{kind}] the input has 0 rows ({files}); wrote an empty result to {output_uri}")
    return summary


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _drop_duplicate_ids(output: OutputDir, files: list[str], rows: pa.Table,
                        num_samples: int) -> tuple[pa.Table, int]:
    """Keeps each id in the first file (by name) holding it and rewrites later files without it. Returns the
    remaining rows and the number of files that became empty and were deleted."""
    first_file = rows.group_by(ID).aggregate([("__file", "min"), ("__file", "count_distinct")])
    duplicated = first_file.filter(pc.greater(first_file["__file_count_distinct"], 1))
    if not duplicated.num_rows:
        return rows, 0
    keep_in = dict(zip(duplicated[ID].to_pylist(), duplicated["__file_min"].to_pylist(), strict=True))
    dup_ids = duplicated[ID]
    removed = 0
    for index, path in enumerate(files):
        table = pq.read_table(path, filesystem=output.filesystem)
        mine = pc.is_in(table[ID], value_set=dup_ids)
        drop = [keep_in[v] != index if m else False
                for v, m in zip(table[ID].to_pylist(), mine.to_pylist(), strict=True)]
        if not any(drop):
            continue
        kept = table.filter(pc.invert(pa.array(drop)))
        if kept.num_rows:
            output.write_table_atomic(posixpath.basename(path), kept)
        else:
            output.filesystem.delete_file(path)
            removed += 1
    is_dup = pc.is_in(rows[ID], value_set=dup_ids).to_pylist()
    files_of = rows["__file"].to_pylist()
    keep_mask = [not d or keep_in[v] == f for v, d, f in zip(rows[ID].to_pylist(), is_dup, files_of, strict=True)]
    return rows.filter(pa.array(keep_mask)), removed


def _check_complete(output: OutputDir, plan: InputPlan, rows: pa.Table, num_samples: int) -> None:
    counts = rows.group_by(ID).aggregate([(ID, "count")])
    wrong = counts.filter(pc.not_equal(counts[f"{ID}_count"], num_samples))
    if wrong.num_rows:
        raise OutputError(f"{wrong.num_rows} id(s) have a wrong number of output rows (expected {num_samples}), "
                          f"e.g. {wrong[ID][0].as_py()!r}")
    found = counts[ID]
    problems = []
    if plan.ids is not None:
        missing = pc.sum(pc.invert(pc.is_in(plan.ids, value_set=found))).as_py() or 0
        unexpected = pc.sum(pc.invert(pc.is_in(found, value_set=plan.ids.combine_chunks()))).as_py() or 0
        if missing:
            problems.append(f"{missing} input id(s) have no output row")
        if unexpected:
            problems.append(f"{unexpected} output id(s) are not in the input (did the input change?)")
    elif len(found) != plan.total_rows:
        problems.append(f"{len(found)} ids in the output for {plan.total_rows} input rows (did the input change?)")
    if problems:
        raise OutputError(f"output {output.uri} is incomplete: {'; '.join(problems)}. Rerun the same command to "
                          "resume; committed rows are kept")
