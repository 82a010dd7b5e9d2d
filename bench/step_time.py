"""Scheduler-thread time per engine step spent in kvbm, with and without a persistent G3.

vLLM's scheduler thread calls kvbm's leader every engine step: ``get_num_new_matched_tokens``
(``LeaderRuntime.match``), ``update_state_after_alloc`` (``allocated``), ``build_connector_meta``
(``begin_step``, ``scheduled`` per request, ``end_step``), ``update_connector_output``
(``workers_reported``, which applies the report and hands G3's commits to the journal) and
``request_finished`` (``finished``). This script drives a :class:`~kvbm.runtime.leader.LeaderRuntime`
directly, with no vLLM and no workers, and times exactly those calls, summed per step.

Workload (the same, seeded, for every configuration): 256 multi-turn conversations over 8
shared 1,024-token system prompts, at most 64 requests in flight, 16-token blocks, chunked
prefill with a 4,096-token step budget, answers of 32-256 decoded tokens; a conversation's
next turn (its history, the answer and a new user message, up to ~6K tokens) goes to the back
of the queue, so G2 (4,096 blocks) overflows, hot blocks spill to G3 (16,384 blocks) and later
turns load from G2 (in-step) and G3 (asynchronous). ``onboard_policy=always``: every match is
loaded, so the planner's decisions do not depend on measured (here: meaningless) rates and
every configuration sees the same steps. The workers are faked: each step's report
acknowledges every store and spill batch of the previous step's plan, finishes its
asynchronous loads, reports its in-step loads, and frees requests held for their stores.

Configurations:

* ``a``: G2 only.
* ``g3``: G2 + G3 without persistence (no journal): what G3's planning alone costs. The spill
  policy runs on the leader's policy thread, started as each plan leaves (``end_step``) and
  waited for by the next call: with ``--forward-ms 0`` it never overlaps anything and every
  step waits for it (compare with a modelled forward pass).
* ``g3-inline``: as ``g3`` with the spill policy decided inside the calls that cause it
  (``LeaderRuntime(policy_thread=False)``, the behaviour before the policy thread).
* ``b``: G2 + G3 with persistence (``disk_persist=True``): the journal lives in a temporary
  directory on the real disk (``--dir``) and is written by ``JournalWriter`` on its thread.
* ``c``: as ``b``, with the journal compacting often: this script lowers
  ``kvbm.storage.journal._COMPACT_MIN_RECORDS`` (65,536 -> 1,024) and ``_COMPACT_RATIO``
  (4 -> 1.05: a compaction whenever the file holds 5% more records than live entries) for the
  run (module constants read at each flush; restored afterwards).
* ``b-sync`` / ``c-sync``: the behaviour before ``JournalWriter`` (commit 95c901c): the step
  thread itself records the commits and calls ``journal.flush()`` (fdatasync, and the
  compaction when due) inside ``workers_reported``. Done by constructing the runtime with a
  stand-in for ``JournalWriter`` whose ``submit`` does just that.

G3's data file is the workers' (not touched here): the leader's share is the planner plus the
journal handoff, which is what the step thread pays. "during compaction" is the worst step
that overlapped a compaction (its start to its end, on whichever thread ran it).

``--policy`` also reports, per step, the time spent in the spill policy that a second tier adds
(the filter's sightings and frequencies, and the spill decisions: ``Planner._sighted``,
``_sighted_run``, ``_spill_committed``, ``FrequencyFilter.observe``/``observe_distinct``; nested
calls counted once): mean, p50 and its mean over the slowest 1% of steps. The wrappers add a
little time of their own, so compare the step times of a run without it. ``a`` and ``g3`` run
different steps (G3's hits shorten prefills, and its asynchronous loads delay requests a step):
this column is what G3's planning itself costs (on the policy thread where it runs there).

``--forward-ms F`` models the forward pass: after each plan the engine thread sleeps F ms (the
GIL released, as while it waits for a GPU), the time the policy thread has. It then also reports
the engine thread's whole step outside the forward pass (this script's own scheduling included),
where a policy thread holding the GIL when the engine thread comes back would show.

``--cpu`` also reports the step thread's CPU time per step (``time.thread_time_ns`` around each
call, outside the wall-clock bracket): preemption by other processes on a shared machine inflates
the wall-clock p99, not this.

Run: ``PYTHONPATH=$PWD python bench/step_time.py [--steps N] [--seed S] [--cpu] [--forward-ms F]
[--json PATH]``.
Prints a table; asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field

import kvbm.runtime.leader as leader_module
import kvbm.storage.journal as journal_module
from kvbm.config import KvbmConfig
from kvbm.core.hashing import request_root
from kvbm.core.plan import StepPlan, WorkerReport
from kvbm.core.tiers import G1, move
from kvbm.runtime.leader import EngineInfo, LeaderRuntime
from kvbm.runtime.sizing import TierPlan, TierSizes
from kvbm.storage.journal import DiskJournal

BLOCK_SIZE = 16
BLOCK_BYTES = 2 * 1024 * 1024  # an 8B model's block of 16 tokens, one rank (only feeds metrics)
MAX_RUNNING = 64
STEP_BUDGET = 4096
CONVERSATIONS = 256
SYSTEM_PROMPTS = 8
SYSTEM_TOKENS = 1024
MAX_CONTEXT = 6144
HOST_BLOCKS = 4096
DISK_BLOCKS = 16384
GPU_BLOCKS = 1 << 20  # vLLM's pool never runs out here: no preemption in this workload
IDENTITY = "bench-step-time"
COMPACT_OFTEN = {"_COMPACT_MIN_RECORDS": 1024, "_COMPACT_RATIO": 1.05}
CONFIGS = ("a", "g3", "g3-inline", "b", "c", "b-sync", "c-sync")
DESCRIPTION = {
    "a": "G2 only",
    "g3": "G2+G3, no persistence (no journal)",
    "g3-inline": "as g3, spill policy inside the calls (before)",
    "b": "G2+G3 persistent, journal thread",
    "c": "as b, compacting often",
    "b-sync": "G2+G3 persistent, flush on step (before)",
    "c-sync": "as b-sync, compacting often (before)",
}


class SyncJournalWriter:
    """The leader before ``JournalWriter`` (95c901c^): record and ``flush()`` on the step thread."""

    def __init__(self, journal: DiskJournal) -> None:
        self.journal = journal

    def submit(self, hashes: list, slots: list) -> None:
        if hashes:
            self.journal.record_stored_columns(hashes, slots)
            self.journal.flush()

    def wait_idle(self, timeout: float | None = None) -> bool:
        return True

    def close(self, timeout: float = 30.0) -> None:
        self.journal.close()


@dataclass
class Request:
    req_id: str
    conv: int
    tokens: list[int]  # all_token_ids: prompt, then what was decoded
    prompt_len: int
    answer_len: int
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    outputs: int = 0
    loaded_async: int = 0  # matched tokens of an asynchronous load in flight


class PolicyClock:
    """Time spent in the spill policy per step (``--policy``): wraps the planner's and filter's
    methods on the instances; a call made inside another wrapped call is not counted twice."""

    PLANNER = ("_sighted", "_sighted_run", "_spill_committed")
    FILTER = ("observe", "observe_distinct")

    def __init__(self, runtime: LeaderRuntime) -> None:
        self.ns = 0
        self._depth = 0
        planner = runtime.planner
        for owner, names in ((planner, self.PLANNER), (planner.filter, self.FILTER)):
            if owner is None:
                continue
            for name in names:
                if hasattr(owner, name):  # (an older tree may lack some: the bench also measures those)
                    setattr(owner, name, self._timed(getattr(owner, name)))

    def _timed(self, fn):
        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ns += time.perf_counter_ns() - start
                self._depth -= 1
        return timed


class Engine:
    """Just enough of vLLM's scheduler to call the leader as the adapter does."""

    def __init__(self, runtime: LeaderRuntime, seed: int, cpu: bool = False, forward_s: float = 0.0) -> None:
        self.rt = runtime
        self.forward_s = forward_s
        self.rng = random.Random(seed)
        rng = self.rng
        self.systems = [[rng.randrange(1, 32000) for _ in range(SYSTEM_TOKENS)] for _ in range(SYSTEM_PROMPTS)]
        self.history = [self._fresh_conversation() for _ in range(CONVERSATIONS)]
        self.waiting: deque[int] = deque(range(CONVERSATIONS))
        self.running: dict[str, Request] = {}  # scheduled (prefill or decode)
        self.remote: dict[str, Request] = {}  # waiting for an asynchronous load
        self.ready: list[Request] = []  # their load finished: scheduled next step
        self.free_blocks = list(range(GPU_BLOCKS - 1, -1, -1))
        self.held: dict[str, list[int]] = {}  # finished, GPU blocks kept for their stores
        self.next_id = 0
        self.root = request_root(runtime.engine_root)
        self.prev_plan: StepPlan | None = None
        self.spent_ns = 0
        #: Also the thread's CPU time in the calls (--cpu): what preemption by other processes
        #: does not inflate, on a shared machine. Read outside the wall-clock bracket.
        self.cpu = cpu
        self.cpu_ns = 0
        self.counts = {"requests": 0, "matched_tokens": 0, "async_loads": 0, "sync_loads": 0}

    def _fresh_conversation(self) -> list[int]:
        rng = self.rng
        return self.systems[rng.randrange(SYSTEM_PROMPTS)] + [rng.randrange(1, 32000)
                                                              for _ in range(rng.randrange(200, 800))]

    def _call(self, fn, *args):
        if self.cpu:
            cpu = time.thread_time_ns()
        start = time.perf_counter_ns()
        result = fn(*args)
        self.spent_ns += time.perf_counter_ns() - start
        if self.cpu:
            self.cpu_ns += time.thread_time_ns() - cpu
        return result

    def _grow(self, req: Request, upto_tokens: int) -> list[int]:
        need = -(-upto_tokens // BLOCK_SIZE) - len(req.blocks)
        new = [self.free_blocks.pop() for _ in range(max(0, need))]
        req.blocks.extend(new)
        return new

    def step(self) -> int:
        """One engine step; returns the nanoseconds the leader's calls took."""
        self.spent_ns = self.cpu_ns = 0
        rt = self.rt
        budget = STEP_BUDGET
        new_reqs: list[tuple[Request, int]] = []  # (request, tokens scheduled)
        cached: list[tuple[Request, list[int] | None, int]] = []
        # Running requests first (decode: one token; prefill: the next chunk), as vLLM does.
        for req in self.running.values():
            if budget <= 0:
                break
            n = 1 if req.num_computed >= req.prompt_len else min(req.prompt_len - req.num_computed, budget)
            new = self._grow(req, req.num_computed + n)
            cached.append((req, new or None, n))
            budget -= n
        # Requests whose asynchronous load finished: scheduled as new ones (their blocks replaced).
        ready, self.ready = self.ready, []
        for req in ready:
            if budget <= 0 or len(self.running) >= MAX_RUNNING:
                self.ready.append(req)
                continue
            self._call(rt.allocated, req.req_id, [[]], 0)
            n = min(req.prompt_len - req.num_computed, budget)
            self._grow(req, req.num_computed + n)
            new_reqs.append((req, n))
            self.running[req.req_id] = req
            budget -= n
        # Waiting turns.
        while self.waiting and budget > 0 and len(self.running) + len(self.remote) < MAX_RUNNING:
            conv = self.waiting.popleft()
            req = Request(f"r{self.next_id}", conv, list(self.history[conv]), len(self.history[conv]),
                          self.rng.randrange(32, 257))
            self.next_id += 1
            self.counts["requests"] += 1
            self._call(rt.add_request, req.req_id, self.root)
            matched, is_async = self._call(rt.match, req.req_id, req.tokens, 0)
            matched = matched or 0
            self.counts["matched_tokens"] += matched
            if matched and is_async:
                self._grow(req, matched)
                self._call(rt.allocated, req.req_id, [list(req.blocks)], matched)
                req.num_computed = req.loaded_async = matched
                self.remote[req.req_id] = req
                self.counts["async_loads"] += 1
                continue
            n = min(req.prompt_len - matched, budget)
            self._grow(req, matched + n)
            self._call(rt.allocated, req.req_id, [list(req.blocks)], matched)
            self.counts["sync_loads"] += bool(matched)
            req.num_computed = matched
            new_reqs.append((req, n))
            self.running[req.req_id] = req
            budget -= n
        # build_connector_meta
        self._call(rt.begin_step, sum(n for _, n in new_reqs) + sum(n for _, _, n in cached))
        for req, n in new_reqs:
            self._call(rt.scheduled, req.req_id, req.tokens, [list(req.blocks)], True, req.num_computed, n)
        for req, new, n in cached:
            self._call(rt.scheduled, req.req_id, req.tokens, [new] if new else None, False, req.num_computed, n)
        plan = self._call(rt.end_step)
        # The forward pass: the engine's thread waits for the GPU (--forward-ms, GIL released).
        if self.forward_s:
            time.sleep(self.forward_s)
        finished: list[Request] = []
        for req, n in [(r, n) for r, n in new_reqs] + [(r, n) for r, _, n in cached]:
            req.num_computed += n
            if req.num_computed >= req.prompt_len:
                req.tokens.append(self.rng.randrange(1, 32000))
                req.outputs += 1
                if req.outputs >= req.answer_len:
                    finished.append(req)
        # update_connector_output: this step's in-step loads, the previous step's copies.
        report, finished_recving, released = self._report(plan)
        self._call(rt.workers_reported, report, finished_recving, (), released)
        for req_id in finished_recving:
            req = self.remote.pop(req_id, None)
            if req is not None:
                self.ready.append(req)
        for req_id in released:
            self.free_blocks.extend(self.held.pop(req_id, ()))
        # request_finished; the conversation's next turn joins the queue.
        for req in finished:
            del self.running[req.req_id]
            keep = self._call(rt.finished, req.req_id, req.prompt_len, req.outputs)
            if keep:
                self.held[req.req_id] = req.blocks
            else:
                self.free_blocks.extend(req.blocks)
            history = req.tokens + [self.rng.randrange(1, 32000) for _ in range(self.rng.randrange(100, 400))]
            self.history[req.conv] = history if len(history) <= MAX_CONTEXT else self._fresh_conversation()
            self.waiting.append(req.conv)
        return self.spent_ns

    def _report(self, plan: StepPlan) -> tuple[WorkerReport, list[str], list[str]]:
        """What one worker reports after this step: in-step loads of ``plan`` done; the previous
        plan's stores, spills and asynchronous loads done, its held requests released."""
        report = WorkerReport()
        for op in plan.loads:
            if op.sync:
                report.sync_loaded[op.req_id] = 1
                for part in op.parts:
                    report.add_transfer(move(part.tier, G1), len(part.slots) * BLOCK_BYTES,
                                        len(part.slots) * BLOCK_BYTES / 20e9)
        prev, self.prev_plan = self.prev_plan, plan
        finished_recving: list[str] = []
        released: list[str] = []
        if prev is not None:
            if prev.store is not None:
                report.stored[prev.store.batch_id] = 1
                report.add_transfer(move(G1, prev.store.tier), len(prev.store.slots) * BLOCK_BYTES,
                                    len(prev.store.slots) * BLOCK_BYTES / 20e9)
            for spill in prev.spills:
                report.stored[spill.batch_id] = 1
                report.add_transfer(move(spill.src, spill.dst), len(spill.src_slots) * BLOCK_BYTES,
                                    len(spill.src_slots) * BLOCK_BYTES / 2e9)
            for op in prev.loads:
                if not op.sync:
                    finished_recving.append(op.req_id)
                    for part in op.parts:
                        report.add_transfer(move(part.tier, G1), len(part.slots) * BLOCK_BYTES,
                                            len(part.slots) * BLOCK_BYTES / 2e9)
            released = [req_id for req_id, _ in prev.release_after_store]
        return report, finished_recving, released


def run_config(name: str, steps: int, seed: int, directory: str, cpu: bool = False, policy: bool = False,
               forward_ms: float = 0.0) -> dict:
    """One configuration: ``steps`` engine steps of the seeded workload; per-step leader time."""
    with_disk = name != "a"
    persistent = with_disk and not name.startswith("g3")
    sync = name.endswith("-sync")
    compact_often = name.startswith("c")
    cache_dir = os.path.join(directory, name)
    cfg = KvbmConfig(disk_persist=persistent, disk_cache_dir=cache_dir, onboard_policy="always")
    sizes = TierSizes(HOST_BLOCKS, DISK_BLOCKS if with_disk else 0, BLOCK_BYTES)
    engine_info = EngineInfo(block_size=BLOCK_SIZE, world_size=1, engine_id=None, block_bytes=BLOCK_BYTES,
                             gpu_blocks=GPU_BLOCKS, storage_key="bench", max_num_batched_tokens=STEP_BUDGET)
    saved_writer = leader_module.JournalWriter
    saved_consts = {k: getattr(journal_module, k) for k in COMPACT_OFTEN}
    compactions: list[tuple[int, int]] = []  # (start, end) perf_counter_ns
    try:
        if sync:
            leader_module.JournalWriter = SyncJournalWriter  # type: ignore[misc,assignment]
        rt = LeaderRuntime(cfg, TierPlan.configured(cfg, sizes), engine_info, identity=IDENTITY,
                           policy_thread=not name.endswith("-inline"))
        if compact_often:
            for key, value in COMPACT_OFTEN.items():
                setattr(journal_module, key, value)
        if rt.journal is not None:
            original = rt.journal.compact

            def counted_compact() -> None:
                start = time.perf_counter_ns()
                try:
                    original()
                finally:
                    compactions.append((start, time.perf_counter_ns()))

            rt.journal.compact = counted_compact  # type: ignore[method-assign]
        sim = Engine(rt, seed, cpu, forward_ms / 1000)
        clock = PolicyClock(rt) if policy else None
        gc.collect()
        times = []
        cpu_times = []
        policy_times = []
        spans = []
        wall = time.perf_counter()
        for _ in range(steps):
            start = time.perf_counter_ns()
            if clock is not None:
                clock.ns = 0
            times.append(sim.step())
            cpu_times.append(sim.cpu_ns)
            if clock is not None:
                policy_times.append(clock.ns)
            spans.append((start, time.perf_counter_ns()))
        wall = time.perf_counter() - wall
        records = rt.journal.num_records if rt.journal is not None else 0
        if rt.journal is not None:
            rt.journal_writer.wait_idle(60)
            records = rt.journal.num_records
        rt.settle()
        stats = rt.planner.stats
        tiers = {tier.name: {"stored": stats.tier(tier.name).stored_blocks,
                             "spilled": stats.tier(tier.name).spilled_blocks,
                             "hit": stats.tier(tier.name).hit_blocks} for tier in rt.chain}
        rt.close()
    finally:
        leader_module.JournalWriter = saved_writer  # type: ignore[misc]
        for key, value in saved_consts.items():
            setattr(journal_module, key, value)
    us = sorted(t / 1000 for t in times)
    # The engine thread's whole step outside the forward pass (the script's own scheduling
    # included): what a thread of kvbm's taking the GIL at the wrong moment would add.
    outside_us = sorted((e - s) / 1000 - forward_ms * 1000 for s, e in spans)
    cpu_us = sorted(t / 1000 for t in cpu_times)
    during = [times[i] / 1000 for i, (s, e) in enumerate(spans) if any(cs < e and ce > s for cs, ce in compactions)]
    policy_stats = {}
    if policy:
        slowest = sorted(range(steps), key=times.__getitem__)[-max(1, steps // 100):]
        policy_us = sorted(t / 1000 for t in policy_times)
        policy_stats = {"policy_mean_us": statistics.fmean(policy_us), "policy_p50_us": _pct(policy_us, 50),
                        "policy_slowest_1pct_us": statistics.fmean(policy_times[i] / 1000 for i in slowest),
                        "step_slowest_1pct_us": statistics.fmean(times[i] / 1000 for i in slowest)}
    return {
        "config": name, "description": DESCRIPTION[name], "steps": steps, "wall_s": round(wall, 2),
        "p50_us": _pct(us, 50), "p99_us": _pct(us, 99), "max_us": us[-1], "mean_us": statistics.fmean(us),
        "compactions": len(compactions), "journal_records": records,
        "outside_forward_p50_us": _pct(outside_us, 50), "outside_forward_p99_us": _pct(outside_us, 99),
        "outside_forward_mean_us": statistics.fmean(outside_us),
        "steps_during_compaction": len(during), "max_during_compaction_us": max(during) if during else None,
        "tiers": tiers, **sim.counts,
        **({"cpu_p50_us": _pct(cpu_us, 50), "cpu_p99_us": _pct(cpu_us, 99)} if cpu else {}),
        **policy_stats,
    }


def _pct(sorted_values: list[float], p: float) -> float:
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="engine steps per configuration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    parser.add_argument("--dir", default=None, help="where the journals go (default: a temp dir under /tmp)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the results here")
    parser.add_argument("--cpu", action="store_true",
                        help="also the step thread's CPU time per step (preemption does not inflate it)")
    parser.add_argument("--forward-ms", type=float, default=0.0,
                        help="model a forward pass: the engine thread sleeps this long after each plan")
    parser.add_argument("--policy", action="store_true",
                        help="also the time per step in the spill policy (filter and spill decisions)")
    args = parser.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configuration(s) {sorted(unknown)}; choose from {CONFIGS}")
    directory = tempfile.mkdtemp(prefix="kvbm-step-time-", dir=args.dir)
    results = []
    try:
        for name in names:
            results.append(run_config(name, args.steps, args.seed, directory, args.cpu, args.policy,
                                      args.forward_ms))
            print(f"  {name}: {results[-1]['wall_s']} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    base = next((r["p99_us"] for r in results if r["config"] == "a"), None)
    base3 = next((r["p99_us"] for r in results if r["config"] == "g3"), None)
    header = (f"{'config':<8} {'':<42} {'steps':>6} {'p50 us':>8} {'p99 us':>8} {'max us':>9} "
              f"{'p99/a':>6} {'p99/g3':>6} {'compactions':>11} {'max during compaction us':>24}")
    print(header)
    for r in results:
        ratio = f"{r['p99_us'] / base:.2f}" if base else "-"
        ratio3 = f"{r['p99_us'] / base3:.2f}" if base3 and r["config"] != "a" else "-"
        r["p99_vs_a"] = r["p99_us"] / base if base else None
        r["p99_vs_g3"] = r["p99_us"] / base3 if base3 and r["config"] != "a" else None
        during = f"{r['max_during_compaction_us']:.0f}" if r["max_during_compaction_us"] is not None else "-"
        print(f"{r['config']:<8} {r['description']:<42} {r['steps']:>6} {r['p50_us']:>8.0f} {r['p99_us']:>8.0f} "
              f"{r['max_us']:>9.0f} {ratio:>6} {ratio3:>6} {r['compactions']:>11} {during:>24}"
              + (f"   CPU p50 {r['cpu_p50_us']:.0f} p99 {r['cpu_p99_us']:.0f} us" if args.cpu else "")
              + (f"   whole step outside the forward pass: mean {r['outside_forward_mean_us']:.0f} "
                 f"p99 {r['outside_forward_p99_us']:.0f} us" if args.forward_ms else "")
              + (f"   spill policy mean {r['policy_mean_us']:.0f} p50 {r['policy_p50_us']:.0f} us, "
                 f"{r['policy_slowest_1pct_us']:.0f} of the slowest 1% steps' {r['step_slowest_1pct_us']:.0f} us"
                 if args.policy else ""))
    workloads: dict[tuple, list[str]] = {}
    for r in results:
        key = (r["requests"], r["matched_tokens"], r["sync_loads"], r["async_loads"],
               tuple((t, tuple(v.items())) for t, v in r["tiers"].items()))
        workloads.setdefault(key, []).append(r["config"])
    for (requests, matched, sync_loads, async_loads, tiers), configs in workloads.items():
        print(f"{'/'.join(configs)}: {requests} requests, {matched} matched tokens ({sync_loads} in-step loads, "
              f"{async_loads} asynchronous); blocks "
              + "; ".join(f"{t}: " + ", ".join(f"{k} {n}" for k, n in v) for t, v in tiers))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"seed": args.seed, "steps": args.steps, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
