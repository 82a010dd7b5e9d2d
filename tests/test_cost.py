"""The load-or-recompute rule (kvbm.core.cost): pure arithmetic on measured rates."""

from __future__ import annotations

import pytest

from kvbm.core.cost import OnboardCost, Rate

BS, BB = 16, 2 << 20  # an 8B model's block: 16 tokens, 2 MiB


def test_rate_is_an_ewma_and_ignores_nonsense():
    r = Rate(alpha=0.5)
    r.observe(100, 1)
    assert r.value == 100
    r.observe(300, 1)
    assert r.value == 200
    for amount, seconds in ((0, 1), (5, 0), (-1, 1), (float("inf"), 1)):
        r.observe(amount, seconds)
    assert r.value == 200


def test_loads_before_anything_is_measured():
    cost = OnboardCost(block_size=BS, block_bytes=BB)
    assert cost.worth_loading("G3", 100)
    assert cost.choose([("G2", 10), ("G3", 5)]) == [10, 5]


def test_fast_host_and_slow_disk():
    cost = OnboardCost(block_size=BS, block_bytes=BB)
    cost.observe_step(16_000, 1.0)  # prefill 16K tokens/s: a block computes in 1 ms
    cost.observe_load("G2", 50e9, 1.0)  # 50 GB/s: a 2 MiB block in 0.04 ms
    cost.observe_load("G3", 1e9, 1.0)  # 1 GB/s: a block in 2.1 ms, slower than computing it
    assert cost.worth_loading("G2", 100) and not cost.worth_loading("G3", 100)
    assert cost.choose([("G2", 10), ("G3", 5)]) == [10, 0]


def test_a_losing_tier_ends_the_load_even_if_a_later_one_would_win():
    cost = OnboardCost(block_size=BS, block_bytes=BB)
    cost.observe_step(16_000, 1.0)
    cost.observe_load("G2", 0.1e9, 1.0)  # a throttled host tier
    cost.observe_load("G3", 50e9, 1.0)
    assert cost.choose([("G2", 4), ("G3", 6)]) == [0, 0]  # a prefix must stay contiguous


def test_fixed_costs_and_small_steps():
    cost = OnboardCost(block_size=BS, block_bytes=BB, extra_seconds={"G3": 0.05})
    cost.observe_step(100, 0.001)  # a decode step: does not measure prefill
    assert cost.prefill.value is None
    cost.observe_step(16_000, 1.0)
    cost.observe_load("G3", 10e9, 1.0)  # fast enough per block, but a 50 ms wait...
    assert not cost.worth_loading("G3", 10)  # ...loses on a short prefix (10 ms of prefill)
    assert cost.worth_loading("G3", 1000)  # and wins on a long one (1 s of prefill)


@pytest.mark.parametrize("policy, want", [("always", [10, 5]), ("never", [0, 0])])
def test_forcing_either_way(policy, want):
    cost = OnboardCost(policy=policy, block_size=BS, block_bytes=BB)
    cost.observe_step(16_000, 1.0)
    cost.observe_load("G3", 1e6, 1.0)
    assert cost.choose([("G2", 10), ("G3", 5)]) == want


def test_unknown_policy():
    with pytest.raises(ValueError, match="cost"):
        OnboardCost(policy="sometimes")


def test_an_unmeasured_slow_tier_is_probed_with_a_few_blocks_only():
    cost = OnboardCost(block_size=BS, block_bytes=BB, probe_blocks={"G3": 2})
    assert cost.choose([("G2", 10), ("G3", 8), ("G4", 5)]) == [10, 2, 0]  # G2 whole; G3 probed; G4 cut off
    cost.observe_step(16_000, 1.0)
    cost.observe_load("G3", 50e9, 1.0)  # measured fast: loaded whole from now on
    assert cost.choose([("G2", 10), ("G3", 8)]) == [10, 8]
    forced = OnboardCost(policy="always", block_size=BS, block_bytes=BB, probe_blocks={"G3": 2})
    assert forced.choose([("G3", 8)]) == [8]


def test_a_losing_tier_is_measured_again_now_and_then():
    """One slow sample (a stalled or cold first load) must not keep a fast tier unused for good:
    every reprobe_every-th loss loads a probe's worth, and a fast measurement brings it back."""
    cost = OnboardCost(block_size=BS, block_bytes=BB, probe_blocks={"G3": 3}, reprobe_every=4)
    cost.observe_step(16_000, 1.0)
    cost.observe_load("G2", 0.01e9, 1.0)  # the first, cold load: 10 MB/s
    cost.observe_load("G3", 0.01e9, 1.0)
    got = [cost.choose([("G2", 10)]) for _ in range(8)]
    assert got == [[0], [0], [0], [2], [0], [0], [0], [2]]  # G2 has no probe size: REPROBE_BLOCKS
    assert [cost.choose([("G3", 10)]) for _ in range(4)] == [[0], [0], [0], [3]]
    for _ in range(20):  # what the probes measured: host memory is fast after all
        cost.observe_load("G2", 50e9, 1.0)
    assert cost.choose([("G2", 10), ("G3", 5)]) == [10, 0]
    never = OnboardCost(policy="never", block_size=BS, block_bytes=BB, reprobe_every=1)
    assert never.choose([("G2", 10)]) == [0]
