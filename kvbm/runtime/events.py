"""KV events for kvbm's tiers: what a KV-aware router (NVIDIA Dynamo's) needs to credit G2/G3/G4.

vLLM publishes ``BlockStored`` / ``BlockRemoved`` for its own GPU cache (G1) when
``--kv-events-config`` enables them, and adds whatever the scheduler-side
connector returns from ``take_events()`` to the same stream, in the same step.
This module decides those events for kvbm's tiers as neutral :class:`TierEvent`
records, and :class:`EngineEvents` builds the engine's structs from them (vLLM's, from
``vllm/distributed/kv_events.py``, which the adapter hands it as an :class:`EventSchema`):

* **Same block identity as vLLM's own events.** ``block_hashes`` and
  ``parent_block_hash`` are vLLM's hashes of the request's blocks
  (``request.block_hashes``, converted as vLLM converts its own), not kvbm's
  internal hashes; ``token_ids``, ``block_size`` and the LoRA fields are the
  block's, as in vLLM's G1 events. Dynamo's router indexes a lower tier as a
  continuation of the device prefix, following these parent links, and hashes
  ``token_ids`` itself; so a G2 block is found exactly where vLLM's G1 block
  would have been.
* **One index per medium.** ``medium`` is the tier's: G2 (host memory) →
  ``"CPU"``, G3 (disk) → ``"DISK"``, G4 (shared store) → ``"REMOTE"``. Dynamo's
  router keeps one index per storage tier (device, host-pinned, disk, external)
  and credits a worker ``device + host_weight·G2 + disk_weight·G3`` blocks of
  prefix (``--router-host-cache-hit-weight`` 0.75, ``--router-disk-cache-hit-weight``
  0.25 by default). So events are *per medium*: a block spilled G2→G3 is stored
  in both (one ``BlockStored`` each, never two for the same medium without a
  ``BlockRemoved`` between), and evicting it from G2 removes it from the
  ``"CPU"`` index only.
* **Only what a load can use.** A block is announced when its copy is
  committed (every rank reported it), never while pending; removed when the
  tier evicts or drops it. G4 never reports evictions (Redis evicts on its own,
  other servers share it): G4 blocks are remembered in a bounded LRU, and one
  that falls out of it is announced removed — the router may under-credit G4,
  never over-credit it.

What is not announced: blocks of requests whose tokens alone do not identify
them (multimodal inputs, prompt embeddings: :func:`request_blocks`
answers None for them), and G3 blocks restored from the journal after a
restart (their tokens are not kept). Both are safe misses.

Cost on the scheduler thread: O(1) per block stored, committed or removed,
plus one C-level slice of the block's tokens when it is first stored. Memory:
the tokens of each block some tier holds (4 bytes per token), vLLM's hash, and
a bounded LRU of blocks no local tier holds.
"""

from __future__ import annotations

import logging
from array import array
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from kvbm.core.hashing import BlockHash
from kvbm.core.tiers import DISK, HOST, REMOTE, Tier

if TYPE_CHECKING:
    from kvbm.runtime.leader import LeaderRuntime

logger = logging.getLogger(__name__)

#: The ``medium`` of a tier's events, by the tier's medium. Dynamo 1.6's router reads "GPU"/"DEVICE"
#: as device, "CPU"/"CPU_PINNED" as host-pinned, "DISK"/"NVME"/"STORAGE" as disk, "REMOTE"/"SHARED"
#: as external; vLLM's own offloaders use "CPU" too.
MEDIUMS: dict[str, str] = {HOST: "CPU", DISK: "DISK", REMOTE: "REMOTE"}

#: Blocks remembered while no local tier holds them: in flight to their first tier, spilling, or only
#: in the shared tier (G4). The oldest is forgotten first (and, if G4 held it, announced removed).
LOOSE_BLOCKS = 65536


class RequestBlocks(NamedTuple):
    """What the engine knows of a request's blocks: its own block hashes (one per full block it
    hashed), all its token ids, its LoRA adapter's id and name (None without one)."""

    hashes: Sequence[Any]
    tokens: Sequence[int]
    lora_id: int | None
    lora_name: str | None


#: The adapter's view of a live request, by id; None: not announced (unknown, or its tokens alone do
#: not identify its blocks). Called once per block when the block is first stored.
BlockSource = Callable[[str], "RequestBlocks | None"]


