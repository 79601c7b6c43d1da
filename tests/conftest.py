"""Shared fixtures: tiny transformers-written checkpoints and one local Ray instance per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoints import VARIANTS, build_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def variant_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One checkpoint per config variant (read-only: tests that edit one copy it first)."""
    root = tmp_path_factory.mktemp("variants")
    return {name: build_hf_checkpoint(root / name, seed=i, **overrides)
            for i, (name, overrides) in enumerate(VARIANTS.items())}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Pythia-style tiny random checkpoint (safetensors + tokenizer.json), written by transformers."""
    return build_hf_checkpoint(tmp_path_factory.mktemp("ckpt") / "pythia", **VARIANTS["pythia"])


@pytest.fixture(scope="session")
def ray_session():
    """Starts Ray once for the whole test session (2-core machines: actors must ask for fractional CPUs)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the ``ray_session`` fixture is marked ``ray`` (so ``-m "not ray"`` skips it even when
    its file forgot the marker); tests that start Ray some other way carry the marker themselves."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
