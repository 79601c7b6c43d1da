#!/usr/bin/env bash
# Creates .venv (if needed) and installs neox-ray with the given extras (default: none).
# CPU machines get the CPU torch wheel pinned (a plain `torch` would pull a multi-GB CUDA build);
# on a machine with an NVIDIA driver, or when torch is already importable, torch is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python_bin="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "setup: NVIDIA driver found; installing torch from the default index (bring your own CUDA build to pin it)"
    python -m pip install -q torch
  else
    echo "setup: no GPU; installing the CPU torch wheel (torch==2.13.0)"
    python -m pip install -q torch==2.13.0
  fi
fi
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
python -m pip install -q -e "$spec"