@dataclass(frozen=True, slots=True)
class TierEvent:
    """One block stored in or removed from a tier's medium, in engine-neutral terms (the fields of
    vLLM's ``BlockStored``; a removal carries only ``block_hashes`` and ``medium``)."""

    stored: bool
    medium: str | None
    block_hashes: list[Any]
    parent_block_hash: Any = None
    token_ids: list[int] | None = None
    block_size: int = 0
    lora_id: int | None = None
    lora_name: str | None = None


class _Block:
    __slots__ = ("vllm_hash", "parent", "tokens", "lora_id", "lora_name", "tiers")

    def __init__(self, vllm_hash: Any, parent: Any, tokens: array, lora_id: int | None,
                 lora_name: str | None) -> None:
        self.vllm_hash = vllm_hash
        self.parent = parent
        self.tokens = tokens
        self.lora_id = lora_id
        self.lora_name = lora_name
        self.tiers = 0  # bit per tier of the chain that holds it (committed)


def _same(value: Any) -> Any:
    return value


class TierEventRecorder:
    """The planner's :class:`~kvbm.core.tiers.TierListener` that turns tier changes into :class:`TierEvent`\\ s.

    ``source`` gives a request's engine-side block hashes, tokens and LoRA; ``convert`` maps one of
    those hashes to the form the engine publishes (vLLM's ``maybe_convert_block_hash``), once per block.
    Attach it with :meth:`kvbm.runtime.leader.LeaderRuntime.attach_tier_listener`."""

    def __init__(self, chain: Sequence[Tier], block_size: int, source: BlockSource,
                 convert: Callable[[Any], Any] = _same, loose_blocks: int = LOOSE_BLOCKS) -> None:
        self.block_size = block_size
        self._source = source
        self._convert = convert
        self._bit = {tier.name: 1 << i for i, tier in enumerate(chain)}
        self.mediums: dict[str, str | None] = {tier.name: MEDIUMS.get(tier.medium) for tier in chain}
        self._local = sum(1 << i for i, tier in enumerate(chain) if not tier.shared)
        self._blocks: dict[BlockHash, _Block] = {}
        self._loose: OrderedDict[BlockHash, None] = OrderedDict()
        self._loose_cap = max(1, loose_blocks)
        self._events: list[TierEvent] = []
        #: Blocks announced stored / removed, per tier (for tests and metrics).
        self.stored: dict[str, int] = dict.fromkeys(self._bit, 0)
        self.removed_count: dict[str, int] = dict.fromkeys(self._bit, 0)

    # ---- TierListener ---------------------------------------------------
    def storing(self, req_id: str, block: int, block_hash: BlockHash) -> None:
        if block_hash in self._blocks:
            return
        request = self._source(req_id)
        if request is None:
            return
        hashes = request.hashes
        if block >= len(hashes):
            return  # the engine did not hash it (prefix caching off): nothing a router could match
        bs = self.block_size
        self._blocks[block_hash] = _Block(
            self._convert(hashes[block]), self._convert(hashes[block - 1]) if block else None,
            array("I", request.tokens[block * bs:(block + 1) * bs]), request.lora_id, request.lora_name,
        )
        self._loosen(block_hash)

    def committed(self, tier: str, hashes: Sequence[BlockHash]) -> None:
        bit = self._bit.get(tier)
        medium = self.mediums.get(tier)
        if bit is None or medium is None:
            return
        for block_hash in hashes:
            block = self._blocks.get(block_hash)
            if block is None or block.tiers & bit:
                continue
            block.tiers |= bit
            if block.tiers & self._local:
                self._loose.pop(block_hash, None)
            else:
                self._loosen(block_hash)  # only in G4: the freshest loose block
            self._events.append(TierEvent(True, medium, [block.vllm_hash], block.parent, block.tokens.tolist(),
                                          len(block.tokens), block.lora_id, block.lora_name))
            self.stored[tier] += 1

    def removed(self, tier: str, block_hash: BlockHash) -> None:
        block = self._blocks.get(block_hash)
        bit = self._bit.get(tier)
        if block is None or bit is None:
            return
        if block.tiers & bit:
            block.tiers &= ~bit
            self._events.append(TierEvent(False, self.mediums[tier], [block.vllm_hash]))
            self.removed_count[tier] += 1
        if not block.tiers & self._local:
            self._loosen(block_hash)

    # ---- events -----------------------------------------------------------
    def take_events(self) -> list[TierEvent]:
        """Events since the last call, oldest first (vLLM's scheduler publishes them with G1's)."""
        events, self._events = self._events, []
        return events

    @property
    def num_blocks(self) -> int:
        """Blocks remembered (held by a tier, or loose)."""
        return len(self._blocks)

    def _loosen(self, block_hash: BlockHash) -> None:
        self._loose[block_hash] = None
        self._loose.move_to_end(block_hash)
        while len(self._loose) > self._loose_cap:
            old, _ = self._loose.popitem(last=False)
            block = self._blocks.pop(old, None)
            if block is None:
                continue
            for tier, bit in self._bit.items():  # only shared tiers can be set here
                if block.tiers & bit:
                    self._events.append(TierEvent(False, self.mediums[tier], [block.vllm_hash]))
                    self.removed_count[tier] += 1


