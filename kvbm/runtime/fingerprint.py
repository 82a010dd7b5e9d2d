"""Cheap, copy-stable fingerprints of model weights and LoRA adapters.

Why: with disk persistence (``disk_persist``, see config) the disk tier outlives the process, so
"the same model" must mean the same *weights*, not the same path: a
fine-tune written over ``/models/foo``, or an adapter directory refreshed in
place, must not be served KV computed with the old weights. Hashing every
byte would cost minutes for large models at each start, and file names,
mtimes or inodes change with every copy (a re-download into a fresh
container would lose the whole cache).

What is read, per file (names sorted, symlinks followed, since Hugging Face
snapshots link into content-addressed blobs):

* small config files that shape the model or the adapter (``config.json``,
  ``params.json``, ``*.index.json``, quantization configs,
  ``adapter_config.json``): all of their bytes;
* ``*.safetensors``: the size, the whole JSON header (names, dtypes, shapes,
  offsets) and :data:`SAMPLE_BYTES` from the middle of up to
  :data:`TENSORS_PER_FILE` tensors spread over the file. Headers and sizes
  alone do not tell two checkpoints of one architecture apart (a retrain has
  exactly the same header); the samples do, since training changes every
  tensor;
* other weight files (``*.bin``, ``*.pt``, ``*.pth``, ``*.gguf``): the size and
  :data:`OPAQUE_SAMPLES` samples spread over the file.

About a hundred small reads per weight file: milliseconds from page cache,
well under a second for hundreds of files on an SSD. The price of sampling:
an edit confined to tensors (or bytes) that are not sampled goes unseen;
change the model path, or clear the G3 directory, after such surgery.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

SAMPLE_BYTES = 256
TENSORS_PER_FILE = 64
OPAQUE_SAMPLES = 16
_MAX_HEADER = 100 << 20
_MAX_CONFIG = 16 << 20
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_CONFIG = re.compile(r"(config|params|adapter_config)\.json|.*\.index\.json|.*quant.*\.json")


def fingerprint(path: str) -> str | None:
    """Hex digest of the weights at ``path`` (a model/adapter directory or one weight file);
    None when there are no readable weights there (a hub name, a remote URI)."""
    if os.path.isfile(path):
        directory, names = os.path.dirname(path), [os.path.basename(path)]
    elif os.path.isdir(path):
        directory = path
        names = sorted(n for n in os.listdir(path) if n.endswith(_WEIGHTS) or _CONFIG.fullmatch(n))
    else:
        return None
    digest = hashlib.blake2b(digest_size=16)
    weights = 0
    for name in names:
        try:
            with open(os.path.join(directory, name), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                digest.update(f"{name}\0{size}\0".encode())
                if name.endswith(_WEIGHTS):
                    _weights(digest, f.fileno(), size, name.endswith(".safetensors"))
                    weights += 1
                elif size <= _MAX_CONFIG:
                    digest.update(f.read())
        except OSError as exc:
            logger.warning("kvbm: cannot read %s for the weights fingerprint (%s)", name, exc.strerror)
            return None
    return digest.hexdigest() if weights else None


def _weights(digest: hashlib.blake2b, fd: int, size: int, safetensors: bool) -> None:
    spans = _safetensors_spans(digest, fd, size) if safetensors else None
    if spans is None:  # not safetensors, or a header we cannot read: spread samples over the file
        step = max(1, size // OPAQUE_SAMPLES)
        spans = [(offset, min(size, offset + step)) for offset in range(0, size, step)][:OPAQUE_SAMPLES]
    for start, end in spans:
        middle = max(start, (start + end - SAMPLE_BYTES) // 2)
        digest.update(os.pread(fd, min(SAMPLE_BYTES, end - middle), middle))


def _safetensors_spans(digest: hashlib.blake2b, fd: int, size: int) -> list[tuple[int, int]] | None:
    """Hash the header; return the byte spans of up to TENSORS_PER_FILE tensors, spread by name order."""
    head = os.pread(fd, 8, 0)
    length = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < length <= min(_MAX_HEADER, size - 8):
        return None
    header = os.pread(fd, length, 8)
    digest.update(header)
    try:
        tensors = json.loads(header)
        spans = []
        for name in sorted(tensors):
            if name == "__metadata__":
                continue
            start, end = tensors[name]["data_offsets"]
            if 0 <= start < end <= size - 8 - length:
                spans.append((8 + length + start, 8 + length + end))
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    if len(spans) > TENSORS_PER_FILE:
        spans = [spans[i * len(spans) // TENSORS_PER_FILE] for i in range(TENSORS_PER_FILE)]
    return spans


def canonical(value: Any) -> Any:
    """A JSON-able, process-independent form of a config value (no ``repr`` with addresses)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return canonical(value.value)
    if isinstance(value, Mapping):
        return {str(key): canonical(item) for key, item in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [canonical(item) for item in value]
        return sorted(items, key=json.dumps) if isinstance(value, (set, frozenset)) else items
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return canonical(dataclasses.asdict(value))
    if callable(value):  # e.g. an hf_overrides function: its name is all that is stable
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__qualname__)}"
    if hasattr(value, "model_dump"):  # pydantic models
        return canonical(value.model_dump())
    return str(value)
