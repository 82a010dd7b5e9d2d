"""kvbm inside NVIDIA Dynamo (``python -m dynamo.frontend`` + ``python -m dynamo.vllm``).

Dynamo's vLLM worker loads kvbm by module path (``kvbm.vllm_integration.connector``);
nothing here is needed for that. This package holds what makes Dynamo run on a
CPU-only vLLM (:mod:`kvbm.dynamo.cpu_shim`) and the small helpers the launch
scripts and tests use (:mod:`kvbm.dynamo.config`). See docs/dynamo.md.
"""
