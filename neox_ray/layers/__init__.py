"""Building blocks the model files compose: sharded linear layers, embeddings, rotary, attention, sampling.

Layers know torch and :mod:`neox_ray.distributed`, never the scheduler or Ray.
"""
