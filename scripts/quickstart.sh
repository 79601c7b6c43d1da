#!/usr/bin/env bash
# Sets up .venv and runs the main job end to end: a batch generation on an automatically started local
# Ray cluster, with a small RANDOM-WEIGHT demo checkpoint and sample prompts it creates under ./demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
exec neox-ray demo "$@"
