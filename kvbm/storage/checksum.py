"""The CRC-32 that guards every block payload kvbm writes (G3 slots, G4 values).

ISA-L's CRC-32 (``isal``, a dependency) computes exactly zlib's CRC-32 (the same
polynomial and values, so data written with either verifies with the other) with
carry-less multiplication: ~40 GB/s per core on this project's CPUs against
zlib's ~3.5 GB/s. Both release the GIL. With zlib, verifying a G3 load cost
about as much CPU as reading it from an NVMe drive, and loads through the
executor reached only 0.6-0.7 of the raw reads (docs/architecture.md). Small
fixed-size records (slot headers, journal records) keep ``zlib.crc32``: the
values are the same and the call is cheaper for a few dozen bytes.
"""

from __future__ import annotations

import zlib

try:
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a dependency; zlib gives identical values, only slower
    crc32 = zlib.crc32

__all__ = ["crc32"]
