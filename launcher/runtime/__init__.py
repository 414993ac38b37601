"""Processes, their supervision and readiness, addresses, API keys, GPUs and launch's folders."""