def kv_events_enabled(vllm_config: Any) -> bool:
    """Whether vLLM publishes KV events (``--kv-events-config`` with ``enable_kv_cache_events``)."""
    events = getattr(vllm_config, "kv_events_config", None)
    return bool(events is not None and getattr(events, "enable_kv_cache_events", False))


def request_blocks(request: Any | None) -> RequestBlocks | None:
    """A vLLM ``Request``'s blocks, read duck-typed; None for requests whose tokens alone do not
    identify their blocks (multimodal, embeddings)."""
    if request is None or getattr(request, "mm_features", None) or getattr(request, "prompt_embeds", None) is not None:
        return None
    lora = request.lora_request
    return RequestBlocks(getattr(request, "block_hashes", None) or (), request.all_token_ids,
                         getattr(lora, "adapter_id", None) if lora is not None else None,
                         getattr(lora, "name", None) if lora is not None else None)


@dataclass(frozen=True)
class EventSchema:
    """The engine's event structs (vLLM's ``BlockStored`` / ``BlockRemoved``) and how it publishes a
    block hash (vLLM's ``maybe_convert_block_hash``); the adapter imports them
    (:func:`kvbm.vllm_integration.compat.kv_event_schema`)."""

    stored: type
    removed: type
    convert: Callable[[Any], Any] = _same


class EngineEvents:
    """A :class:`TierEventRecorder` fed with the engine's live requests (vLLM's, by id), its records
    returned as the engine's structs, keeping only the fields this release's have (older ones lack
    medium, lora_name, ...)."""

    def __init__(self, chain: Sequence[Tier], block_size: int, requests: Mapping[str, Any], schema: EventSchema,
                 loose_blocks: int = LOOSE_BLOCKS) -> None:
        self._schema = {stored: (cls, set(getattr(cls, "__struct_fields__", ())))
                        for stored, cls in ((True, schema.stored), (False, schema.removed))}
        self.tiers = TierEventRecorder(chain, block_size, lambda req_id: request_blocks(requests.get(req_id)),
                                       schema.convert, loose_blocks)
        self._settle: Callable[[], None] = lambda: None  # the leader's LeaderRuntime.settle, once attached

    @classmethod
    def attach(cls, vllm_config: Any, runtime: LeaderRuntime, requests: Mapping[str, Any],
               schema: Callable[[], EventSchema]) -> EngineEvents | None:
        """A recorder listening to ``runtime``'s tiers when vLLM publishes KV events; None (no cost) otherwise.
        ``schema`` is called only then (it imports vLLM's event structs)."""
        if not kv_events_enabled(vllm_config):
            return None
        try:
            recorder = cls(runtime.chain, runtime.block_size, requests, schema())
        except ImportError as exc:  # a vLLM without the KV event schema kvbm builds on
            logger.warning("kvbm: not publishing KV events for its tiers (this vLLM lacks %s)", exc)
            return None
        runtime.attach_tier_listener(recorder.tiers)
        recorder._settle = runtime.settle
        logger.info("kvbm: publishing KV events for %s",
                    ", ".join(f"{t.name} (medium {recorder.tiers.mediums[t.name]})" for t in runtime.chain))
        return recorder

    def take_events(self) -> list[Any]:
        """The engine's events since the last call, oldest first (vLLM's scheduler publishes them with G1's),
        once the leader's spill policy (whose reservations evict) is done."""
        self._settle()
        return [self._struct(event) for event in self.tiers.take_events()]

    def _struct(self, event: TierEvent) -> Any:
        cls, known = self._schema[event.stored]
        fields = {"block_hashes": event.block_hashes, "medium": event.medium}
        if event.stored:
            fields.update(parent_block_hash=event.parent_block_hash, token_ids=event.token_ids,
                          block_size=event.block_size, lora_id=event.lora_id, lora_name=event.lora_name)
        return cls(**{k: v for k, v in fields.items() if k in known})
