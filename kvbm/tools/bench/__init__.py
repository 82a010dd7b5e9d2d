"""Workloads and side-by-side comparisons against OpenAI-compatible servers."""
