"""Ray-specific runtime pieces: the tensor-parallel shard group. Nothing below this package imports Ray."""
