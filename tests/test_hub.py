"""Model references: local directories, hub ids and revisions resolved offline from a hand-built cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_cache import add_to_hub_cache

from neox_ray.hub import ModelNotFoundError, ModelRef, parse_model_ref, resolve_model


def test_parse_short_form_and_revision():
    assert parse_model_ref("EleutherAI/pythia-160m") == ModelRef("EleutherAI/pythia-160m", None)
    assert parse_model_ref("EleutherAI/pythia-160m@step1000") == ModelRef("EleutherAI/pythia-160m", "step1000")
    assert parse_model_ref("EleutherAI/pythia-160m", "step1000").display == "EleutherAI/pythia-160m@step1000"
    assert parse_model_ref("EleutherAI/pythia-160m@step1000", "step1000").revision == "step1000"
    with pytest.raises(ModelNotFoundError, match="give one"):
        parse_model_ref("EleutherAI/pythia-160m@step1000", "step2000")
    with pytest.raises(ModelNotFoundError, match="ID@REVISION"):
        parse_model_ref("EleutherAI/pythia-160m@")
    with pytest.raises(ModelNotFoundError):
        parse_model_ref("")


def test_local_directory(tmp_path: Path):
    (tmp_path / "ckpt").mkdir()
    assert resolve_model(str(tmp_path / "ckpt")) == str(tmp_path / "ckpt")
    with pytest.raises(ModelNotFoundError, match="local directory"):
        resolve_model(str(tmp_path / "ckpt"), revision="main")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model(str(tmp_path / "file"))
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        resolve_model(str(tmp_path / "missing" / "x" / "y"))


def _resolve_offline(hf_home: Path, *args: str) -> subprocess.CompletedProcess:
    """huggingface_hub reads HF_HOME / HF_HUB_OFFLINE at import: resolve in a fresh interpreter."""
    code = ("import sys\nfrom neox_ray.hub import resolve_model, ModelNotFoundError\n"
            "try:\n    print(resolve_model(*sys.argv[1:]))\n"
            "except ModelNotFoundError as e:\n    print('ERROR', e)\n")
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=60)


def test_hub_id_and_revisions_resolve_offline(tmp_path: Path, tiny_checkpoint: Path):
    hf_home = tmp_path / "hf"
    main_sha = add_to_hub_cache(hf_home, "EleutherAI/pythia-tiny", tiny_checkpoint)
    step_sha = add_to_hub_cache(hf_home, "EleutherAI/pythia-tiny", tiny_checkpoint, revision="step1000")
    repo = "EleutherAI/pythia-tiny"
    cases = [((repo,), main_sha), ((f"{repo}@step1000",), step_sha), ((repo, "step1000"), step_sha),
             ((repo, step_sha), step_sha)]
    for args, sha in cases:
        result = _resolve_offline(hf_home, *args)
        assert result.returncode == 0, result.stderr
        path = Path(result.stdout.strip())
        assert path.name == sha and (path / "config.json").is_file(), (args, result.stdout)


def test_missing_id_or_revision_is_one_line(tmp_path: Path, tiny_checkpoint: Path):
    hf_home = tmp_path / "hf"
    add_to_hub_cache(hf_home, "EleutherAI/pythia-tiny", tiny_checkpoint)
    for args in (("EleutherAI/not-there",), ("EleutherAI/pythia-tiny@step9",)):
        result = _resolve_offline(hf_home, *args)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("ERROR model "), result.stdout
        assert "HF_HUB_OFFLINE=1" in result.stdout and len(result.stdout.strip().splitlines()) == 1
        assert "Traceback" not in result.stderr


@pytest.fixture()
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty offline HF cache for this process (huggingface_hub read its env at import: patch its constants)."""
    from huggingface_hub import constants

    hf_home = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_home


def test_llm_from_hub_id_equals_local_directory(offline_cache: Path, tiny_checkpoint: Path):
    from neox_ray.engine.sampling_params import SamplingParams
    from neox_ray.llm import LLM

    add_to_hub_cache(offline_cache, "EleutherAI/pythia-tiny", tiny_checkpoint, revision="step1000")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    local = LLM(str(tiny_checkpoint), dtype="float32").generate("The quick brown fox", params)[0].outputs[0]
    for kwargs in ({"revision": "step1000"}, {}):
        model = "EleutherAI/pythia-tiny" if kwargs else "EleutherAI/pythia-tiny@step1000"
        llm = LLM(model, dtype="float32", **kwargs)
        assert llm.engine.model_dir.endswith(llm.engine.config.model)
        assert llm.generate("The quick brown fox", params)[0].outputs[0].token_ids == local.token_ids
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        LLM("EleutherAI/pythia-tiny")  # main was never cached


def test_served_model_name_defaults_to_the_id_as_written(tiny_checkpoint: Path):
    from neox_ray.serve.deployment import ServeArgs

    assert ServeArgs(model="EleutherAI/pythia-160m@step1000").model_name == "EleutherAI/pythia-160m@step1000"
    assert ServeArgs(model="EleutherAI/pythia-160m", engine={"revision": "step3000"}).model_name == \
        "EleutherAI/pythia-160m@step3000"
    assert ServeArgs(model="EleutherAI/pythia-160m").model_name == "EleutherAI/pythia-160m"
    assert ServeArgs(model=str(tiny_checkpoint)).model_name == tiny_checkpoint.name
    assert ServeArgs(model="x", served_model_name="mine").model_name == "mine"
