"""The disk offload filter (spec §4), driven by a fake clock."""

from __future__ import annotations

import pytest

from kvbm.core.filter import CAP, FrequencyFilter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


PERIOD = 600.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, **kw) -> FrequencyFilter:
    return FrequencyFilter(clock=clock, decay_period_s=PERIOD, **kw)


def test_sightings_double(clock):
    f = make(clock)
    assert [f.observe(7) for _ in range(5)] == [1, 2, 4, 8, 16]
    assert f.frequency(7) == 16
    assert f.frequency(8) == 0
    assert len(f) == 1


def test_offload_after_second_sighting(clock):
    f = make(clock)
    assert not f.should_offload(1)  # never seen
    f.observe(1)
    assert not f.should_offload(1)
    f.observe(1)
    assert f.should_offload(1)
    assert f.stats.rejections == 2
    assert f.stats.admitted == 1


def test_threshold_is_configurable(clock):
    f = make(clock, threshold=4)
    f.observe(1)
    f.observe(1)
    assert not f.should_offload(1)  # 2 < 4
    f.observe(1)
    assert f.should_offload(1)  # 4


def test_decay_subtracts_one_per_period_and_forgets(clock):
    f = make(clock)
    f.observe(1)
    f.observe(1)  # 2
    f.observe(2)  # 1
    clock.advance(PERIOD - 1)
    assert f.frequency(1) == 2  # not yet
    clock.advance(1)
    assert f.frequency(1) == 1
    assert 2 not in f  # 1 - 1 = 0: forgotten
    assert not f.should_offload(1)
    clock.advance(PERIOD)
    assert len(f) == 0
    assert f.stats.decays == 2
    assert f.stats.forgotten == 2
    # a forgotten block starts over
    assert f.observe(2) == 1


def test_decay_catches_up_missed_periods(clock):
    f = make(clock)
    for _ in range(4):
        f.observe(1)  # 8
    f.observe(2)
    f.observe(2)  # 2
    clock.advance(3 * PERIOD + 10)  # three periods missed
    assert f.frequency(1) == 5
    assert 2 not in f
    assert f.stats.decays == 3
    # the 10 s left over count toward the next period
    clock.advance(PERIOD - 10)
    assert f.frequency(1) == 4


def test_partial_periods_accumulate(clock):
    f = make(clock)
    f.observe(1)
    f.observe(1)  # 2
    clock.advance(PERIOD / 2)
    assert f.frequency(1) == 2
    clock.advance(PERIOD / 2)
    assert f.frequency(1) == 1


def test_doubling_after_decay(clock):
    f = make(clock)
    f.observe(1)
    f.observe(1)
    f.observe(1)  # 4
    clock.advance(PERIOD)  # 3
    assert f.observe(1) == 6


def test_bound_triggers_early_decay(clock):
    f = make(clock, max_entries=3)
    f.observe("a")
    f.observe("b")
    f.observe("b")
    f.observe("b")  # b = 4
    f.observe("c")
    assert len(f) == 3
    f.observe("d")  # would be a 4th entry: one decay step frees a and c
    assert len(f) == 2
    assert f.frequency("b") == 3
    assert f.frequency("d") == 1
    assert f.stats.decays == 1
    assert f.stats.early_decays == 1
    # the early decay restarts the period
    clock.advance(PERIOD - 1)
    assert f.frequency("b") == 3
    clock.advance(1)
    assert f.frequency("b") == 2


def test_bound_repeats_decay_until_under(clock):
    f = make(clock, max_entries=2)
    for _ in range(3):
        f.observe("a")  # 4
    f.observe("b")
    f.observe("b")  # 2
    f.observe("c")  # two decay steps are needed before anything is forgotten
    assert f.stats.early_decays == 2
    assert f.frequency("a") == 2
    assert "b" not in f
    assert f.frequency("c") == 1
    assert len(f) == 2


def test_existing_entries_do_not_trigger_bound(clock):
    f = make(clock, max_entries=2)
    f.observe(1)
    f.observe(2)
    f.observe(1)  # already present: no decay
    assert f.stats.decays == 0
    assert f.frequency(1) == 2


