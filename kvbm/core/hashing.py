"""Block identity: chained 64-bit hashes over full token blocks.

A block's hash depends on its own tokens and on the hash of the block before
it, so equal hashes mean equal prefixes. The chain starts from a *root* that
folds in everything that makes KV incompatible even for equal tokens: the
model and KV layout (fixed per engine), the request's ``cache_salt`` and its
LoRA adapter. BLAKE2b is used instead of Python's ``hash()`` because the
latter is salted per process, and the disk tier must match across restarts.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Sequence

_DIGEST = 8  # 64-bit hashes: ~1e-10 collision odds at 60M resident blocks


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=_DIGEST).digest(), "little")


def engine_root(model_identity: str) -> int:
    """Root shared by every request of one engine (model + KV layout + block size)."""
    return _digest(b"kvbm-v1|" + model_identity.encode())


def request_root(
    engine: int,
    cache_salt: str | None = None,
    lora_name: str | None = None,
    extra_keys: Sequence[str] = (),
) -> int:
    """Root for one request: tenants (salt) and adapters (LoRA) never share blocks.

    ``extra_keys`` carries inputs that token ids do not capture, such as the
    hashes of a request's images (their placeholder tokens are identical for
    different images); folding them into the root is conservative but exact.
    """
    if not cache_salt and not lora_name and not extra_keys:
        return engine
    # JSON keeps the parts unambiguous whatever characters users put in them.
    tail = json.dumps([cache_salt or "", lora_name or "", list(extra_keys)]).encode()
    return _digest(engine.to_bytes(_DIGEST, "little") + tail)


def extend_hashes(
    hashes: list[int],
    tokens: Sequence[int],
    block_size: int,
    root: int,
    num_tokens: int | None = None,
) -> list[int]:
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
    raw = array("i", tokens[start * block_size : n_full * block_size]).tobytes()
    stride = block_size * 4
    prev = hashes[-1] if hashes else root
    for i in range(n_full - start):
        prev = _digest(prev.to_bytes(_DIGEST, "little") + raw[i * stride : (i + 1) * stride])
        hashes.append(prev)
    return hashes
