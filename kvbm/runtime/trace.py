"""kvbm's request log while serving (opt-in: ``trace_file``, see config), for ``kvbm plan``.

The writer lives in the library (the leader runtime writes it); ``kvbm.tools.plan.trace`` reads it. Its
format is described there: a header line, then one JSON line per finished request (timestamps,
lengths, served blocks and block hashes; no token or text).
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence
from typing import Any

from kvbm.config import ConfigError, env_var

logger = logging.getLogger(__name__)

#: Bump when the request log's format changes (kvbm.tools.plan.trace reads this version).
FORMAT_VERSION = 1


def _hex(block_hash: bytes | int) -> str:
    """A hash as hex, whatever its type or width (kvbm's are bytes; older ones were ints)."""
    return block_hash.hex() if isinstance(block_hash, bytes) else format(block_hash, "x")


def open_trace_file(path: str) -> int:
    """Open (or create, 0600) the trace for appending, refusing what another user could have prepared.

    kvbm often runs as root and trace files go to shared log directories, so the
    last name is not followed if it is a link (``O_NOFOLLOW``: a planted link would
    have us append to any file), the file must be a regular file (a planted FIFO
    would block the open, and the start, forever; ``O_NONBLOCK`` makes the open
    return so ``fstat`` can tell) and ours (not another user's file, which they
    could have linked elsewhere or read)."""
    var = env_var("trace_file")
    fix = f"point {var} at a regular file of this user (uid {os.geteuid()}) in a directory others cannot write, " \
          "or unset it"
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP or os.path.islink(path):  # (O_CREAT on a link in a sticky dir: EACCES)
            raise ConfigError(f"{var}={path} is a symbolic link; kvbm does not follow one for its trace (another "
                              f"user may have planted it to make kvbm append to a file of their choosing); {fix}") \
                from None
        if e.errno == errno.ENXIO:  # O_NONBLOCK write-open of a FIFO nobody reads
            raise ConfigError(f"{var}={path} is a FIFO, not a regular file; {fix}") from None
        raise ConfigError(f"{var}={path}: cannot open it for appending ({e.strerror}); {fix}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{var}={path} is not a regular file (a FIFO, socket, device or directory); {fix}")
        if info.st_uid != os.geteuid():
            raise ConfigError(f"{var}={path} belongs to uid {info.st_uid}, not to this process (uid "
                              f"{os.geteuid()}); kvbm does not append to another user's file; {fix}")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


class TraceWriter:
    """Appends kvbm's request log while serving (opt-in: ``trace_file``, see config).

    Lives in the scheduler: per request one dict entry when it is first
    scheduled and one JSON line when it finishes (its hashes are the
    planner's, already computed), buffered and written with one ``write`` per
    flush (``O_APPEND``: lines from data-parallel engines sharing the file
    stay whole). A write error is logged once and turns tracing off; serving
    goes on.
    """

    FLUSH_LINES = 256
    FLUSH_SECS = 2.0

    def __init__(self, path: str, header: dict[str, Any], clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._fd: int | None = open_trace_file(path)
        self._scheduled: dict[Any, tuple[float, tuple[int, int]]] = {}
        self._buffer: list[str] = [json.dumps({"kvbm_trace": FORMAT_VERSION, "started": clock(), **header})]
        self._last_flush = clock()
        self.written = 0
        self.flush()
        atexit.register(self.close)  # vLLM normally shuts the connector down first; this is the safety net
        logger.info("kvbm: writing a request trace to %s (timestamps, lengths and block hashes only)", path)

    def scheduled(self, req_id: Any, served: tuple[int, int] = (0, 0)) -> None:
        """vLLM scheduled the request (looked it up), kvbm serving ``served`` (G2, G3) blocks
        of it; only the first time counts."""
        if req_id not in self._scheduled:
            self._scheduled[req_id] = (self._clock(), served)

    def finished(self, req_id: Any, prompt_tokens: int, output_tokens: int,
                 hashes: Sequence[bytes] | Sequence[int]) -> None:
        """Log a finished request; one never scheduled (aborted while waiting) did no lookup: skipped."""
        scheduled = self._scheduled.pop(req_id, None)
        if scheduled is None or self._fd is None:
            return
        start, served = scheduled
        now = self._clock()
        self._buffer.append(json.dumps({
            "t": round(start, 6), "end": round(now, 6), "prompt": prompt_tokens, "output": output_tokens,
            "served": served, "hashes": [_hex(h) for h in hashes],
        }, separators=(",", ":")))
        self.written += 1
        if len(self._buffer) >= self.FLUSH_LINES or now - self._last_flush >= self.FLUSH_SECS:
            self.flush()

    def flush(self) -> None:
        self._last_flush = self._clock()
        if self._fd is None or not self._buffer:
            return
        data = ("\n".join(self._buffer) + "\n").encode()
        self._buffer.clear()
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as e:
            logger.warning("kvbm: cannot write the request trace %s (%s); tracing is off from now on "
                           "(serving is unaffected)", self.path, e.strerror)
            self._close_fd()

    def close(self) -> None:
        self.flush()
        self._close_fd()
        atexit.unregister(self.close)

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