def test_bound_holds_under_churn(clock):
    f = make(clock, max_entries=100)
    for i in range(10_000):
        f.observe(i % 357)
        assert len(f) <= 100


def test_saturation(clock):
    f = make(clock)
    for _ in range(100):
        freq = f.observe(1)
    assert freq == CAP
    clock.advance(PERIOD)
    assert f.frequency(1) == CAP - 1
    assert f.observe(1) == CAP


def test_invalid_arguments():
    with pytest.raises(ValueError, match="threshold"):
        FrequencyFilter(threshold=0)
    with pytest.raises(ValueError, match="decay_period_s"):
        FrequencyFilter(decay_period_s=0)
    with pytest.raises(ValueError, match="max_entries"):
        FrequencyFilter(max_entries=0)


def test_defaults_match_reference():
    f = FrequencyFilter()
    assert f.threshold == 2
    assert f.decay_period_s == 600.0
    assert f.max_entries == 1_000_000


class _ReferenceFilter:
    """The filter's rules written the obvious way (a pass over the table per decay),
    to check the O(1)-per-entry implementation against."""

    def __init__(self, clock, max_entries: int) -> None:
        self.clock, self.max_entries, self.freq, self.start = clock, max_entries, {}, clock()
        self.decays = self.early = self.forgotten = 0

    def decay(self, steps: int) -> None:
        before = len(self.freq)
        self.freq = {h: f - steps for h, f in self.freq.items() if f > steps}
        self.decays += steps
        self.forgotten += before - len(self.freq)

    def catch_up(self) -> None:
        periods = int((self.clock() - self.start) // PERIOD)
        if periods > 0:
            self.start += periods * PERIOD
            self.decay(periods)

    def observe(self, h) -> int:
        self.catch_up()
        if h not in self.freq:
            if len(self.freq) >= self.max_entries:
                steps = min(self.freq.values())
                self.decay(steps)
                self.early += steps
                self.start = self.clock()
            self.freq[h] = 1
        else:
            self.freq[h] = min(self.freq[h] * 2, CAP)
        return self.freq[h]


@pytest.mark.parametrize("seed", range(5))
def test_matches_the_reference_rules(clock, seed):
    import random

    rng = random.Random(seed)
    f = make(clock, max_entries=50)
    ref = _ReferenceFilter(clock, 50)
    hot = list(range(30))
    for _ in range(20_000):
        roll = rng.random()
        if roll < 0.002:
            clock.advance(rng.choice([PERIOD / 3, PERIOD, 2.5 * PERIOD]))
        h = rng.choice(hot) if roll < 0.6 else rng.randrange(30, 400)
        assert f.observe(h) == ref.observe(h)
        if roll > 0.99:
            ref.catch_up()
            assert {k: f.frequency(k) for k in ref.freq} == ref.freq
            assert len(f) == len(ref.freq)
    ref.catch_up()
    assert len(f) == len(ref.freq)  # (sweeps what a decay left: forgotten entries are counted when dropped)
    s = f.stats
    assert (s.decays, s.early_decays, s.forgotten) == (ref.decays, ref.early, ref.forgotten)
    assert s.early_decays > 0 and s.forgotten > 0


@pytest.mark.parametrize("max_entries", [1_000, 12])  # room for the batch; a batch that forces early decays
def test_batched_calls_match_one_by_one(clock, max_entries):
    """observe_distinct and frequencies()+count_decisions give what observe and should_offload give."""
    one, many = make(clock, max_entries=max_entries), make(clock, max_entries=max_entries)
    for f in (one, many):
        for h in ("a", "b", "a", "c"):
            f.observe(h)
    batch = ["a", "d", "b", "e", "f", "g", "h", "i", "j", "k"]
    for h in batch:
        one.observe(h)
    many.observe_distinct(batch)
    assert one._stored == many._stored and one.stats == many.stats and len(one) == len(many)
    clock.advance(PERIOD)
    decisions = [one.should_offload(h, 2) for h in batch]
    freqs = many.frequencies(batch)
    many.count_decisions(sum(f >= 2 for f in freqs), sum(f < 2 for f in freqs))
    assert [f >= 2 for f in freqs] == decisions and len(one) == len(many) and one.stats == many.stats
    assert many.has_room(max_entries - len(many) - 1) and not many.has_room(max_entries - len(many))


@pytest.mark.parametrize("seed", range(3))
def test_batches_match_the_reference_rules(clock, seed):
    """observe_distinct's frequencies, decays (periodic and early) and stats are the reference's
    one-by-one ones; every entry stays filed once, at a value no higher than its own (the table's
    memory stays proportional to its entries, however often a block is seen)."""
    import random

    rng = random.Random(seed)
    f = make(clock, max_entries=60)
    ref = _ReferenceFilter(clock, 60)
    for _ in range(3_000):
        if rng.random() < 0.01:
            clock.advance(rng.choice([PERIOD / 2, PERIOD, 3 * PERIOD]))
        keys = 70 if rng.random() < 0.9 else 400  # mostly blocks seen again since they were filed
        batch = list(dict.fromkeys(rng.randrange(keys) for _ in range(rng.randrange(1, 12))))
        assert f.observe_distinct(batch) == [ref.observe(h) for h in batch]
        assert len(f) == len(ref.freq)
        filed = [h for value, hashes in f._filed.items() for h in hashes if value <= f._stored[h]]
        assert sorted(filed) == sorted(f._stored)
    ref.catch_up()
    assert {k: f.frequency(k) for k in ref.freq} == ref.freq
    s = f.stats
    assert (s.decays, s.early_decays, s.forgotten) == (ref.decays, ref.early, ref.forgotten)
    assert s.early_decays > 0 and s.decays > s.early_decays


@pytest.mark.parametrize("seed", range(3))
def test_partial_sweeps_match_the_reference_rules(clock, monkeypatch, seed):
    """With sweeps of 3 entries a call, decays (periodic and early) leave forgotten entries in
    the table for a while; frequencies, admissions, early decays and stats are still the
    reference's, and blocks seen again before their sweep start over."""
    import random

    import kvbm.core.filter as filter_mod

    monkeypatch.setattr(filter_mod, "SWEEP_BATCH", 3)
    rng = random.Random(seed)
    f = make(clock, max_entries=80)
    ref = _ReferenceFilter(clock, 80)
    for _ in range(3_000):
        if rng.random() < 0.02:
            clock.advance(rng.choice([PERIOD, 2 * PERIOD]))
        batch = list(dict.fromkeys(rng.randrange(120) for _ in range(rng.randrange(1, 8))))
        if rng.random() < 0.5:
            assert f.observe_distinct(batch) == [ref.observe(h) for h in batch]
        else:
            assert [f.observe(h) for h in batch] == [ref.observe(h) for h in batch]
        ref.catch_up()
        probe = [rng.randrange(120) for _ in range(5)]
        assert f.frequencies(probe) == [ref.freq.get(h, 0) for h in probe]
        assert [h in f for h in probe] == [h in ref.freq for h in probe]
    assert len(f._stored) >= len(ref.freq)
    assert len(f) == len(ref.freq) and {k: f.frequency(k) for k in ref.freq} == ref.freq
    s = f.stats
    assert (s.decays, s.early_decays, s.forgotten) == (ref.decays, ref.early, ref.forgotten)
    assert s.early_decays > 0


def test_a_periodic_decay_of_a_full_table_is_swept_over_many_calls(clock):
    """The first decay after a busy period reaches every entry seen in it: each batch call looks
    at SWEEP_BATCH of them, not the whole table (a million entries took ~0.4 s in one call)."""
    from kvbm.core.filter import SWEEP_BATCH

    f = make(clock, max_entries=100_000)
    f.observe_distinct(list(range(20_000)))
    f.observe_distinct(list(range(0, 20_000, 2)))  # the even ones seen twice: frequency 2
    clock.advance(PERIOD)
    assert f.frequencies([0, 1, 2, 3]) == [1, 0, 1, 0]  # right at once
    assert len(f._stored) == 20_000 - SWEEP_BATCH // 2  # one batch's worth looked at
    calls = 1
    while any(v <= f._offset for v in f._values):
        f.frequencies([])
        calls += 1
    assert calls == -(-20_000 // SWEEP_BATCH)
    assert len(f._stored) == 10_000 and f.stats.forgotten == 10_000
    assert f.observe(1) == 1 and f.observe(0) == 2
