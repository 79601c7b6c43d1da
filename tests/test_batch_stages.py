"""Batch stages and the output directory, without Ray: validation into error rows, seeds, samples, commits."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from neox_ray.batch.sink import OutputDir, OutputError, block_file_name, commit_block, finalize
from neox_ray.batch.source import IdentifiedParquetDatasource, plan_input
from neox_ray.batch.stages import FINISH_REASONS, NUM_GENERATED, TEXTS, format_generation, prepare_generation, row_seed


def test_row_seed_depends_only_on_job_seed_and_id() -> None:
    assert row_seed(0, "a") == row_seed(0, "a")
    assert len({row_seed(0, "a"), row_seed(0, "b"), row_seed(1, "a")}) == 3
    assert 0 <= row_seed(123, 10**12) < 2**40


def test_prepare_turns_bad_rows_into_errors(tiny_checkpoint: Path) -> None:
    batch = pa.table({
        "prompt": ["hello", None, "", "hello " * 400, "hi", "hi", "hi", "hi"],
        "max_tokens": pa.array([None, None, None, None, -3, 5.0, None, None], pa.float64()),
        "stop": [None, None, None, None, None, None, [""], ["x"]],
        "id": [f"r{i}" for i in range(8)],
    })
    out = prepare_generation(batch, model=str(tiny_checkpoint), prompt_column="prompt",
                             sampling={"max_tokens": 8}, job_seed=3, max_model_len=256)
    errors = out.column("error").to_pylist()
    assert errors[0] is None and errors[5] is None and errors[7] is None
    assert errors[1] == "prompt is null" and errors[2] == "prompt is empty"
    assert "exceeds max_model_len=256" in errors[3]
    assert "max_tokens must be >= 1" in errors[4] and "stop strings must not be empty" in errors[6]
    params = [json.loads(p) if p else None for p in out.column("__neox_sampling").to_pylist()]
    assert params[5]["max_tokens"] == 5  # a float64 column (pandas + nulls) still gives an integer
    assert params[0]["seed"] == row_seed(3, "r0") and params[7]["stop"] == ["x"]


def _engine_output(ids: list[str], texts: list[list[str] | None]) -> pa.Table:
    return pa.table({
        "prompt": [f"p{i}" for i in ids], "id": ids,
        "num_prompt_tokens": pa.array([3] * len(ids), pa.int64()),
        "error": [None if t is not None else "bad" for t in texts],
        TEXTS: pa.array(texts, pa.list_(pa.string())),
        NUM_GENERATED: pa.array([[len(s) for s in t] if t else None for t in texts], pa.list_(pa.int64())),
        FINISH_REASONS: pa.array([["length"] * len(t) if t else None for t in texts], pa.list_(pa.string())),
    })


def test_format_gives_one_row_per_sample_even_for_errors() -> None:
    table = format_generation(_engine_output(["a", "b"], [["x", "yy"], None]), num_samples=2)
    assert table.column_names == ["prompt", "id", "generated_text", "num_prompt_tokens", "num_generated_tokens",
                                  "finish_reason", "error", "sample_index"]
    assert table.column("id").to_pylist() == ["a", "a", "b", "b"]
    assert table.column("sample_index").to_pylist() == [0, 1, 0, 1]
    assert table.column("generated_text").to_pylist() == ["x", "yy", None, None]
    assert table.column("error").to_pylist() == [None, None, "bad", "bad"]
    assert "sample_index" not in format_generation(_engine_output(["a"], [["x"]]), num_samples=1).column_names


def test_commit_is_atomic_named_by_ids_and_finalize_dedupes(tmp_path: Path) -> None:
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["p0", "p1", "p2"], "id": ["a", "b", "c"]}), src)
    plan = plan_input(str(src), "prompt", "id", ())
    out = OutputDir(str(tmp_path / "out"))
    assert out.start({"kind": "generate"}) is None
    first = commit_block(_engine_output(["a", "b"], [["x"], ["y"]]), output=out.uri, kind="generate", num_samples=1)
    again = commit_block(_engine_output(["b", "a"], [["y"], ["x"]]), output=out.uri, kind="generate", num_samples=1)
    assert first["file"].to_pylist() == again["file"].to_pylist() == [block_file_name(pa.array(["a", "b"]))]
    assert len(out.part_files()) == 1  # a retried commit replaces its own file
    with pytest.raises(OutputError, match="1 input id"):
        finalize(out, plan, "generate", 1, {})
    # A block that overlaps a committed one (e.g. re-batched after a retry): finalize keeps the first copy.
    commit_block(_engine_output(["b", "c"], [["y2"], ["z"]]), output=out.uri, kind="generate", num_samples=1)
    summary = finalize(out, plan, "generate", 1, {})
    rows = pa.concat_tables([pq.read_table(p) for p in out.part_files()])
    assert sorted(rows.column("id").to_pylist()) == ["a", "b", "c"]
    assert summary["rows"] == 3 and summary["rows_failed"] == 0 and (tmp_path / "out" / "_SUCCESS").exists()
    assert not list((tmp_path / "out").glob("_tmp"))
    OutputDir(str(tmp_path / "out2")).start({"kind": "generate", "seed": 1})
    with pytest.raises(OutputError, match="another job's results"):
        OutputDir(str(tmp_path / "out2")).start({"kind": "generate", "seed": 2})


def test_read_derives_ids_from_file_and_position_and_skips_committed(tmp_path: Path) -> None:
    (tmp_path / "in" / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(5)]}), tmp_path / "in" / "sub" / "a.parquet",
                   row_group_size=2)
    pq.write_table(pa.table({"prompt": ["q0"], "extra": [1]}), tmp_path / "in" / "b.parquet")
    plan = plan_input(str(tmp_path / "in"), "prompt", "id", ())
    assert plan.total_rows == 6 and plan.id_column is None
    source = IdentifiedParquetDatasource(plan, rows_per_block=10, skip_ids=pa.array(["sub/a.parquet:3"]))
    from neox_ray.batch.source import _read_unit

    blocks = [b for unit in source.units() for b in _read_unit(plan, unit, 10, None)]
    ids = [i for b in blocks for i in b.column("id").to_pylist()]
    assert ids == ["b.parquet:0", "sub/a.parquet:0", "sub/a.parquet:1", "sub/a.parquet:2", "sub/a.parquet:3",
                   "sub/a.parquet:4"]
    assert blocks[1].column("extra").to_pylist() == [None, None]  # unified schema across files
