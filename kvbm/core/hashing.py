"""Block identity: chained 128-bit hashes over full token blocks.

A block's hash depends on its own tokens and on the hash of the block before
it, so equal hashes mean equal prefixes. The chain starts from a *root* that
folds in everything that makes KV incompatible even for equal tokens: the
model and KV layout (fixed per engine), the request's ``cache_salt`` and its
LoRA adapter. BLAKE2b is used instead of Python's ``hash()`` because the
latter is salted per process, and the disk tier must match across restarts.

Why 128 bits: the disk tier persists and may be shared, so the number of
blocks ever compared grows without bound. At 64 bits the birthday odds reach
~1e-4 at 60M blocks, and a collision can be searched for on purpose (cache
poisoning). At 128 bits both are out of reach.

Hashes are 16-byte ``bytes`` (no int conversions on the hot path; the disk
header and the journal store them as they are). Hashing a 32K-token prompt
(block 16) takes about half of what the 64-bit version took
(``bench/match_cost.py``), because per block it only does one BLAKE2b call:

* all new tokens are encoded in one C call (``marshal`` version 2 writes an
  int in [-2**31, 2**31) as ``b"i"`` + 4 bytes little-endian: a fixed width,
  so block boundaries are known offsets; ~2x faster than ``array``);
* each block is hashed once in a request's life (``extend_hashes`` is
  incremental) with one BLAKE2b call over ``previous hash + block bytes``
  (96 bytes at block size 16: one compression), keeping the first 16 bytes
  of the default 64-byte digest (passing ``digest_size=16`` costs ~100 ns
  more per call on CPython 3.11, half the price of the hash itself).
"""

from __future__ import annotations

import json
import marshal
import operator
from collections.abc import Sequence
from hashlib import blake2b

#: A block hash: HASH_BYTES bytes.
BlockHash = bytes
HASH_BYTES = 16
#: Bump when the hash input changes: old persisted blocks then never match.
_VERSION_TAG = b"kvbm-v2|"
_TOKEN_BYTES = 5  # marshal v2: b"i" + int32 little-endian
_HEAD_BYTES = 5  # marshal v2 list header: b"[" + int32 length
_CUT = slice(None, HASH_BYTES)


def _digest(data: bytes) -> BlockHash:
    return blake2b(data).digest()[:HASH_BYTES]


def engine_root(model_identity: str) -> BlockHash:
    """Root shared by every request of one engine (model + KV layout + block size)."""
    return _digest(_VERSION_TAG + model_identity.encode())


def request_root(
    engine: BlockHash,
    cache_salt: str | None = None,
    lora_name: str | None = None,
    extra_keys: Sequence[str] = (),
) -> BlockHash:
    """Root for one request: tenants (salt) and adapters (LoRA) never share blocks.

    ``extra_keys`` carries inputs that token ids do not capture, such as the
    hashes of a request's images (their placeholder tokens are identical for
    different images); folding them into the root is conservative but exact.
    """
    if not cache_salt and not lora_name and not extra_keys:
        return engine
    # JSON keeps the parts unambiguous whatever characters users put in them.
    tail = json.dumps([cache_salt or "", lora_name or "", list(extra_keys)]).encode()
    return _digest(engine + tail)


def _encode_all(tokens: Sequence[int]) -> bytes | None:
    """The marshal (v2) encoding of all ``tokens`` at 5 bytes each, or None.

    None when some id has no 5-byte encoding (outside int32, or not a Python
    int) or the input is not a list: :func:`_encode_blocks` then encodes block
    by block, to the same bytes.
    """
    if type(tokens) is not list:
        return None
    try:
        raw = marshal.dumps(tokens, 2)
    except ValueError:  # an element marshal cannot write (e.g. a numpy int)
        return None
    return raw if len(raw) == _HEAD_BYTES + len(tokens) * _TOKEN_BYTES else None


def _encode_blocks(tokens: Sequence[int], block_size: int) -> list[bytes]:
    """Each block's canonical bytes, one ``marshal.dumps`` per block (the slow path)."""
    return [
        marshal.dumps(list(map(operator.index, tokens[i : i + block_size])), 2)[_HEAD_BYTES:]
        for i in range(0, len(tokens), block_size)
    ]


def extend_hashes(
    hashes: list[BlockHash],
    tokens: Sequence[int],
    block_size: int,
    root: BlockHash,
    num_tokens: int | None = None,
) -> list[BlockHash]:
    """Append the hashes of the full blocks of ``tokens[:num_tokens]`` not yet in ``hashes``.

    Incremental so a request's chain is hashed once over its lifetime, not on
    every scheduler step: only the new blocks' tokens are read, and the cost is
    one BLAKE2b call per new block.
    """
    num_tokens = len(tokens) if num_tokens is None else min(num_tokens, len(tokens))
    n_full = num_tokens // block_size
    start = len(hashes)
    if n_full <= start:
        return hashes
    new = tokens[start * block_size : n_full * block_size]
    prev = hashes[-1] if hashes else root
    append, b2, cut = hashes.append, blake2b, _CUT  # locals: this loop is the match's hot path
    data = _encode_all(new)
    if data is not None:
        stride = block_size * _TOKEN_BYTES
        for off in range(_HEAD_BYTES, len(data), stride):
            prev = b2(prev + data[off : off + stride]).digest()[cut]
            append(prev)
    else:
        for block in _encode_blocks(new, block_size):
            prev = b2(prev + block).digest()[cut]
            append(prev)
    return hashes
