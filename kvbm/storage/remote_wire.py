"""RESP2 framing for G4's pipelines, straight on a redis-py connection's socket.

kvbm frames its commands and parses the replies itself (rather than through
redis-py's pipeline) so that a value's header and payload go out without being
joined, a value's payload is received into one buffer and never copied by the
client library, and one deadline covers the whole round trip: a slow link that
trickles bytes cannot stretch it as a per-read socket timeout would. Apart
from :mod:`kvbm.storage.remote_nodes` (which decides where and when a
pipeline runs) because this is the byte-level protocol only.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from kvbm.config import env_var
from kvbm.storage.remote_codec import HEADER_SIZE

__all__ = ["MAX_LINE", "Value", "Wire", "frames", "get_connection"]

#: Payloads at least this large go to the socket as they are; smaller ones are gathered into one write.
_SEND_DIRECT_BYTES = 32 << 10
_FLUSH_BYTES = 64 << 10


@dataclass(frozen=True)
class Value:
    """A block's value: header and payload, sent without joining them. The header may still be
    being computed (its MAC, on a tag thread): the send waits for it when it gets there."""

    head: bytes | Future[bytes]
    payload: np.ndarray

    @property
    def header(self) -> bytes:
        return self.head if isinstance(self.head, bytes) else self.head.result()


def frames(commands: list[tuple[Any, ...]]) -> Iterator[Any]:
    """RESP for ``commands``, lazily: small pieces gathered into one write, large payloads
    passed to the socket as they are."""
    buf = bytearray()
    for args in commands:
        buf += b"*%d\r\n" % len(args)
        for arg in args:
            if isinstance(arg, Value):
                buf += b"$%d\r\n" % (HEADER_SIZE + arg.payload.size)
                buf += arg.header
                if arg.payload.size >= _SEND_DIRECT_BYTES:
                    yield buf
                    yield arg.payload
                    buf = bytearray(b"\r\n")
                else:
                    buf += arg.payload.data
                    buf += b"\r\n"
                continue
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            buf += b"$%d\r\n" % len(data)
            buf += data
            buf += b"\r\n"
        if len(buf) >= _FLUSH_BYTES:
            yield buf
            buf = bytearray()
    if buf:
        yield buf


#: Longest reply line (status, error, integer, bulk length) a Redis sends for kvbm's commands.
MAX_LINE = 64 << 10
_CHUNK = 64 << 10


class Wire:
    """RESP2 on a connection's socket, every send and receive under one deadline.

    A socket timeout bounds each ``recv``: a link that delivers a few bytes a second never
    trips it while one 512 KiB reply takes minutes. Here each call gets the time left until
    the deadline instead. Replies: bytes (a bulk, received into one buffer of its size; status
    replies as bytes too), int, None (nil), or the ResponseError of a refused command (the
    connection is still in step). A bulk longer than ``max_bulk`` or anything unexpected is a
    protocol error: the caller drops the connection.
    """

    def __init__(self, sock: socket.socket, deadline: float, max_bulk: int) -> None:
        self._sock, self._deadline, self._max_bulk = sock, deadline, max_bulk
        self._buf = bytearray()
        self._pos = 0
        self._chunk = bytearray(_CHUNK)

    def _left(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise redis.exceptions.TimeoutError(f"the round trip took longer than {env_var('remote_timeout_secs')}")
        return left

    def send(self, frames: Iterator[Any]) -> None:
        for frame in frames:
            view = memoryview(frame).cast("B")
            while view.nbytes:
                self._sock.settimeout(self._left())
                view = view[self._sock.send(view):]

    def _recv_into(self, view: memoryview) -> int:
        self._sock.settimeout(self._left())
        n = self._sock.recv_into(view)
        if not n:
            raise redis.exceptions.ConnectionError("Redis closed the connection")
        return n

    def _line(self) -> bytes:
        while True:
            end = self._buf.find(b"\r\n", self._pos)
            if end >= 0:
                line = bytes(self._buf[self._pos:end])
                self._pos = end + 2
                return line
            if len(self._buf) - self._pos > MAX_LINE:
                raise redis.exceptions.InvalidResponse("a reply line of over 64 KiB")
            self._fill()

    def _fill(self) -> None:
        """Receive one more chunk into the line buffer."""
        del self._buf[:self._pos]
        self._pos = 0
        chunk = memoryview(self._chunk)
        n = self._recv_into(chunk)
        self._buf += chunk[:n]

    def _bulk(self, n: int) -> bytearray:
        """``n`` bytes and their CRLF; beyond what is buffered, received straight into the result."""
        out = bytearray(n)
        have = min(n, len(self._buf) - self._pos)
        out[:have] = memoryview(self._buf)[self._pos:self._pos + have]
        self._pos += have
        with memoryview(out) as view:
            while have < n:
                have += self._recv_into(view[have:])
        while len(self._buf) - self._pos < 2:
            self._fill()
        if self._buf[self._pos:self._pos + 2] != b"\r\n":
            raise redis.exceptions.InvalidResponse("a bulk reply not followed by CRLF")
        self._pos += 2
        return out

    def reply(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        try:
            if kind == b"$":
                n = int(rest)
                if n < 0:
                    return None
                if n > self._max_bulk:
                    raise redis.exceptions.InvalidResponse(f"a {n}-byte reply where at most {self._max_bulk} fit")
                return self._bulk(n)
            if kind == b":":
                return int(rest)
        except ValueError:
            raise redis.exceptions.InvalidResponse(f"unparsable reply {line[:64]!r}") from None
        if kind == b"+":
            return rest
        if kind == b"-":
            return redis.exceptions.ResponseError(rest.decode("utf-8", "replace"))
        raise redis.exceptions.InvalidResponse(f"unexpected reply {line[:64]!r}")


def get_connection(pool: Any) -> Any:
    try:
        return pool.get_connection()
    except TypeError:  # redis-py < 5.3 wants a command name
        return pool.get_connection("_")
