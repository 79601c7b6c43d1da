"""Ray-specific runtime pieces: the resource policy (:mod:`.resources`, pure Python), the tensor-parallel
shard group, and neox-ray's numbers as Ray metrics (:mod:`.metrics`). Nothing below this package imports Ray."""
