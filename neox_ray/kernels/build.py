"""Compiles and loads the C kernels of this package at first use (``cc``/``gcc``, no build step at install).

Each kernel is one C file, compiled with ``-O3 -march=native -fopenmp`` into ``$NEOX_RAY_KERNEL_CACHE``
(default ``~/.cache/neox-ray/kernels``), keyed by the source (with the headers beside it, e.g. ``cpu_math.h``),
the flags and the CPU's feature flags, and
written atomically so concurrent processes (Ray actors) share one build. It links the OpenMP runtime torch
already loaded, so kernels run on torch's threads. :func:`load_library` returns None, with one log line,
when kernels are switched off (``NEOX_RAY_CPU_KERNELS=0``, or false/no/off), no compiler is found, the
build fails or the cache directory cannot be written: callers then take their torch fallback.

This module knows nothing of what the kernels compute; each kernel's Python module declares its
functions' signatures and checks their arguments.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno", "-std=c11")


def kernels_enabled() -> bool:
    return os.environ.get("NEOX_RAY_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    root = os.environ.get("NEOX_RAY_KERNEL_CACHE") or Path.home() / ".cache" / "neox-ray" / "kernels"
    return Path(root)


def cpu_fingerprint() -> str:
    """-march=native code must not run on a different CPU (a shared home directory on a mixed cluster)."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def find_compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def build(source: Path, compiler: str, extra_flags: tuple[str, ...] = ()) -> Path:
    """The shared library built from ``source`` with ``CFLAGS`` and ``extra_flags`` (built now unless the
    cache has it). Raises RuntimeError with the compiler's message when the build fails, OSError when the
    cache cannot be written."""
    flags = CFLAGS + extra_flags
    text = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    key = hashlib.sha256(text + " ".join((compiler,) + flags).encode() + cpu_fingerprint().encode())
    target = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run([compiler, *flags, str(source), "-o", str(built), "-lm"],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed to build {source.name}: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)  # atomic: a concurrent builder either sees nothing or the whole file
    return target


# A C function's ctypes signature: (argument types, return type or None for void).
Signature = tuple[Sequence[Any], Any]


def load_library(source: Path, what: str, fallback: str, signatures: Mapping[str, Signature],
                 extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """Builds (or finds) and loads ``source`` and declares the ``signatures`` of its functions; None when
    that is not possible. ``what`` names the kernel and ``fallback`` what runs instead, for the log line."""
    if not kernels_enabled():
        return None
    compiler = find_compiler()
    if compiler is None:
        logger.info("no C compiler found: %s uses %s", what, fallback)
        return None
    try:
        library = ctypes.CDLL(str(build(source, compiler, extra_flags)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.warning("%s unavailable, using %s: %s", what, fallback, error)
        return None
    for name, (argtypes, restype) in signatures.items():
        function = getattr(library, name)
        function.argtypes, function.restype = list(argtypes), restype
    return library
