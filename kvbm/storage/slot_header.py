"""The 64-byte header at the start of every G3 slot: the codec, apart from the I/O.

The header names the block a slot holds (128-bit hash, slot index, length)
and carries a CRC-32 of the payload and of itself, so that a slot that does
not verify (torn write, stale slot, bit rot, a slot of an older format) is
a miss, never served. :mod:`kvbm.storage.disk` decides what each outcome
means (a miss of which kind, which log line); this module only packs and
unpacks bytes, so the file format lives in one place.

Format version 2 (little-endian): magic ``KVBMG3\\0\\1`` (8), version (u16),
payload offset (u16), payload CRC-32 (u32), slot (u64), block hash (16
bytes), payload length (u64), header CRC-32 of the preceding 48 bytes.
Version 1 had a 64-bit hash; its slots read as misses.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, NamedTuple

from kvbm.core.hashing import HASH_BYTES, BlockHash

__all__ = ["FORMAT_VERSION", "HEADER_SIZE", "MAGIC", "SlotHeader", "header_version", "matching_payload_crc",
           "pack_header", "unpack_header"]

HEADER_SIZE = 64
MAGIC = b"KVBMG3\x00\x01"
FORMAT_VERSION = 2
#: magic, version: where every format version starts
_HDR_PREFIX = struct.Struct("<8sH")
#: magic, version, payload offset, payload crc32, slot, block hash, payload length
_HDR_BODY = struct.Struct(f"<8sHHIQ{HASH_BYTES}sQ")
_HDR_CRC = struct.Struct("<I")
_HDR_CRC_AT = _HDR_BODY.size  # header crc32 covers bytes [0, 48)
#: the body and the header crc32 in one unpack (the read path's common case)
_HDR_ALL = struct.Struct(f"<8sHHIQ{HASH_BYTES}sQI")


class SlotHeader(NamedTuple):
    """What a verified header says about its slot."""

    payload_offset: int
    payload_crc: int
    slot: int
    block_hash: bytes
    length: int


def pack_header(buf: Any, *, payload_offset: int, payload_crc: int, slot: int, block_hash: BlockHash,
                length: int) -> None:
    """Write a current-format header, its own CRC included, into the first 64 bytes of ``buf``."""
    _HDR_BODY.pack_into(buf, 0, MAGIC, FORMAT_VERSION, payload_offset, payload_crc, slot, block_hash, length)
    _HDR_CRC.pack_into(buf, _HDR_CRC_AT, zlib.crc32(buf[:_HDR_CRC_AT]))


def header_version(buf: Any) -> int | None:
    """The format version of the header in ``buf``; None if it is not a kvbm G3 header at all
    (a slot never written reads as zeros)."""
    magic, version = _HDR_PREFIX.unpack_from(buf, 0)
    return version if magic == MAGIC else None


def unpack_header(buf: Any) -> SlotHeader | None:
    """The fields of a current-format header; None if its CRC does not match (corrupt header).

    Call only once :func:`header_version` said :data:`FORMAT_VERSION`.
    """
    _, _, payload_off, payload_crc, slot, block_hash, length = _HDR_BODY.unpack_from(buf, 0)
    (header_crc,) = _HDR_CRC.unpack_from(buf, _HDR_CRC_AT)
    if header_crc != zlib.crc32(buf[:_HDR_CRC_AT]):
        return None
    return SlotHeader(payload_off, payload_crc, slot, block_hash, length)


def matching_payload_crc(buf: Any, *, payload_offset: int, slot: int, block_hash: BlockHash, length: int) -> int | None:
    """The payload CRC of the header in ``buf`` if it is a current-format header that verifies
    and names exactly this block (offset, slot, hash, length); None otherwise, and then
    :func:`header_version` and :func:`unpack_header` tell why.

    The common case of every G3 load in one unpack and one CRC of 48 bytes: at 128 KiB blocks
    a load's per-block Python decides how many reads stay in flight (docs/architecture.md).
    """
    magic, version, off, payload_crc, hslot, hhash, hlength, header_crc = _HDR_ALL.unpack_from(buf, 0)
    if (magic == MAGIC and version == FORMAT_VERSION and off == payload_offset and hslot == slot
            and hhash == block_hash and hlength == length and header_crc == zlib.crc32(buf[:_HDR_CRC_AT])):
        return payload_crc
    return None
