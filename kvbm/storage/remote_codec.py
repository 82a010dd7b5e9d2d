"""G4 values: the header, the tag (keyed MAC or CRC-32) and the checks a value must pass.

Apart from :mod:`kvbm.storage.remote` (which moves values to and from Redis)
so that the value format lives in one place. Format version 2, a 68-byte
header then the payload; little-endian: magic ``KVBMG4\\0\\1`` (8), format
version (u16), flags (u16: 1 = keyed), block hash (16), identity digest (16),
payload length (u64), then a 16-byte tag over the preceding 52 header bytes
and the payload: with a fleet secret, keyed BLAKE3 truncated to 128 bits under
a key derived from it; without one, a CRC-32 (u32) and 12 zero bytes.

The identity digest (BLAKE2b-128) covers the model identity, this format, the
tensor-parallel rank and world size, and the secret's key id, so different
models, layouts or fleets never share a key (or delete each other's values).
"""

from __future__ import annotations

import hmac
import struct
from hashlib import blake2b
from typing import Any

import blake3
import numpy as np

from kvbm.config import KvbmConfig, env_var, read_secret_file
from kvbm.core.hashing import HASH_BYTES, BlockHash
from kvbm.storage.checksum import crc32 as _crc32

__all__ = [
    "FLAG_KEYED", "FORMAT_VERSION", "HEADER_SIZE", "MAC_THREAD_BYTES", "MAGIC", "TAG_SIZE", "ValueCodec",
    "identity_digest", "mac_key", "remote_secret",
]

MAGIC = b"KVBMG4\x00\x01"
#: 2: a 16-byte tag (MAC or CRC-32) and the key id in the identity digest; version 1 values are misses.
FORMAT_VERSION = 2
#: Header flag: the tag is a MAC (keyed BLAKE3) under the fleet secret.
FLAG_KEYED = 1
#: magic, version, flags, block hash, identity digest, payload length
_HDR = struct.Struct(f"<8sHH{HASH_BYTES}s{HASH_BYTES}sQ")
_CRC = struct.Struct("<I")
TAG_SIZE = 16
HEADER_SIZE = _HDR.size + TAG_SIZE
_DIGEST_TAG = b"kvbm-g4-v2|"
#: Payloads at least this large are MAC'd on the tag threads (hashlib releases the GIL), smaller ones inline.
MAC_THREAD_BYTES = 64 << 10


def identity_digest(identity: str, rank: int = 0, world_size: int = 1, key_id: str = "") -> bytes:
    """The 16-byte digest in a rank's keys and values: model identity, value format, shard, and the
    fleet secret's key id ("" without a secret), so fleets with different secrets never share keys."""
    keyed = f"|key {key_id}" if key_id else "|unkeyed"
    return blake2b(_DIGEST_TAG + f"{identity}|rank {rank}/{world_size}{keyed}".encode(), digest_size=16).digest()


def mac_key(secret: bytes) -> tuple[bytes, str]:
    """The value MAC key derived from the fleet secret (not the secret itself: the same string
    used elsewhere, e.g. as the handshake secret, then signs nothing here), and its public key id."""
    key = blake3.blake3(secret, derive_key_context="kvbm 2026 G4 value MAC key v2").digest()
    return key, blake3.blake3(b"kvbm-g4-key-id", key=key).hexdigest(8)


def remote_secret(config: KvbmConfig) -> bytes | None:
    """The fleet secret that signs G4 values: ``remote_secret`` (environment only) or the file
    ``remote_secret_file`` (mode 0600, the handshake secret's rules); None without either."""
    if config.remote_secret is not None:
        return config.remote_secret.encode()
    if config.remote_secret_file is not None:
        return read_secret_file(config.remote_secret_file, env_var("remote_secret_file"), what="the G4 secret",
                                misuse="have forged KV served to every server of the fleet")
    return None


class ValueCodec:
    """Headers and tags of one rank's values, and their verification.

    ``mac``: the key from :func:`mac_key` (values are then signed and only signed ones pass),
    or None (CRC-32 only). ``digest``: this rank's :func:`identity_digest`.
    """

    def __init__(self, mac: bytes | None, digest: bytes) -> None:
        self.mac = mac
        self.flags = FLAG_KEYED if mac is not None else 0
        self.digest = digest

    def header(self, block_hash: BlockHash, src: np.ndarray) -> bytes:
        """The 68-byte header of a value whose payload is ``src``, its tag included."""
        head = _HDR.pack(MAGIC, FORMAT_VERSION, self.flags, block_hash, self.digest, src.size)
        return head + self.tag(head, src)

    def tag(self, head: Any, payload: Any) -> bytes:
        """The 16-byte tag of a header (52 bytes) and payload: keyed BLAKE3 (a MAC: BLAKE3's
        keyed_hash mode) under the fleet key, truncated to 128 bits; else CRC-32 and zeros.
        BLAKE3 rather than HMAC-SHA256 or keyed BLAKE2b: about 2x and 3x their speed per core
        here (SIMD; bench/g4.py prints all three), and it releases the GIL on large inputs, so
        the tag threads MAC beside the socket I/O. blake3 is a dependency of vLLM's anyway."""
        if self.mac is None:
            return _CRC.pack(_crc32(payload, _crc32(head))) + bytes(TAG_SIZE - _CRC.size)
        return blake3.blake3(head, key=self.mac).update(payload).digest(TAG_SIZE)

    def verify(self, block_hash: BlockHash, value: Any, dst: np.ndarray) -> str | None:
        """None after copying a verified payload into ``dst``; else why it is a miss. Nothing
        reaches ``dst`` (and so the GPU) before the tag is checked."""
        if value is None or not value:  # GETRANGE of a missing key: empty
            return "absent"
        if not isinstance(value, (bytes, bytearray)) or len(value) != HEADER_SIZE + dst.size:
            return "foreign"  # truncated, or longer than a block (only its first bytes were sent)
        magic, version, flags, h, digest, length = _HDR.unpack_from(value, 0)
        if (magic != MAGIC or version != FORMAT_VERSION or h != block_hash or digest != self.digest
                or length != dst.size):
            return "foreign"
        view = memoryview(value)
        if self.mac is None and flags != self.flags:
            return "foreign"  # a keyed value (another fleet's key space: only a copied value gets here)
        if flags != self.flags or not hmac.compare_digest(self.tag(view[:_HDR.size], view[HEADER_SIZE:]),
                                                          view[_HDR.size:HEADER_SIZE]):
            return "forged" if self.mac is not None else "corrupt"
        np.copyto(dst, np.frombuffer(value, dtype=np.uint8, offset=HEADER_SIZE))
        return None
