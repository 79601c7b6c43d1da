"""Ray-specific runtime pieces: the resource policy (:mod:`.resources`, pure Python) and the tensor-parallel
shard group. Nothing below this package imports Ray."""
