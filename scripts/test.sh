#!/usr/bin/env bash
# Sets up .venv with the test extras and runs the whole test suite (CPU; GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# shellcheck disable=SC1091
. .venv/bin/activate
set +e
python -m pytest -q -p no:cacheprovider "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "test.sh: pytest collected no tests: the set-up is broken" >&2
  exit 1
fi
exit "$status"
