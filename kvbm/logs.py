"""Make kvbm's log lines visible inside vLLM's processes.

vLLM configures only its own ``vllm`` logger, so records from ``kvbm.*``
would fall through to Python's last-resort handler (warnings only). When
nobody has configured logging for kvbm, attach one handler in vLLM's style.
"""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(levelname)s %(asctime)s %(message)s"


def ensure_log_handler(level: str = "INFO") -> None:
    kvbm_logger = logging.getLogger("kvbm")
    if kvbm_logger.handlers or logging.getLogger().handlers:
        return  # the application configured logging; respect it
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%m-%d %H:%M:%S"))
    kvbm_logger.addHandler(handler)
    kvbm_logger.setLevel(level)
    kvbm_logger.propagate = False
