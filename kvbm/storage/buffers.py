"""Flat byte views of the buffers tiers read into and write from."""

from __future__ import annotations

from typing import Any

import numpy as np


def as_u8(obj: Any, *, writable: bool, what: str) -> np.ndarray:
    """A flat uint8 view of ``obj`` (buffer protocol, numpy array, or CPU tensor), never a copy.

    A copy would silently turn a read into a write to a temporary, so
    strided memory is refused instead.
    """
    if isinstance(obj, np.ndarray):
        arr = obj
    else:
        try:
            arr = np.frombuffer(obj, dtype=np.uint8)
        except (TypeError, ValueError, BufferError):
            arr = np.asarray(obj)  # e.g. a CPU torch tensor (via __array__)
    if not arr.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous memory, got a strided array of shape {arr.shape}")
    if writable and not arr.flags.writeable:
        raise ValueError(f"{what} is read-only; read_blocks needs a writable destination")
    return arr.reshape(-1).view(np.uint8)
