"""Batch-job configuration and input checks: every mistake is reported before Ray starts or a model loads."""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from neox_ray.batch import cli as batch_cli
from neox_ray.batch import runner
from neox_ray.batch.config import JobConfigError, load_job_config, validate_job_config
from neox_ray.batch.runner import JobError, run_job
from neox_ray.batch.source import InputError

REPO = Path(__file__).resolve().parent.parent
BATCH_CONFIGS = ["generate-cpu-demo.yaml", "score-cpu-demo.yaml", "generate-pythia-1.4b-8xgpu.yaml",
                 "generate-pythia-12b-tp4.yaml", "generate-gpt-neox-20b-tp2.yaml", "score-pythia-1.4b.yaml"]


def base(**extra) -> dict:
    return {"model": "/m", "input": "/in", "output": "/out", **extra}


@pytest.mark.parametrize("name", BATCH_CONFIGS)
def test_shipped_configs_validate(name: str) -> None:
    text = (REPO / "configs" / name).read_text()
    assert text.startswith("#"), "each config opens with a sizing comment"
    config = load_job_config("score" if name.startswith("score") else "generate", REPO / "configs" / name)
    if "tp" in name:
        assert config.engine_config.tensor_parallel_size > 1 and config.replicas.num_gpus == 0


@pytest.mark.parametrize("raw, message", [
    (base(replicas={"num_replica": 2}), "replicas.num_replica: unknown key"),
    (base(colour="red"), "colour: unknown key"),
    (base(replicas={"num_replicas": "2"}), "replicas.num_replicas: Input should be a valid integer (got '2')"),
    (base(seed=1.5), "seed: Input should be a valid integer"),
    (base(replicas={"num_replicas": 2, "max_replicas": 4}), "not both"),
    (base(replicas={"min_replicas": 4, "max_replicas": 2}), "min_replicas (4) must be <= max_replicas (2)"),
    (base(engine={"tensor_parallel_size": 2}, replicas={"num_gpus": 1}), "shard group's placement group"),
    (base(engine={"device": "cpu"}, replicas={"num_gpus": 1}), "engine.device=cpu"),
    (base(engine={"max_num_seq": 4}), "unknown engine option(s): max_num_seq"),
    (base(engine={"dtype": "int3"}), "dtype must be one of"),
    (base(sampling={"temperature": -1}), "sampling: temperature must be >= 0.0"),
    (base(sampling={"n": 3, "temperature": 0.0}), "identical samples"),
    (base(sampling={"seed": 3}), "use the job-level 'seed'"),
    (base(sampling={"max_token": 3}), "sampling: unknown option(s) max_token"),
    ({"input": "/in"}, "model: Field required"),
])
def test_bad_generate_configs_are_reported_by_key(raw: dict, message: str) -> None:
    with pytest.raises(JobConfigError) as excinfo:
        validate_job_config("generate", raw)
    assert message in str(excinfo.value)


def test_score_config_rejects_generation_keys() -> None:
    with pytest.raises(JobConfigError, match="sampling: unknown key"):
        validate_job_config("score", base(sampling={"max_tokens": 3}))


def test_flags_override_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("model: /m\ninput: /in\noutput: /out\nreplicas: {min_replicas: 1, max_replicas: 4}\n"
                    "sampling: {max_tokens: 8, temperature: 0.5}\n")
    parser = batch_cli.build_generate_parser(argparse.ArgumentParser())
    args = parser.parse_args(["--config", str(path), "--num-replicas", "3", "--max-tokens", "32",
                              "--tensor-parallel-size", "2", "--seed", "7", "--n", "2"])
    config = load_job_config("generate", args.config, batch_cli.overrides_from_args("generate", args))
    assert config.replicas.pool_bounds == (3, 3)
    assert config.sampling_params.max_tokens == 32 and config.sampling_params.temperature == 0.5
    assert config.engine_config.tensor_parallel_size == 2 and config.seed == 7 and config.sampling_params.n == 2


def test_help_documents_every_option() -> None:
    from neox_ray.cli import build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, required in [("generate", ["--model", "--input", "--output", "--config", "--num-replicas",
                                         "--tensor-parallel-size", "--max-tokens", "--temperature", "--seed",
                                         "--n", "--dry-run"]),
                           ("score", ["--text-column", "--window", "--stride", "--config", "--dry-run"])]:
        sub = subcommands[name]
        text = sub.format_help()
        for flag in required:
            assert flag in text
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings} has no help text"
    assert "demo" in subcommands


def test_malformed_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(JobConfigError, match="not valid YAML"):
        load_job_config("generate", path)
    path.write_text("- a list\n")
    with pytest.raises(JobConfigError, match="must hold a mapping"):
        load_job_config("generate", path)


# ---- input checks: fail before Ray or any model ------------------------------------------------------------
@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args, **_kwargs):
        raise AssertionError("Ray must not start when the input is invalid")

    monkeypatch.setattr(runner, "connect_ray", refuse)


def _job(tiny_checkpoint: Path, tmp_path: Path, **extra):
    return validate_job_config("generate", {"model": str(tiny_checkpoint), "input": str(tmp_path / "in"),
                                            "output": str(tmp_path / "out"), **extra})


@pytest.mark.parametrize("table, message", [
    (pa.table({"text": ["a"]}), "has no column 'prompt'"),
    (pa.table({"prompt": ["a", "b", "c"], "id": [1, 2, 1]}), "1 duplicated value(s), e.g. 1 (2 times)"),
    (pa.table({"prompt": ["a", "b"], "id": ["x", None]}), "1 null value(s)"),
    (pa.table({"prompt": ["a"], "generated_text": ["x"]}), "would be overwritten"),
])
def test_bad_input_fails_fast(tiny_checkpoint: Path, tmp_path: Path, no_ray: None, table: pa.Table,
                              message: str) -> None:
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "part-0.parquet")
    with pytest.raises(InputError) as excinfo:
        run_job(_job(tiny_checkpoint, tmp_path))
    assert message in str(excinfo.value)
    assert not (tmp_path / "out").exists()


def test_unreadable_or_missing_input_fails_fast(tiny_checkpoint: Path, tmp_path: Path, no_ray: None) -> None:
    with pytest.raises(InputError, match="does not exist"):
        run_job(_job(tiny_checkpoint, tmp_path))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="cannot read input file .*broken.parquet"):
        run_job(_job(tiny_checkpoint, tmp_path))


def test_model_and_length_checks_fail_fast(tiny_checkpoint: Path, tmp_path: Path, no_ray: None) -> None:
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "in" / "p.parquet")
    with pytest.raises(JobError, match="no config.json"):
        run_job(validate_job_config("generate", {"model": str(tmp_path), "input": str(tmp_path / "in"),
                                                 "output": str(tmp_path / "out")}))
    with pytest.raises(JobError, match="leaves no room for a prompt"):
        run_job(_job(tiny_checkpoint, tmp_path, sampling={"max_tokens": 256}))
    with pytest.raises(JobError, match="exceeds max_model_len"):
        run_job(validate_job_config("score", {"model": str(tiny_checkpoint), "input": str(tmp_path / "in"),
                                              "output": str(tmp_path / "out"), "window": 1000}))
