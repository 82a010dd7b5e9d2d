"""What tells LoRA adapters apart in block identity, remembered per leader."""

from __future__ import annotations

import json
import uuid
from collections import OrderedDict
from typing import Any

from kvbm.runtime.fingerprint import fingerprint

__all__ = ["LORA_KEYS", "LoraKeys"]

#: Adapters remembered per leader (one entry per distinct adapter; bounded for servers that load many).
LORA_KEYS = 4096


class LoraKeys:
    """The key of each adapter a request uses, folded into its hash root.

    vLLM keys its own prefix cache on the adapter's name *and path*, so a name
    re-pointed at another adapter never reuses KV; the int id goes in too (vLLM's
    workers cache loaded adapters by it). When blocks outlive the process (G3
    persists, or G4 is shared), or the request reloads the adapter in place, the
    same path may hold other weights than before: the files' fingerprint goes in
    too (read once per adapter, cached; unreadable ones are unique to this process,
    so nothing is reused across restarts).
    """

    def __init__(self, blocks_outlive_process: bool, limit: int = LORA_KEYS) -> None:
        self.blocks_outlive_process = blocks_outlive_process
        self.limit = max(1, limit)
        self._keys: OrderedDict[tuple[str, int, str], str] = OrderedDict()

    def key(self, name: str, int_id: int, path: str, *, reload: bool = False) -> str:
        adapter = (name, int_id, path)
        cached = self._keys.get(adapter)
        if cached is None or reload:
            weights = None
            if self.blocks_outlive_process or reload:
                weights = fingerprint(path) or f"unknown-{uuid.uuid4().hex}"
            cached = json.dumps([*adapter, weights])
            self._keys[adapter] = cached
            while len(self._keys) > self.limit:
                self._keys.popitem(last=False)
        self._keys.move_to_end(adapter)
        return cached

    def of_request(self, adapter: Any | None) -> str | None:
        """The :meth:`key` of a request's adapter (vLLM's ``LoRARequest``, read duck-typed); None without one."""
        if not adapter:
            return None
        return self.key(adapter.lora_name, adapter.lora_int_id, getattr(adapter, "lora_path", "") or "",
                        reload=bool(getattr(adapter, "load_inplace", False)))
