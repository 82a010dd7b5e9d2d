"""Fingerprints of model weights and LoRA adapters: every byte, hashed once per file version.

Why: persisted blocks (G3 with ``disk_persist``, G4; see config) are reused by
other processes, so "the same model" must mean the same *weights*, not the
same path: a fine-tune written over ``/models/foo``, or an adapter directory
refreshed in place, must not be served KV computed with the old weights. A
sample of the bytes is not enough: a partial fine-tune that changes one
tensor of 300 keeps the header, the sizes and every sampled byte of the
others. So every byte of every weight and model-config file is hashed.

What is read: the files of a model/adapter directory whose names look like
weights (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``, ``*.gguf``) or like
configs that shape the model (``config.json``, ``params.json``,
``*.index.json``, quantization configs, ``adapter_config.json``), names
sorted, symlinks followed (Hugging Face snapshots link into content-addressed
blobs). The fingerprint covers each file's name, size and content digest; a
copy of the same files elsewhere (new inodes, new mtimes) has the same
fingerprint, so re-copying a model loses nothing.

Cost: hashing is BLAKE3 (a dependency of vLLM; hashlib's BLAKE2b when it is
missing) over 16 MiB reads, files hashed in parallel threads (hashing releases
the GIL). A file is hashed once per *version*: its digest is cached by real
path, device, inode, size, mtime and ctime (nanoseconds) in
``<cache_dir>/weights-fingerprints.json`` (the private G3 directory, see
:func:`kvbm.storage.files.ensure_private_dir`). Any write to the file changes
its ctime, which no user can set back, so a rewritten file is hashed again;
a digest taken while its file was still being written (ctime within
:data:`RACY_NS` of the hash) is not cached. The cache is written atomically
(temp file, rename) and is only read when it is a regular file of ours in a
private directory: a planted or foreign cache is ignored (a warning) and
everything is hashed. Numbers for a 16 GB checkpoint: ``bench/weights_fingerprint.py``
and docs/reliability.md.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from kvbm.storage.files import DiskSetupError, ensure_private_dir, open_private_file

logger = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20
#: A file whose ctime is this close to the moment it was hashed may still be changing
#: within one timestamp tick: its digest is used but not cached.
RACY_NS = 1_000_000_000
CACHE_NAME = "weights-fingerprints.json"
CACHE_VERSION = 1
MAX_CACHE_ENTRIES = 8192
_MAX_CACHE_BYTES = 16 << 20
_MAX_THREADS = 8
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_CONFIG = re.compile(r"(config|params|adapter_config)\.json|.*\.index\.json|.*quant.*\.json")

try:  # vLLM depends on blake3: several GB/s per core
    from blake3 import blake3 as _blake3

    _ALL_CORES = _blake3.AUTO
except ImportError:  # pragma: no cover - exercised only without vLLM's dependencies
    _blake3 = None
    _ALL_CORES = 1


class _Hasher(Protocol):
    def update(self, data: Any, /) -> Any: ...

    def hexdigest(self) -> str: ...


def _hasher(threads: int) -> tuple[str, _Hasher]:
    if _blake3 is not None:
        return "blake3", _blake3(max_threads=threads)
    return "blake2b", hashlib.blake2b(digest_size=32)


#: The algorithm a new digest uses; cached digests of another one are not reused.
HASH_NAME = _hasher(1)[0]


def fingerprint(path: str, cache_dir: str | None = None) -> str | None:
    """Hex digest of the weights at ``path`` (a model/adapter directory or one weight file);
    None when there are no readable weights there (a hub name, a remote URI).

    ``cache_dir``: where digests are remembered across processes (see the module
    docstring); None hashes every byte every time.
    """
    try:
        if os.path.isfile(path):
            directory, names = os.path.dirname(path), [os.path.basename(path)]
        elif os.path.isdir(path):
            directory = path
            names = sorted(n for n in os.listdir(path) if n.endswith(_WEIGHTS) or _CONFIG.fullmatch(n))
        else:
            return None
        if not any(name.endswith(_WEIGHTS) for name in names):
            return None
        cache = _Cache(cache_dir) if cache_dir else None
        digests = file_digests([os.path.join(directory, name) for name in names], cache)
    except OSError as exc:
        logger.warning("kvbm: cannot read %s for the weights fingerprint (%s)", exc.filename or path,
                       exc.strerror or exc)
        return None
    total = hashlib.blake2b(digest_size=16)
    for name, (size, digest) in zip(names, digests):
        total.update(f"{name}\0{size}\0{digest}\0".encode())
    return total.hexdigest()


def model_weights_fingerprint(paths: Sequence[str], hub_name: str, revision: str | None = None,
                              download_dir: str | None = None, cache_dir: str | None = None) -> str:
    """The :func:`fingerprint` of a model's weights, found at the first of ``paths`` that exists or in
    the local hub snapshot of ``hub_name`` at ``revision`` (the one the engine downloaded). Weights
    that cannot be read (streamed from object storage, a hub name not in the local cache) get a
    fingerprint unique to this call: nothing persisted is reused, with a warning."""
    where = _weights_location(paths, hub_name, revision, download_dir)
    found = fingerprint(where, cache_dir) if where else None
    if found is None:
        logger.warning(
            "kvbm: cannot read the weights of %s to fingerprint them; persisted disk blocks (G3) will not be "
            "reused across restarts of this server. Serve the model from a local directory to reuse them.",
            hub_name,
        )
        return f"unknown-{uuid.uuid4().hex}"
    return found


def _weights_location(paths: Sequence[str], hub_name: str, revision: str | None,
                      download_dir: str | None) -> str | None:
    """A local directory or file holding the weights: one of ``paths``, or the hub snapshot the
    engine downloaded (its directory is named by commit)."""
    for candidate in paths:
        if candidate and os.path.exists(candidate):
            return candidate
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(hub_name, revision=revision, cache_dir=download_dir, local_files_only=True)
    except Exception:  # not a hub name, not cached, no huggingface_hub: cannot tell
        return None


def file_digests(paths: list[str], cache: _Cache | None = None) -> list[tuple[int, str]]:
    """``(size, "algo:hexdigest")`` of every byte of each file, from the cache when the file is
    unchanged; the others hashed in parallel threads. Raises the first ``OSError``."""
    results: list[tuple[int, str] | None] = [None] * len(paths)
    todo: list[int] = []
    for i, path in enumerate(paths):
        known = cache.get(path) if cache is not None else None
        if known is None:
            todo.append(i)
        else:
            results[i] = known
    if todo:
        started = time.monotonic()
        workers = min(len(todo), _MAX_THREADS, os.cpu_count() or 1)
        # One file: let BLAKE3 spread it over the cores; several: a thread per file.
        threads = _ALL_CORES if len(todo) == 1 else 1
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kvbm-fingerprint") as pool:
            hashed = list(pool.map(lambda i: _hash_file(paths[i], threads), todo))
        nbytes = 0
        for i, (size, digest, key) in zip(todo, hashed):
            results[i] = (size, digest)
            nbytes += size
            if cache is not None and key is not None:
                cache.put(paths[i], key, digest)
        seconds = time.monotonic() - started
        logger.info("kvbm: hashed %d weight/config file(s), %.2f GB, in %.1f s for the weights fingerprint "
                    "(%d unchanged file(s) from the cache)", len(todo), nbytes / 1e9, seconds,
                    len(paths) - len(todo))
        if cache is not None:
            cache.save()
    return [r for r in results if r is not None]


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _hash_file(path: str, threads: int) -> tuple[int, str, list[int] | None]:
    """(size, digest, stat key to cache it under or None if it must not be cached)."""
    started = time.time_ns()
    # O_NONBLOCK: a FIFO planted under a weight file's name must not hang the start-up.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb", buffering=0) as f:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        name, h = _hasher(threads)
        buf = bytearray(CHUNK_BYTES)
        view = memoryview(buf)
        size = 0
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            size += n
        after = os.fstat(f.fileno())
    key = _stat_key(before)
    stable = key == _stat_key(after) and size == before.st_size and before.st_ctime_ns <= started - RACY_NS
    return size, f"{name}:{h.hexdigest()}", key if stable else None


class _Cache:
    """Digests by real path, trusted only while device, inode, size, mtime and ctime match."""

    def __init__(self, directory: str) -> None:
        self.path: str | None = None
        self.entries: dict[str, list[Any]] = {}
        self._new: dict[str, list[Any]] = {}
        try:
            directory = ensure_private_dir(directory)
        except DiskSetupError as exc:
            logger.warning("kvbm: not caching weight digests (%s); every start hashes all weight files", exc)
            return
        self.path = os.path.join(directory, CACHE_NAME)
        self.entries = self._read()

    def _read(self) -> dict[str, list[Any]]:
        assert self.path is not None
        try:
            fd = open_private_file(self.path, os.O_RDONLY, "weights fingerprint cache")
        except FileNotFoundError:
            return {}
        except (OSError, DiskSetupError) as exc:
            logger.warning("kvbm: ignoring the weights fingerprint cache: %s", exc)
            return {}
        try:
            with os.fdopen(fd, "rb") as f:
                raw = f.read(_MAX_CACHE_BYTES + 1)
        except OSError as exc:
            logger.warning("kvbm: ignoring the weights fingerprint cache %s (%s)", self.path, exc.strerror or exc)
            return {}
        try:
            data = json.loads(raw) if len(raw) <= _MAX_CACHE_BYTES else None
        except ValueError:
            data = None
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(
                data.get("files"), dict):
            logger.warning("kvbm: the weights fingerprint cache %s is unreadable; hashing weights afresh", self.path)
            return {}
        return {k: v for k, v in data["files"].items()
                if isinstance(v, list) and len(v) == 6 and all(type(x) is int for x in v[:5])
                and isinstance(v[5], str)}

    def get(self, path: str) -> tuple[int, str] | None:
        if self.path is None:
            return None
        entry = self.entries.get(os.path.realpath(path))
        if entry is None or not entry[5].startswith(HASH_NAME + ":"):
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or entry[:5] != _stat_key(st):
            return None
        return st.st_size, entry[5]

    def put(self, path: str, key: list[int], digest: str) -> None:
        if self.path is not None:
            self._new[os.path.realpath(path)] = [*key, digest]

    def save(self) -> None:
        """Merge the new digests into what is on disk now (another process may have added some)
        and replace the file atomically. A failure only costs hashing again next time."""
        if self.path is None or not self._new:
            return
        entries = self._read()
        for real in self._new:
            entries.pop(real, None)  # re-inserted last: the oldest entries go first
        entries.update(self._new)
        while len(entries) > MAX_CACHE_ENTRIES:
            entries.pop(next(iter(entries)))
        directory = os.path.dirname(self.path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{CACHE_NAME}.", suffix=".tmp", dir=directory)  # 0600, O_EXCL
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"version": CACHE_VERSION, "files": entries}, f)
                os.replace(tmp, self.path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
        except OSError as exc:
            logger.warning("kvbm: cannot write the weights fingerprint cache in %s (%s); the next start hashes "
                           "the weights again", directory, exc.strerror or exc)
            return
        self.entries, self._new = entries, {}


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
