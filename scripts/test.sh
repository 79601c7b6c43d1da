#!/usr/bin/env bash
# Sets up .venv with the test extras, runs the linters (ruff, mypy), then the test suite (CPU; GPU tests skip
# without CUDA). Arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow and not ray"` for the fast subset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# shellcheck disable=SC1091
. .venv/bin/activate
echo "test.sh: ruff check ."
ruff check .
echo "test.sh: mypy neox_ray"
mypy neox_ray
set +e
python -m pytest -q -p no:cacheprovider "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "test.sh: pytest collected no tests: the set-up is broken" >&2
  exit 1
fi
exit "$status"
