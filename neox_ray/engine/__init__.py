"""Engine internals: requests, scheduling, KV-block bookkeeping (pure Python) and the torch model runner."""
