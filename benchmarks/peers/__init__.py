"""Other inference engines run beside neox-ray by ``benchmarks/compare.py``: llama.cpp and CTranslate2.

Each peer module prepares its engine on demand and caches what it built under the benchmark cache
(``~/.cache/neox-ray-bench`` or ``$NEOX_RAY_BENCH_DIR``): ``llamacpp`` builds ``llama-server`` from the
llama.cpp source that the ``llama-cpp-python`` sdist vendors and converts checkpoints to GGUF;
``ctranslate2_peer`` converts checkpoints to CTranslate2 models and generates in a worker process. Both
converters need transformers < 5 (transformers 5 reads ``rotary_pct`` into ``rope_parameters``, which the
converters do not know), so they run in one separate virtual environment, :func:`peer_python`.

This package knows nothing of neox-ray; the comparison, the workload and the targets are ``compare.py``'s.
A peer that cannot be prepared raises :class:`PeerUnavailable` with one line saying why.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# The peers' converters' environment. torch is pinned: an open range lets pip pick a CUDA build.
PEER_REQUIREMENTS = ("ctranslate2==4.8.5", "transformers>=4.40,<5", "torch==2.13.0", "numpy", "sentencepiece",
                     "safetensors", "pyyaml", "tqdm", "protobuf<5")


@dataclass
class PeerRun:
    """A peer's timed generation of the workload: requested tokens it returned, the wall seconds of each pass,
    its process's peak RSS."""
    tokens: int
    seconds: list[float]
    peak_rss_mib: float | None
    detail: str


class PeerUnavailable(RuntimeError):
    """A peer could not be prepared here (no compiler, no pip, a failed build); the message says why."""


def cache_root() -> Path:
    return Path(os.environ.get("NEOX_RAY_BENCH_DIR", Path.home() / ".cache" / "neox-ray-bench"))


def run_logged(command: list[str], log: Path, what: str, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> None:
    """Runs a preparation step with its output in ``log``; a failure raises :class:`PeerUnavailable`
    naming the step and the log's last line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        try:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        except OSError as exc:
            raise PeerUnavailable(f"{what}: {exc}") from None
    if done.returncode != 0:
        lines = log.read_text(errors="replace").strip().splitlines()
        raise PeerUnavailable(f"{what} failed (exit {done.returncode}): {lines[-1] if lines else ''} "
                              f"[log: {log}]")


def peer_python() -> Path:
    """The interpreter of the peers' virtual environment, created on first use (a few minutes: pip
    installs torch, transformers < 5 and ctranslate2)."""
    venv = cache_root() / "peer-venv"
    python = venv / "bin" / "python"
    marker = venv / "requirements.txt"
    wanted = "\n".join(PEER_REQUIREMENTS)
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    print(f"  preparing the peers' virtual environment in {venv} (first run only: a few minutes)", flush=True)
    if not python.exists():
        run_logged([sys.executable, "-m", "venv", str(venv)], cache_root() / "logs" / "peer-venv.log",
                   "creating the peers' virtual environment")
    run_logged([str(python), "-m", "pip", "install", "--quiet", *PEER_REQUIREMENTS],
               cache_root() / "logs" / "peer-venv-pip.log", "pip install into the peers' virtual environment")
    marker.write_text(wanted)
    return python


def process_peak_rss_mib(pid: int) -> float | None:
    """A live process's peak resident set (VmHWM), in MiB; None where /proc does not say."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
