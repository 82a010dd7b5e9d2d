"""Load or recompute? The load decision, from rates kvbm measures itself.

A prefix found in a tier is worth loading only when copying it to the GPU is
faster than computing it again. Pinned host memory (G2) always wins, but a
disk (G3) read at ~2 GB/s moves about as many tokens per second as an H200
prefills for an 8B model, and a slow or busy disk loses: then loading makes
TTFT worse than no cache at all. So per tier kvbm keeps the bandwidth its own
loads achieved and the engine's prefill rate (tokens per second of steps that
computed many tokens), and for each match it keeps the tiers, in chain order,
whose blocks load faster than they compute; the rest of the prefix is
recomputed (a prefix must stay contiguous, so the first tier that loses ends
the load).

Pure arithmetic on a few numbers: no torch, no vLLM, O(1) per decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: Blocks a losing tier with no ``probe_blocks`` of its own loads when it is measured again.
REPROBE_BLOCKS = 2
#: ``onboard_policy`` values (see config).
POLICIES = ("cost", "always", "never")


@dataclass
class Rate:
    """An exponentially weighted rate (units per second) over observed batches."""

    alpha: float = 0.2
    value: float | None = None

    def observe(self, amount: float, seconds: float) -> None:
        if amount <= 0 or seconds <= 0 or not math.isfinite(amount / seconds):
            return
        rate = amount / seconds
        self.value = rate if self.value is None else (1 - self.alpha) * self.value + self.alpha * rate


@dataclass
class OnboardCost:
    """Decides, per tier, whether a matched prefix is loaded or recomputed.

    ``policy``: "cost" decides from measured rates (loads while nothing is
    measured yet: kvbm must try a tier to learn its speed), "always" loads
    whatever matched, "never" recomputes everything (kvbm then only stores).
    ``extra_seconds`` per tier is the fixed price of a load beyond its bytes
    (an asynchronous load waits at least one more engine step).

    ``probe_blocks`` bounds what learning costs: until a tier's bandwidth is
    measured, a match loads at most that many blocks from it (and nothing from
    the tiers after it) — enough to time a read; a disk that turns out to
    crawl then cost a block or two of one request, not every block of many.
    Tiers not named there (host memory) are loaded whole from the start.

    ``reprobe_every`` keeps a losing tier's measurement current: a tier that
    loses is no longer loaded, so nothing would measure it again, and one slow
    sample (a load stalled behind a GC pause or a busy disk, or the first,
    cold load of a process) would keep a fast tier unused for good. Every
    ``reprobe_every``-th match that a tier loses loads a probe's worth of it
    anyway (its ``probe_blocks``, else ``REPROBE_BLOCKS``), and the next
    decisions use what that load measured.
    """

    policy: str = "cost"
    block_size: int = 16
    block_bytes: int = 1
    #: Only steps computing at least this many tokens measure the prefill rate
    #: (a decode step's tokens per second says nothing about prefill).
    min_prefill_tokens: int = 256
    prefill: Rate = field(default_factory=Rate)
    bandwidth: dict[str, Rate] = field(default_factory=dict)
    extra_seconds: dict[str, float] = field(default_factory=dict)
    probe_blocks: dict[str, int] = field(default_factory=dict)
    reprobe_every: int = 32
    _losses: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown load policy {self.policy!r}; choose one of {POLICIES}")

    def observe_load(self, tier: str, nbytes: float, seconds: float) -> None:
        self.bandwidth.setdefault(tier, Rate()).observe(nbytes, seconds)

    def observe_step(self, tokens: int, seconds: float) -> None:
        if tokens >= self.min_prefill_tokens:
            self.prefill.observe(tokens, seconds)

    def worth_loading(self, tier: str, blocks: int) -> bool:
        """Whether loading ``blocks`` blocks from ``tier`` beats computing them."""
        if blocks <= 0 or self.policy == "always":
            return blocks > 0
        if self.policy == "never":
            return False
        bandwidth = self.bandwidth.get(tier)
        if bandwidth is None or bandwidth.value is None or self.prefill.value is None:
            return True  # not measured yet: load, and learn
        load = blocks * self.block_bytes / bandwidth.value + self.extra_seconds.get(tier, 0.0)
        compute = blocks * self.block_size / self.prefill.value
        return load < compute

    def measured(self, tier: str) -> bool:
        rate = self.bandwidth.get(tier)
        return rate is not None and rate.value is not None

    def choose(self, parts: list[tuple[str, int]]) -> list[int]:
        """Per (tier, blocks) part of a match in chain order, the blocks to load: every
        part up to the first that loses to recomputing (or is cut short to probe an
        unmeasured tier), nothing after it."""
        chosen: list[int] = []
        stop = False
        for tier, blocks in parts:
            if stop or blocks <= 0:
                take = 0
            elif self.worth_loading(tier, blocks):
                take = blocks
            else:
                take = self._reprobe(tier, blocks)
            probe = self.probe_blocks.get(tier)
            if self.policy == "cost" and probe is not None and take > probe and not self.measured(tier):
                take = probe
            stop = stop or take < blocks
            chosen.append(take)
        return chosen

    def _reprobe(self, tier: str, blocks: int) -> int:
        """Blocks of a losing ``tier`` to load anyway: a probe's worth on every ``reprobe_every``-th
        loss (policy "cost" only), else none."""
        if self.policy != "cost":
            return 0
        losses = self._losses.get(tier, 0) + 1
        self._losses[tier] = losses
        if losses % self.reprobe_every:
            return 0
        return min(blocks, self.probe_blocks.get(tier, REPROBE_BLOCKS))

    def describe(self) -> str:
        rates = ", ".join(f"{tier} {r.value / 1e9:.2f} GB/s" for tier, r in sorted(self.bandwidth.items())
                          if r.value is not None)
        prefill = f"{self.prefill.value:,.0f} tokens/s" if self.prefill.value is not None else "not measured"
        return f"policy {self.policy}; prefill {prefill}; loads {rates or 'not measured'}"
