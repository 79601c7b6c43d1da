"""Batch generation job for ``ray job submit``: parse the config and flags, build the pipeline, run it.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/generate.py --config configs/generate-pythia-1.4b-8xgpu.yaml

Same options as ``neox-ray generate``, with the same error handling (a mistake in the config or the data prints
one line ``error: ...`` and exits 2; ``--debug`` shows the traceback). Everything else lives in
:mod:`neox_ray.batch`.
"""

import sys

from neox_ray.batch.cli import main

if __name__ == "__main__":
    sys.exit(main("generate"))
