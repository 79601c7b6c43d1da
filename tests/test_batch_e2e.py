"""Batch jobs end to end on the session's local Ray: outputs equal ``LLM``'s, bad rows become error rows,
and neither a killed engine actor nor a killed driver loses or duplicates an id."""

from __future__ import annotations

import hashlib
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from neox_ray.batch.config import validate_job_config
from neox_ray.batch.runner import run_job
from neox_ray.batch.sink import read_output
from neox_ray.batch.stages import row_seed
from neox_ray.engine.sampling_params import SamplingParams

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "ray", "data", "reads",
         "parquet", "files"]
ENGINE = {"device": "cpu", "dtype": "float32", "max_num_seqs": 32}
REPLICAS = {"num_replicas": 2, "num_cpus": 0.5, "batch_size": 8, "max_concurrent_batches": 2}


def _prompt(i: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(2 + i % 6))


def _quiet(_line: str) -> None:
    pass


def _generate_config(checkpoint: Path, input_path: Path, output: Path, **extra) -> object:
    raw = {"model": str(checkpoint), "input": str(input_path), "output": str(output), "seed": 11,
           "sampling": {"max_tokens": 6, "temperature": 0.9}, "engine": ENGINE, "replicas": REPLICAS,
           "rows_per_block": 16, "rows_per_file": 24, "progress_interval_s": 1000.0}
    raw.update(extra)
    return validate_job_config("generate", raw)


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 rows in two files (no id column) with every kind of bad row and per-row overrides."""
    directory = tmp_path_factory.mktemp("prompts")
    prompts: list = [_prompt(i) for i in range(200)]
    prompts[3], prompts[4], prompts[5] = None, "", "fox " * 400            # null, empty, too long
    max_tokens = [None] * 200
    max_tokens[6], max_tokens[9] = 0, 3                                      # invalid, valid override
    temperature = [None] * 200
    temperature[7], temperature[10] = -1.0, 0.0                              # invalid, greedy override
    stop: list = [None] * 200
    stop[8] = [""]                                                            # invalid stop
    table = pa.table({"prompt": prompts, "max_tokens": pa.array(max_tokens, pa.int64()),
                      "temperature": pa.array(temperature, pa.float64()),
                      "stop": pa.array(stop, pa.list_(pa.string())), "group": [i % 3 for i in range(200)]})
    pq.write_table(table.slice(0, 120), directory / "a.parquet", row_group_size=50)
    pq.write_table(table.slice(120), directory / "b.parquet")
    return directory


def test_generate_end_to_end_matches_llm(ray_session, tiny_checkpoint: Path, prompts_dir: Path,
                                         tmp_path: Path) -> None:
    config = _generate_config(tiny_checkpoint, prompts_dir, tmp_path / "out")
    summary = run_job(config, log=_quiet)
    out = read_output(str(tmp_path / "out"))
    source = pa.concat_tables([pq.read_table(prompts_dir / "a.parquet"), pq.read_table(prompts_dir / "b.parquet")])

    assert out.num_rows == 200 and summary["rows"] == 200
    expected_ids = [f"a.parquet:{i}" for i in range(120)] + [f"b.parquet:{i}" for i in range(80)]
    assert sorted(out.column("id").to_pylist()) == sorted(expected_ids)
    assert out.column_names == ["prompt", "max_tokens", "temperature", "stop", "group", "id", "generated_text",
                                "num_prompt_tokens", "num_generated_tokens", "finish_reason", "error"]
    rows = {r["id"]: r for r in out.to_pylist()}
    for position, source_row in enumerate(source.to_pylist()):  # pass-through columns unchanged
        row = rows[expected_ids[position]]
        assert {k: row[k] for k in source_row} == source_row

    def error(i: int) -> str | None:
        return rows[expected_ids[i]]["error"]

    assert error(3) == "prompt is null" and error(4) == "prompt is empty"
    assert "exceeds max_model_len" in error(5)
    assert "max_tokens must be >= 1" in error(6) and "temperature must be >= 0" in error(7)
    assert "stop strings must not be empty" in error(8)
    assert summary["rows_failed"] == 6 and summary["rows_ok"] == 194

    # Same rows, same seeds, through LLM.generate in this process: identical text.
    from neox_ray.llm import LLM

    llm = LLM(str(tiny_checkpoint), **ENGINE)
    ok = [i for i in range(200) if error(i) is None]
    defaults = SamplingParams(max_tokens=6, temperature=0.9)
    params = []
    for i in ok:
        overrides = {k: source.column(k)[i].as_py() for k in ("max_tokens", "temperature")}
        params.append(defaults.with_overrides(seed=row_seed(11, expected_ids[i]), **overrides))
    results = llm.generate([source.column("prompt")[i].as_py() for i in ok], params)
    for i, result in zip(ok, results, strict=False):
        row = rows[expected_ids[i]]
        assert row["generated_text"] == result.outputs[0].text, expected_ids[i]
        assert row["num_generated_tokens"] == len(result.outputs[0].token_ids)
        assert row["finish_reason"] == result.outputs[0].finish_reason
        assert row["num_prompt_tokens"] == len(result.prompt_token_ids)
    assert rows[expected_ids[9]]["num_generated_tokens"] <= 3
    assert summary["generated_tokens"] == sum(r["num_generated_tokens"] or 0 for r in rows.values())


def test_generate_n_samples_and_given_ids(ray_session, tiny_checkpoint: Path, tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": [100 + i for i in range(12)], "prompt": [_prompt(i) for i in range(12)]}),
                   tmp_path / "in.parquet")
    config = _generate_config(tiny_checkpoint, tmp_path / "in.parquet", tmp_path / "out",
                              sampling={"max_tokens": 4, "temperature": 1.0, "n": 3},
                              replicas={**REPLICAS, "num_replicas": 1})
    run_job(config, log=_quiet)
    out = read_output(str(tmp_path / "out")).sort_by([("id", "ascending"), ("sample_index", "ascending")])
    assert out.num_rows == 36 and out.schema.field("id").type == pa.int64()
    assert out.column("sample_index").to_pylist() == [0, 1, 2] * 12
    first = out.slice(0, 3).column("generated_text").to_pylist()
    assert len(set(first)) > 1  # distinct seeds per sample
    # Rerunning the finished job is a no-op.
    assert run_job(config, log=_quiet)["rows"] == 12


def test_score_end_to_end_matches_llm_and_summary(ray_session, tiny_checkpoint: Path, tmp_path: Path) -> None:
    texts: list = [" ".join(_prompt(i + k) for k in range(1 + i % 8)) for i in range(40)]
    texts[2], texts[5] = None, ""
    pq.write_table(pa.table({"doc": [f"d{i}" for i in range(40)], "text": texts}), tmp_path / "texts.parquet")
    config = validate_job_config("score", {
        "model": str(tiny_checkpoint), "input": str(tmp_path / "texts.parquet"), "output": str(tmp_path / "out"),
        "id_column": "doc", "window": 32, "stride": 16, "engine": ENGINE, "replicas": REPLICAS,
        "rows_per_block": 8, "rows_per_file": 16, "progress_interval_s": 1000.0})
    summary = run_job(config, log=_quiet)
    out = read_output(str(tmp_path / "out"))
    rows = {r["id"]: r for r in out.to_pylist()}
    assert out.num_rows == 40 and rows["d2"]["error"] == "text is null" and rows["d5"]["error"] == "text is empty"
    for column in ("num_tokens", "nll", "perplexity", "bits_per_byte", "word_perplexity", "byte_perplexity"):
        assert column in out.column_names

    from neox_ray.llm import LLM

    ok = [i for i in range(40) if texts[i]]
    scores = LLM(str(tiny_checkpoint), **ENGINE).score([texts[i] for i in ok], window=32, stride=16)
    for i, score in zip(ok, scores, strict=False):
        row = rows[f"d{i}"]
        assert row["num_tokens"] == score.num_tokens and row["error"] is None
        for name in ("nll", "perplexity", "bits_per_byte", "word_perplexity", "byte_perplexity"):
            assert math.isclose(row[name], getattr(score, name), rel_tol=1e-6), (i, name)
    nll, tokens = sum(s.nll for s in scores), sum(s.num_tokens for s in scores)
    assert summary["rows_ok"] == 38 and summary["rows_failed"] == 2 and summary["num_tokens"] == tokens
    assert math.isclose(summary["perplexity"], math.exp(nll / tokens), rel_tol=1e-9)
    assert math.isclose(summary["bits_per_byte"], nll / (sum(s.num_bytes for s in scores) * math.log(2)),
                        rel_tol=1e-9)


def test_dry_run_projects_and_writes_nothing(ray_session, tiny_checkpoint: Path, prompts_dir: Path,
                                             tmp_path: Path) -> None:
    lines: list[str] = []
    report = run_job(_generate_config(tiny_checkpoint, prompts_dir, tmp_path / "out", dry_run=10), log=lines.append)
    assert report["dry_run_rows"] == 10 and report["total_rows"] == 200 and report["replicas"] == 2
    assert report["projected_wall_time_s"] > 0
    assert any("projected wall time for 200 rows on 2 replica(s)" in line for line in lines)
    assert not (tmp_path / "out").exists()


def _engine_actor_pids() -> list[int]:
    import psutil

    pids = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if "GenerateEngineStage" in " ".join(process.info["cmdline"] or []) and process.pid != os.getpid():
            pids.append(process.pid)
    return pids


def _assert_each_id_once(output: Path, expected: int) -> list[str]:
    ids = read_output(str(output), columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == expected
    return ids


def test_killed_engine_actor_is_restarted_and_rows_redone(ray_session, tiny_checkpoint: Path, tmp_path: Path) -> None:
    pq.write_table(pa.table({"prompt": [_prompt(i) for i in range(160)]}), tmp_path / "in.parquet")
    config = _generate_config(tiny_checkpoint, tmp_path / "in.parquet", tmp_path / "out",
                              sampling={"max_tokens": 12}, rows_per_file=8)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(summary=run_job(config, log=_quiet)), daemon=True)
    runner.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and runner.is_alive():
        pids = _engine_actor_pids()
        if pids and list((tmp_path / "out").glob("part-*.parquet")):
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    runner.join(timeout=240)
    assert killed is not None, "the job ended before an engine actor could be killed"
    assert not runner.is_alive() and result["summary"]["rows"] == 160
    _assert_each_id_once(tmp_path / "out", 160)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_killed_driver_resumes_without_touching_committed_files(ray_session, tiny_checkpoint: Path,
                                                               tmp_path: Path) -> None:
    pq.write_table(pa.table({"prompt": [_prompt(i) for i in range(160)]}), tmp_path / "in.parquet")
    output = tmp_path / "out"
    args = [sys.executable, str(REPO / "jobs" / "generate.py"), "--model", str(tiny_checkpoint),
            "--input", str(tmp_path / "in.parquet"), "--output", str(output), "--max-tokens", "12",
            "--seed", "11", "--num-replicas", "1", "--num-cpus-per-replica", "0.5", "--device", "cpu",
            "--batch-size", "8", "--rows-per-file", "8",
            "--ray-address", ray_session.get_runtime_context().gcs_address]
    driver = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            if len(list(output.glob("part-*.parquet"))) >= 2:
                break
            time.sleep(0.1)
        assert driver.poll() is None, "the driver finished (or failed) before it could be killed"
        os.kill(driver.pid, signal.SIGKILL)
    finally:
        driver.wait(timeout=30)
    time.sleep(2)  # let Ray reap the dead driver's workers
    committed = {p.name: (p.stat().st_mtime_ns, _digest(p)) for p in output.glob("part-*.parquet")}
    assert committed and not (output / "_SUCCESS").exists()

    config = _generate_config(tiny_checkpoint, tmp_path / "in.parquet", output, sampling={"max_tokens": 12},
                              rows_per_file=8)
    summary = run_job(config, log=_quiet)
    assert summary["rows_resumed"] >= 8 and summary["rows_this_run"] == 160 - summary["rows_resumed"]
    _assert_each_id_once(output, 160)
    for name, (mtime, digest) in committed.items():
        assert (output / name).stat().st_mtime_ns == mtime and _digest(output / name) == digest
