"""CTranslate2 as a peer: ``ctranslate2.Generator`` over the same checkpoint, converted once per precision.

:func:`prepare` converts a checkpoint directory with ``ctranslate2.converters.TransformersConverter`` in the
peers' virtual environment (which has ctranslate2 and transformers < 5; see :mod:`peers`) at the weight
quantization of a precision (``float32``, ``int8``; ``bfloat16`` where the CPU build computes in it) and caches
it as ``<bench cache>/ctranslate2/<checkpoint>-<precision>/``. :func:`run` runs ``ct2_worker.py`` in that
environment with ``intra_threads`` = threads and the precision as ``compute_type`` (batches of 16, greedy; see
the worker), and returns what it printed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from peers import PeerRun, PeerUnavailable, cache_root, peer_python, run_logged

PRECISIONS = ("float32", "int8", "bfloat16")
BATCH_SIZE = 16
WORKER = Path(__file__).resolve().parent / "ct2_worker.py"


def _root() -> Path:
    return cache_root() / "ctranslate2"


def supported_precisions() -> list[str]:
    """The compute types this machine's CTranslate2 CPU build offers, among :data:`PRECISIONS`."""
    done = subprocess.run([str(peer_python()), "-c",
                           "import ctranslate2; print(' '.join(ctranslate2.get_supported_compute_types('cpu')))"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise PeerUnavailable(f"ctranslate2 does not import: {done.stderr.strip().splitlines()[-1:]}")
    offered = set(done.stdout.split())
    return [precision for precision in PRECISIONS if precision in offered]


def model_dir_for(checkpoint: Path, precision: str) -> Path:
    """The checkpoint converted for CTranslate2 at ``precision``, converted on first use."""
    if precision not in PRECISIONS:
        raise ValueError(f"CTranslate2 precision must be one of {PRECISIONS}, got {precision!r}")
    target = _root() / f"{checkpoint.name}-{precision}"
    weights = checkpoint / "model.safetensors"
    if (target / "model.bin").exists() and (
            not weights.exists() or (target / "model.bin").stat().st_mtime >= weights.stat().st_mtime):
        return target
    python = peer_python()
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"  CTranslate2: converting {checkpoint.name} ({precision})", flush=True)
    run_logged([str(python), "-c", "import sys; from ctranslate2.converters import TransformersConverter; "
                "TransformersConverter(sys.argv[1], load_as_float16=False).convert(sys.argv[2], "
                "quantization=sys.argv[3])", str(checkpoint), str(partial), precision],
               _root() / "logs" / f"convert-{target.name}.log", f"TransformersConverter quantization={precision}")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def prepare(checkpoint: Path, precisions: tuple[str, ...] = ("float32", "int8")) -> None:
    for precision in precisions:
        model_dir_for(checkpoint, precision)


def run(checkpoint: Path, jobs: list[tuple[list[int], int]], threads: int, precision: str, passes: int = 1
        ) -> PeerRun:
    """Generates ``jobs`` (prompt token ids, max_tokens) greedily with CTranslate2 in a worker process,
    ``passes`` times."""
    model = model_dir_for(checkpoint, precision)
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([str(peer_python()), str(WORKER), str(model), precision, str(threads), str(BATCH_SIZE),
                           str(passes)],
                          input=json.dumps(jobs), capture_output=True, text=True, env=environment)
    if done.returncode != 0:
        raise RuntimeError(f"ct2_worker.py failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["short_jobs"]:
        raise RuntimeError(f"CTranslate2 stopped jobs {result['short_jobs']} before their max_tokens")
    return PeerRun(result["tokens"], result["seconds"], result["peak_rss_mib"],
                   f"batches of {BATCH_SIZE} sorted by max_tokens, compute_type {result['compute_type']}, "
                   f"{result['generated']} tokens generated")
