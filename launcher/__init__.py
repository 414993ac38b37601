"""launch: serve open LLMs with a longer context than they were trained for, on lmdeploy."""

__version__ = "0.1.0"
