"""Checkpoint sweeps: ``neox-ray score --model A --model A@step1000 ...`` scores one dataset under several
checkpoints (hub ids resolved offline from a hand-built HF cache), one output subdirectory each, plus
sweep.json and sweep.png; a rerun skips the finished checkpoints."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from checkpoints import VARIANTS, build_hf_checkpoint
from hub_cache import add_to_hub_cache

from neox_ray.batch.cli import build_score_parser, overrides_from_args
from neox_ray.batch.config import JobConfigError, validate_job_config
from neox_ray.batch.sink import OutputDir
from neox_ray.batch.sweep import checkpoint_dir_name, format_sweep, write_sweep_plot

REPO = Path(__file__).resolve().parent.parent
TEXTS = ["the quick brown fox jumps over the lazy dog", "ray data reads parquet files", "a", ""]


def test_checkpoint_dir_names_are_readable_and_distinct() -> None:
    assert checkpoint_dir_name("EleutherAI/pythia-70m@step1000") == "EleutherAI--pythia-70m@step1000"
    assert checkpoint_dir_name("/ckpt/pythia/") == "ckpt--pythia"
    assert checkpoint_dir_name("org/a@main") != checkpoint_dir_name("org/a@step1")


def test_models_config_and_repeated_model_flag() -> None:
    base = {"input": "i", "output": "o"}
    config = validate_job_config("score", {**base, "models": ["a", "b@step1"]})
    assert config.model == "a" and config.models == ["a", "b@step1"]
    for bad, message in [({"models": ["a", "a"]}, "distinct"), ({"models": []}, "models"),
                         ({"models": ["a"], "model": "a"}, "not both")]:
        with pytest.raises(JobConfigError, match=message):
            validate_job_config("score", {**base, **bad})
    parser = build_score_parser(argparse.ArgumentParser())
    assert overrides_from_args("score", parser.parse_args(["--model", "a", "--model", "b"])) == {
        "model": None, "models": ["a", "b"]}
    assert overrides_from_args("score", parser.parse_args(["--model", "a"])) == {"model": "a", "models": None}
    with pytest.raises(JobConfigError, match="one --model"):
        from neox_ray.batch.cli import build_generate_parser

        overrides_from_args("generate", build_generate_parser(argparse.ArgumentParser()).parse_args(
            ["--model", "a", "--model", "b"]))


def test_sweep_plot_puts_step_revisions_on_a_log_axis(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    entries = [{"model": "org/m", "revision": f"step{s}", "perplexity": 100.0 / (1 + s), "nll": 1.0,
                "num_tokens": 10, "rows_ok": 1, "rows_failed": 0} for s in (0, 1000, 143000)]
    lines: list[str] = []
    assert write_sweep_plot(OutputDir(str(tmp_path)), entries, lines.append)
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = format_sweep({"sweep": entries, "output": str(tmp_path), "plot": "sweep.png"})
    assert "org/m@step1000: perplexity 0.0999" in text


def _cli(*args: str, hf_home: Path, timeout: float = 420) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "neox_ray.cli", "score", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.ray
def test_sweep_scores_each_checkpoint_and_resumes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from neox_ray.llm import LLM

    hf_home = tmp_path / "hf"
    late = build_hf_checkpoint(tmp_path / "late", seed=5, **VARIANTS["pythia"])  # different weights
    add_to_hub_cache(hf_home, "EleutherAI/pythia-tiny", tiny_checkpoint, revision="step0")
    add_to_hub_cache(hf_home, "EleutherAI/pythia-tiny", late, revision="step1000")
    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "texts.parquet")
    models = ["EleutherAI/pythia-tiny@step0", "EleutherAI/pythia-tiny@step1000", str(late)]
    flags = [arg for model in models for arg in ("--model", model)]
    flags += ["--input", str(tmp_path / "texts.parquet"), "--output", str(tmp_path / "out"), "--device", "cpu",
              "--dtype", "float32", "--num-replicas", "1", "--num-cpus-per-replica", "0.5", "--perplexity",
              "rolling", "--max-model-len", "16"]
    result = _cli(*flags, hf_home=hf_home)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "score sweep complete: 3 checkpoint(s)" in result.stdout

    sweep = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [(e["model"], e["revision"]) for e in sweep] == [("EleutherAI/pythia-tiny", "step0"),
                                                            ("EleutherAI/pythia-tiny", "step1000"), (str(late), None)]
    for entry, checkpoint in zip(sweep, (tiny_checkpoint, late, late), strict=True):
        subdir = tmp_path / "out" / entry["output"]
        assert (subdir / "_SUCCESS").exists() and entry["rows_failed"] == 1  # the empty text
        scores = LLM(str(checkpoint), device="cpu", dtype="float32", max_model_len=16).score(
            [t for t in TEXTS if t], perplexity="rolling")
        nll, tokens = sum(s.nll for s in scores), sum(s.num_tokens for s in scores)
        assert entry["num_tokens"] == tokens and entry["nll"] == pytest.approx(nll, rel=1e-5)
        assert entry["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert sweep[1]["perplexity"] == pytest.approx(sweep[2]["perplexity"], rel=1e-6)
    assert sweep[0]["nll"] != sweep[1]["nll"]  # different weights per revision
    assert (tmp_path / "out" / "sweep.png").stat().st_size > 0

    again = _cli(*flags, hf_home=hf_home)  # every checkpoint is finished: nothing is recomputed
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("is already complete") == 3
    assert json.loads((tmp_path / "out" / "sweep.json").read_text()) == sweep
