"""Ray Data batch jobs: generation and perplexity scoring, Parquet in, Parquet out.

``config`` (typed job settings) -> ``source`` (input checks, reading with ids) -> ``stages`` (tokenize,
engine actor pool, format) -> ``sink`` (atomic commits, resume, summary) -> ``runner`` (wires them into one
Ray Data pipeline) -> ``cli`` (``neox-ray generate`` / ``neox-ray score``). The engine itself lives in
:mod:`neox_ray.engine`; this package only feeds it rows.
"""

from neox_ray.batch.config import GenerateJobConfig, JobConfigError, ScoreJobConfig, load_job_config
from neox_ray.batch.runner import run_job
from neox_ray.batch.sink import read_output

__all__ = ["GenerateJobConfig", "ScoreJobConfig", "JobConfigError", "load_job_config", "run_job", "read_output"]
