"""The decisions, as pure functions: no I/O, no environment (RoPE, KV cache, capacity, layouts, limits)."""
