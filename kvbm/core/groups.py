"""KV-cache groups: what the planner needs to know about each of vLLM's block tables.

A hybrid model (sliding-window + full attention, as gpt-oss, Gemma 3 or Llama 4)
runs under vLLM's hybrid KV-cache manager with one block table per *group* of
layers, all drawing blocks from one pool of equal-sized pages. Every group has
a block at every position of a request, but they differ in what a cache hit
needs:

* full attention reads every earlier token, so a hit of ``L`` blocks needs the
  group's blocks ``0 .. L-1`` (vLLM's own GPU prefix hit covers the first ones,
  kvbm loads the rest);
* a sliding window of ``W`` tokens reads only the last ``W - 1`` tokens, so a hit
  ending at block ``L`` needs only the ``window_blocks`` blocks before ``L``; vLLM
  gives the earlier positions its null block, and kvbm loads nothing there.

kvbm keeps each group's blocks as blocks of their own (a group's KV bytes differ
from another group's for the same tokens): each group's hash chain starts from a
root of its own, and the tiers, pools and transfers do not know groups exist. A
group is data; a new kind of group is a new :class:`KVGroup`, not new control flow.

Pure: no torch, no vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import blake2b

from kvbm.core.hashing import HASH_BYTES, BlockHash


@dataclass(frozen=True)
class KVGroup:
    """One KV-cache group as the planner sees it."""

    #: What sets this group's KV apart from the others' for equal tokens (its index, its
    #: attention type, its window): folded into the root of its blocks' hashes. "" for the
    #: only group of a model with one, whose hashes then are the plain request chain.
    tag: str = ""
    #: None: a hit needs every block of the prefix (full attention, MLA). An int: a hit
    #: ending at block L needs only blocks L - window_blocks .. L - 1 (a sliding window).
    window_blocks: int | None = None
    #: vLLM reads this group's hit block before the step's forward (it copies a Mamba state
    #: out of block L-1 into the request's running block ahead of the connector's in-step
    #: load), so a load into it must finish before the request is scheduled: asynchronous.
    load_before_step: bool = False

    @property
    def windowed(self) -> bool:
        """Needs only the blocks just before a hit point; vLLM frees its older blocks
        while the request runs (so a store of them must land before the next step)."""
        return self.window_blocks is not None


#: A model with one KV-cache group of full attention: what every planner assumes by default.
SINGLE_FULL: tuple[KVGroup, ...] = (KVGroup(),)


def group_root(root: BlockHash, group: KVGroup) -> BlockHash:
    """The root of ``group``'s hash chain for a request whose chain root is ``root``."""
    if not group.tag:
        return root
    return blake2b(root + b"|kv-group|" + group.tag.encode()).digest()[:HASH_BYTES]


def check_groups(groups: Sequence[KVGroup]) -> None:
    """Reject group lists the planner cannot serve (a bug in the adapter, not a user error)."""
    if not groups:
        raise ValueError("kvbm: a model has at least one KV-cache group")
    tags = [g.tag for g in groups]
    if len(groups) > 1 and (len(set(tags)) != len(tags) or not all(tags)):
        raise ValueError(f"kvbm: KV-cache groups need distinct, non-empty tags: {tags}")
    for g in groups:
        if g.window_blocks is not None and g.window_blocks < 1:
            raise ValueError(f"kvbm: group {g.tag!r} has a window of {g.window_blocks} blocks")
