"""Disaggregated serving with kvbm: prefill workers (kvbm + NIXL), decode workers (NIXL), a router.

* :mod:`kvbm.disagg.connector` — the prefill worker's connector;
* :mod:`kvbm.disagg.nixl` — vLLM's NixlConnector, with NIXL's idle spin optionally paced;
* :mod:`kvbm.disagg.config` — the ``--kv-transfer-config`` of each worker kind.

The OpenAI-compatible front end (``kvbm router``) is a tool: :mod:`kvbm.tools.router`.

Importing this package imports neither vLLM nor aiohttp.
"""
