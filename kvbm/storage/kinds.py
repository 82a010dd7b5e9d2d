"""What the media count and the metrics export, in one place: error kinds and latency buckets.

A module of plain constants, so the metrics need not import redis, and the G4 store, its index
and the disk arena share one list each instead of copies that drift apart.
"""

from __future__ import annotations

#: G3 block I/O failures by kind: a read that failed, a payload whose CRC did not match, a slot
#: holding another block (or nothing), a write that failed.
DISK_ERROR_KINDS: tuple[str, ...] = ("read", "checksum", "mismatch", "write")

#: Redis round-trip latency histogram bounds (seconds), Prometheus-style ``le``.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
#: G4 errors by kind: shard-level (the node is then down) and per-command replies.
ERROR_KINDS = ("connection", "timeout", "auth", "oom", "moved", "readonly", "busy", "response", "unroutable",
               "other")
#: G4 values that did not verify, by kind: foreign (another block, identity, format or size), corrupt
#: (checksum), forged (authentication tag: written without the fleet secret; see remote_secret).
BAD_VALUE_KINDS = ("foreign", "corrupt", "forged")
