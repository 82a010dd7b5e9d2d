"""kvbm: a KV-cache block manager that offloads vLLM's KV cache to host memory and disk."""

__version__ = "0.1.0"
