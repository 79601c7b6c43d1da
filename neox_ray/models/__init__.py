"""Model definitions composed from neox_ray.layers (one file per architecture)."""
