"""Mistakes in a batch job's input, output or model path: one line ``error: ...`` on stderr and exit code 2,
found before Ray starts or a model loads; an input with 0 rows finishes at once with an empty result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from neox_ray import cli, loader
from neox_ray.batch import runner

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_ray_no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args, **_kwargs):
        raise AssertionError("neither Ray nor the model may start for this input")

    monkeypatch.setattr(runner, "connect_ray", refuse)
    monkeypatch.setattr(loader, "load_model", refuse)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    started = time.monotonic()
    code = cli.main(list(argv))
    assert time.monotonic() - started < 30
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize("kind, column, values, arrow_type", [
    ("generate", "prompt", [1, 2], "int64"),
    ("generate", "prompt", [b"a", b"b"], "binary"),
    ("generate", "prompt", [[1, 2], [3]], "int64"),  # Parquet names the list item "element"
    ("score", "text", [0.5, 1.5], "double"),
])
def test_text_column_of_the_wrong_type_names_column_and_type(tiny_checkpoint: Path, tmp_path: Path,
                                                             no_ray_no_model: None, capsys, kind: str,
                                                             column: str, values: list, arrow_type: str) -> None:
    source = write(tmp_path / "in.parquet", pa.table({column: values}))
    code, _, err = run_cli(capsys, kind, "--model", str(tiny_checkpoint), "--input", str(source),
                           "--output", str(tmp_path / "out"))
    assert code == 2
    assert_one_error_line(err, repr(column), arrow_type, str(source))
    assert not (tmp_path / "out").exists()


def test_all_null_text_column_is_refused(tiny_checkpoint: Path, tmp_path: Path, no_ray_no_model: None,
                                         capsys) -> None:
    source = write(tmp_path / "in.parquet", pa.table({"prompt": pa.nulls(3)}))
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_checkpoint), "--input", str(source),
                           "--output", str(tmp_path / "out"))
    assert code == 2
    assert_one_error_line(err, "'prompt'", "null")


def test_dictionary_encoded_strings_are_accepted_by_the_check(tmp_path: Path) -> None:
    from neox_ray.batch.source import plan_input

    categorical = pa.array(["a", "b", "a"]).dictionary_encode()
    plan = plan_input(str(write(tmp_path / "in.parquet", pa.table({"prompt": categorical}))), "prompt", "id", ())
    assert plan.total_rows == 3


def test_output_that_is_an_existing_file(tiny_checkpoint: Path, tmp_path: Path, no_ray_no_model: None,
                                         capsys) -> None:
    source = write(tmp_path / "in.parquet", pa.table({"prompt": ["a"]}))
    existing = tmp_path / "results.parquet"
    existing.write_bytes(b"someone's file")
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_checkpoint), "--input", str(source),
                           "--output", str(existing))
    assert code == 2
    assert_one_error_line(err, str(existing), "existing file")
    assert existing.read_bytes() == b"someone's file"


def test_output_under_a_file_is_not_writable(tiny_checkpoint: Path, tmp_path: Path, no_ray_no_model: None,
                                             capsys) -> None:
    # Works as root too (root ignores permission bits, but nobody can create a directory inside a file).
    source = write(tmp_path / "in.parquet", pa.table({"text": ["a"]}))
    (tmp_path / "a_file").write_text("x")
    code, _, err = run_cli(capsys, "score", "--model", str(tiny_checkpoint), "--input", str(source),
                           "--output", str(tmp_path / "a_file" / "out"))
    assert code == 2
    assert_one_error_line(err, str(tmp_path / "a_file" / "out"), "not writable", "Not a directory")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_output_in_a_read_only_directory_is_not_writable(tiny_checkpoint: Path, tmp_path: Path,
                                                         no_ray_no_model: None, capsys) -> None:
    source = write(tmp_path / "in.parquet", pa.table({"prompt": ["a"]}))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = run_cli(capsys, "generate", "--model", str(tiny_checkpoint), "--input", str(source),
                               "--output", str(locked / "out"))
    finally:
        locked.chmod(0o700)
    assert code == 2
    assert_one_error_line(err, str(locked / "out"), "not writable", "Permission denied")


def test_missing_model_directory_is_one_line_naming_it(tmp_path: Path, no_ray_no_model: None, capsys) -> None:
    source = write(tmp_path / "in.parquet", pa.table({"prompt": ["a"]}))
    missing = tmp_path / "no-such-model"
    code, _, err = run_cli(capsys, "generate", "--model", str(missing), "--input", str(source),
                           "--output", str(tmp_path / "out"))
    assert code == 2
    assert_one_error_line(err, str(missing))


@pytest.mark.parametrize("kind, column", [("generate", "prompt"), ("score", "text")])
def test_empty_input_finishes_at_once_with_an_empty_result(tiny_checkpoint: Path, tmp_path: Path,
                                                           no_ray_no_model: None, capsys, kind: str,
                                                           column: str) -> None:
    from neox_ray.batch.sink import read_output

    source = write(tmp_path / "in" / "part-0.parquet", pa.table({column: pa.array([], pa.string())}))
    output = tmp_path / "out"
    code, out, err = run_cli(capsys, kind, "--model", str(tiny_checkpoint), "--input", str(source.parent),
                             "--output", str(output))
    assert code == 0
    assert "0 rows" in err and "Traceback" not in err
    assert "0 rows" in out
    summary = json.loads((output / "summary.json").read_text())
    assert summary["rows"] == 0 and summary["rows_failed"] == 0 and summary["kind"] == kind
    assert (output / "_SUCCESS").is_file() and read_output(str(output)).num_rows == 0
    # a rerun is just as quick and gives the same answer
    assert run_cli(capsys, kind, "--model", str(tiny_checkpoint), "--input", str(source.parent),
                   "--output", str(output))[0] == 0


def test_empty_input_dry_run_writes_nothing(tiny_checkpoint: Path, tmp_path: Path, no_ray_no_model: None,
                                            capsys) -> None:
    source = write(tmp_path / "in.parquet", pa.table({"prompt": pa.array([], pa.string())}))
    code, out, err = run_cli(capsys, "generate", "--model", str(tiny_checkpoint), "--input", str(source),
                             "--output", str(tmp_path / "out"), "--dry-run", "4")
    assert code == 0 and json.loads(out)["dry_run_rows"] == 0 and "0 rows" in err
    assert not (tmp_path / "out").exists()


def test_debug_flag_shows_the_traceback(tmp_path: Path, no_ray_no_model: None, capsys) -> None:
    source = write(tmp_path / "in.parquet", pa.table({"prompt": [1]}))
    for argv in (["--debug", "generate"], ["generate", "--debug"]):
        code, _, err = run_cli(capsys, *argv, "--model", str(tmp_path / "m"), "--input", str(source),
                               "--output", str(tmp_path / "out"))
        assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_unexpected_errors_are_one_line_with_a_hint(capsys) -> None:
    def broken() -> None:
        raise KeyError("internal")

    assert cli.run_guarded(broken) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: unexpected KeyError: 'internal' (rerun with --debug for the traceback)"


def test_job_script_reports_a_mistake_in_one_line(tmp_path: Path) -> None:
    """``ray job submit -- python jobs/generate.py ...`` users see the same one line and exit code."""
    source = write(tmp_path / "in.parquet", pa.table({"prompt": [b"\x00"]}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "generate.py"), "--model", str(tmp_path / "m"),
                             "--input", str(source), "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120, env=env)
    assert time.monotonic() - started < 60
    assert result.returncode == 2, result.stderr
    assert_one_error_line(result.stderr, str(tmp_path / "m"))
