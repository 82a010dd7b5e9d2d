"""Process entry points for tests/test_handshake.py (spawned; kept light to start fast).

Each worker owns real memory: an anonymous mapping with every page written
(or kvbm's own :class:`HostArena` when ``arena="torch"``), sized as agreed.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
from dataclasses import asdict
from multiprocessing.synchronize import Event
from typing import Any

from kvbm.config import KvbmConfig
from kvbm.runtime.handshake import (
    HandshakeError,
    LeaderHandshake,
    TierPlan,
    WorkerHandshake,
    WorkerLayout,
)

PAGE = mmap.PAGESIZE


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format=f"[pid {os.getpid()}] %(threadName)s %(message)s")


def worker_main(
    config: KvbmConfig,
    engine_id: str | None,
    rank: int,
    world_size: int,
    bytes_per_block: int,
    results: Any,
    *,
    arena: str = "mmap",
    alloc_delay_s: float = 0.0,
    allocating: Event | None = None,
    fail_alloc: bool = False,
    dead_after_s: float | None = None,
) -> None:
    _logging()

    def allocate(plan: TierPlan, progress) -> Any:
        sizes = plan.settings_sizes()
        if allocating is not None:
            allocating.set()
        if fail_alloc:
            raise MemoryError(f"cannot allocate {sizes.host_slots * bytes_per_block} bytes (test)")
        steps = 10
        for i in range(steps):  # a slow allocation, reporting progress as a real one would
            time.sleep(alloc_delay_s / steps)
            progress((i + 1) / steps)
        nbytes = sizes.host_slots * bytes_per_block
        if arena == "torch":
            from kvbm.storage.host import HostArena

            return HostArena(sizes.host_slots, bytes_per_block, pin=False)
        buf = mmap.mmap(-1, max(nbytes, PAGE))
        for offset in range(0, nbytes, PAGE):
            buf[offset] = 1  # fault every page in: the memory is really ours
        return buf

    kwargs = {} if dead_after_s is None else {"dead_after_s": dead_after_s}
    layout = WorkerLayout(rank, world_size, bytes_per_block, num_gpu_blocks=64, layout="test")
    handshake = WorkerHandshake(config, engine_id, layout, allocate, **kwargs).start()
    try:
        plan, allocation = handshake.wait()
        sizes = plan.settings_sizes()
    except HandshakeError as exc:
        results.put({"rank": rank, "pid": os.getpid(), "error": str(exc)})
        return
    if arena == "torch":
        nbytes = allocation.buffer.numel()
    else:
        nbytes = sizes.host_slots * bytes_per_block
        assert len(allocation) >= nbytes
    results.put({"rank": rank, "pid": os.getpid(), "sizes": asdict(sizes), "allocated_bytes": nbytes})


def leader_main(config: KvbmConfig, engine_id: str | None, world_size: int, results: Any) -> None:
    _logging()
    try:
        result = LeaderHandshake(config, world_size, engine_id).start().wait()
    except HandshakeError as exc:
        results.put({"leader": True, "error": str(exc)})
        return
    results.put({"leader": True, "sizes": asdict(result.plan.settings_sizes())})
