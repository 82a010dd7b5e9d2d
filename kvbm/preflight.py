"""Check kvbm's settings before vLLM starts, where kvbm is the entry point.

Inside vLLM the connector validates its settings only after the engine
process has started and loaded the model: a typo such as
``DYN_KVBM_CPU_CACHE_GB=abc`` surfaced after ~26 s inside 266 lines of
tracebacks. ``kvbm serve``, ``kvbm bench compare`` and ``kvbm demo`` know the
``--kv-transfer-config`` they hand to vLLM and the environment it will see, so
they build the same validated config object (:func:`kvbm.config.load_config`)
first and stop with one line. Imports nothing heavy: it runs before vLLM.

Inside vLLM the connector turns kvbm's own startup refusals into
:class:`KvbmStartupError` (:func:`startup_error`): one ERROR line, and the
reason left for ``kvbm serve`` to print last.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from kvbm.config import ConfigError, KvbmConfig, load_config
from kvbm.logs import ensure_log_handler

logger = logging.getLogger(__name__)

CONNECTOR = "DynamoConnector"
#: Set by ``kvbm serve`` (kvbm.tools.cli): a private file where engine processes leave the reason they
#: could not start (kvbm.vllm_integration.connector), so the command prints it as its last line,
#: after vLLM's own tracebacks.
STARTUP_ERROR_FILE_VAR = "KVBM_SERVE_ERROR_FILE"
_FLAGS = ("--kv-transfer-config", "--kv_transfer_config")


def _transfer_configs(argv: Sequence[str]) -> list[Any]:
    """Every ``--kv-transfer-config`` value in vLLM's arguments, JSON-decoded (the last one is vLLM's)."""
    found = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag not in _FLAGS:
            continue
        if not eq:
            if i + 1 >= len(argv):
                continue
            value = argv[i + 1]
        try:
            found.append(json.loads(value))
        except ValueError:
            continue  # not JSON: vLLM's own parser reports it, at once
    return found


def _is_kvbm(connector: Mapping[str, Any]) -> bool:
    module = str(connector.get("kv_connector_module_path") or "")
    return connector.get("kv_connector") == CONNECTOR or module.startswith("kvbm.")


def kvbm_extra_configs(transfer: Any) -> list[Mapping[str, Any]]:
    """The ``kv_connector_extra_config`` of each kvbm connector in a kv_transfer_config
    (itself, or inside a MultiConnector's ``connectors``); empty if kvbm is not used."""
    if not isinstance(transfer, Mapping):
        return []
    extra = transfer.get("kv_connector_extra_config") or {}
    if not isinstance(extra, Mapping):
        extra = {}
    if _is_kvbm(transfer):
        return [extra]
    found: list[Mapping[str, Any]] = []
    subs = extra.get("connectors")
    if isinstance(subs, list):
        for sub in subs:
            found += kvbm_extra_configs(sub)
    return found


def check_vllm_args(argv: Sequence[str], environ: Mapping[str, str]) -> list[KvbmConfig]:
    """Validate kvbm's settings for a vLLM started with ``argv`` in ``environ``; raises
    :class:`~kvbm.config.ConfigError` as the connector would. No kvbm connector: nothing to check."""
    transfers = _transfer_configs(argv)
    if not transfers:
        return []
    return [load_config(extra, environ) for extra in kvbm_extra_configs(transfers[-1])]


# ---- inside vLLM's engine (kvbm.vllm_integration.connector) ----------------------------------


class KvbmStartupError(ConfigError, SystemExit):
    """A kvbm setting stops the engine: its ``str`` is the one clear message.

    Also a ``SystemExit``, so the message reaches the user as one line, not
    three tracebacks: vLLM's engine process re-raises a SystemExit without
    logging its stack ("EngineCore failed to start." + traceback), and
    ``multiprocessing`` then prints only the message as the process exits;
    uncaught in a script it is likewise one line. Still a ``ConfigError``
    (a ``ValueError``), so ``except ConfigError`` / ``except Exception`` around an
    in-process ``vllm.LLM(...)`` catch it as before.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = message  # what multiprocessing and the interpreter print for a SystemExit


def is_startup_error(error: Exception) -> bool:
    """kvbm's own startup refusals, whose messages name the setting and the fix: a bad value
    (ConfigError), tiers this machine cannot hold (SizingError), a rank that failed or never
    joined the handshake (HandshakeError)."""
    from kvbm.runtime.handshake import HandshakeError
    from kvbm.runtime.sizing import SizingError

    return isinstance(error, (ConfigError, HandshakeError, SizingError))


def startup_error(error: Exception) -> KvbmStartupError:
    ensure_log_handler("INFO")
    logger.error("kvbm: cannot start: %s", error)
    path = os.environ.get(STARTUP_ERROR_FILE_VAR)
    if path:
        try:
            with open(path, "a") as f:
                f.write(str(error).replace("\n", " ") + "\n")
        except OSError:
            pass  # the log line above still says it
    return KvbmStartupError(str(error))
