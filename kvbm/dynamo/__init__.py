"""kvbm inside NVIDIA Dynamo (``python -m dynamo.frontend`` + ``python -m dynamo.vllm``).

Dynamo's vLLM worker loads kvbm by module path (``kvbm.vllm_integration.connector``);
nothing here is needed for that. This package holds what makes Dynamo run on a
CPU-only vLLM (:mod:`kvbm.dynamo.cpu_shim`); the fleet of Dynamo processes the
tests and benchmarks start is a tool, :mod:`kvbm.tools.fleet`. See docs/dynamo.md.
"""
