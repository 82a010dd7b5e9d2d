"""kvbm's tools: the ``kvbm`` command and what it runs, apart from the library.

The library (``kvbm.core``, ``storage``, ``transfer``, ``runtime``,
``vllm_integration``, ``disagg``'s connectors, the top-level modules) is what a
vLLM engine loads; the tools drive it from outside: :mod:`~kvbm.tools.cli`
(the ``kvbm`` command), :mod:`~kvbm.tools.plan` (``kvbm plan``),
:mod:`~kvbm.tools.bench` (``kvbm bench``, ``kvbm demo``),
:mod:`~kvbm.tools.doctor` and its :mod:`~kvbm.tools.disk_probe`,
:mod:`~kvbm.tools.demo` (the tiny model builder), :mod:`~kvbm.tools.router`
(``kvbm router``, the disaggregated front end) and :mod:`~kvbm.tools.fleet`
(Dynamo processes for tests and benchmarks). Tools import the library, never
the other way round (``tests/test_imports.py``), so an engine never imports a tool.
"""
