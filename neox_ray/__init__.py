"""neox-ray: GPT-NeoX inference at cluster scale on Ray.

``from neox_ray import LLM, SamplingParams`` is the offline API; batch jobs (:mod:`neox_ray.batch`) and the
online endpoint (:mod:`neox_ray.serve`) drive the same engine.
"""

from neox_ray.engine.outputs import CompletionOutput, RequestOutput, ScoreOutput
from neox_ray.engine.sampling_params import SamplingParams
from neox_ray.llm import LLM

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "ScoreOutput"]
__version__ = "0.1.0"
