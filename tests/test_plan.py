"""``kvbm plan`` without vLLM: trace writer and readers, the G1 model, the replay, the report and the CLI."""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from kvbm.config import ConfigError
from kvbm.core.hashing import engine_root, extend_hashes, request_root
from kvbm.tools.cli import main as kvbm_main
from kvbm.tools.plan.gpu import GpuPrefixCache
from kvbm.tools.plan.report import (
    Plan,
    PlanError,
    Rates,
    bytes_per_block_from_model,
    grid,
    knee,
    parse_sizes,
)
from kvbm.tools.plan.simulate import PointResult, SizePoint, gpu_pass, replay, sweep
from kvbm.tools.plan.trace import TraceError, TraceWriter, read_trace
from tests.other_user import NOBODY, as_nobody, needs_other_user, shared_dir

BS = 4  # tokens per block in these traces


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def write_kvbm_trace(path: Path, requests: list[tuple[float, float, int, int, list[int]]], *, block_size: int = BS,
                     gpu_blocks: int = 8, bytes_per_block: int = 1000) -> None:
    """(start, end, prompt, output, hashes) per request, through the server's own writer."""
    clock = Clock()
    writer = TraceWriter(str(path), {"block_size": block_size, "gpu_blocks": gpu_blocks,
                                     "bytes_per_block": bytes_per_block, "load_mode": "async"}, clock=clock)
    # Finish in end order, as a server would, so the reader's sort is exercised.
    order = sorted(range(len(requests)), key=lambda i: requests[i][1])
    for i, (start, _, _, _, _) in enumerate(requests):
        clock.now = start
        writer.scheduled(f"r{i}")
    for i in order:
        _, end, prompt, output, hashes = requests[i]
        clock.now = end
        writer.finished(f"r{i}", prompt, output, hashes)
    writer.close()


def chain(seed: int, n: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(16) for _ in range(n)]  # kvbm's block hashes: 16 bytes


def chat_requests(users: int, rounds: int, *, system: int = 3, history: int = 6, turn: int = 2, seed: int = 0,
                  gap: float = 1.0, duration: float = 0.5) -> list[tuple[float, float, int, int, list[int]]]:
    """Users taking turns, each round resending the conversation (all full blocks) plus a new turn."""
    shared = chain(seed, system)
    convs = [shared + chain(seed * 1000 + u, history) for u in range(users)]
    out, t = [], 0.0
    for r in range(rounds):
        for u in range(users):
            convs[u] = convs[u] + chain(seed * 1000 + 100 * u + r + 500, turn)
            prompt = len(convs[u]) * BS + 1  # one token into the next block
            out.append((t, t + duration, prompt, 1, list(convs[u])))
            t += gap
    return out


# ---- trace: writer and kvbm's format --------------------------------------------------------


def test_kvbm_trace_round_trip(tmp_path):
    path = tmp_path / "t.jsonl"
    shared = chain(1, 3)
    reqs = [(5.0, 9.0, 14, 3, shared + chain(2, 1)), (1.0, 2.0, 13, 0, shared), (3.0, 3.5, 4, 1, [])]
    write_kvbm_trace(path, reqs)
    trace = read_trace(path, progress=False)
    assert (trace.kind, trace.block_size, trace.gpu_blocks, trace.bytes_per_block) == ("kvbm", BS, 8, 1000)
    assert trace.load_mode == "async"
    assert [r.time for r in trace.requests] == [1.0, 3.0, 5.0]  # sorted by scheduling time
    first, empty, last = trace.requests
    assert (first.end, first.prompt_tokens, first.output_tokens) == (2.0, 13, 0)
    assert list(first.blocks) == list(last.blocks[:3])  # same hash, same id, whatever its width
    assert len(set(last.blocks)) == 4 and len(empty.blocks) == 0
    assert trace.num_block_ids == 4
    text = path.read_text()
    assert shared[0].hex() in text and '"prompt"' in text and "token" not in text


def test_writer_skips_requests_never_scheduled_and_keeps_appending(tmp_path):
    path = tmp_path / "t.jsonl"
    writer = TraceWriter(str(path), {"block_size": BS}, clock=Clock())
    writer.finished("never-scheduled", 10, 0, [1, 2])
    writer.scheduled("a", (3, 1))
    writer.scheduled("a", (9, 9))  # only the first scheduling counts
    writer.finished("a", 9, 2, [1, 2])  # int hashes (any width) are written as hex too
    writer.close()
    write_kvbm_trace(path, [(200.0, 201.0, 9, 0, [1, 2])])  # a restarted server appends
    lines = path.read_text().splitlines()
    assert sum('"kvbm_trace"' in line for line in lines) == 2
    trace = read_trace(path, progress=False)
    assert len(trace.requests) == 2
    assert list(trace.requests[0].blocks) == list(trace.requests[1].blocks)
    assert [r.served for r in trace.requests] == [(3, 1), (0, 0)]


def test_writer_names_the_setting_when_it_cannot_open(tmp_path):
    with pytest.raises(ConfigError, match="DYN_KVBM_TRACE_FILE"):
        TraceWriter(str(tmp_path / "missing-dir" / "t.jsonl"), {"block_size": BS})


@needs_other_user
def test_trace_file_refuses_a_link_or_a_file_another_user_planted(tmp_path):
    """A shared log directory: "nobody" plants the trace's name as a link to root's file, or
    creates the file first. Before, kvbm (root) followed the link and appended to root's file."""
    with shared_dir() as shared:
        victim = tmp_path / "root-file"
        victim.write_text("root's data\n")
        as_nobody("ln", "-s", str(victim), str(shared / "trace.jsonl"))
        with pytest.raises(ConfigError, match="DYN_KVBM_TRACE_FILE=.*symbolic link"):
            TraceWriter(str(shared / "trace.jsonl"), {"block_size": BS})
        assert victim.read_text() == "root's data\n"
        as_nobody("touch", str(shared / "theirs.jsonl"))
        with pytest.raises(ConfigError, match=f"DYN_KVBM_TRACE_FILE=.*belongs to uid {NOBODY}"):
            TraceWriter(str(shared / "theirs.jsonl"), {"block_size": BS})
        assert (shared / "theirs.jsonl").stat().st_size == 0
        writer = TraceWriter(str(shared / "mine.jsonl"), {"block_size": BS})  # a fresh name: fine
        writer.close()
        assert (shared / "mine.jsonl").stat().st_mode & 0o777 == 0o600


def test_trace_file_that_is_a_fifo_is_refused_without_hanging(tmp_path):
    """Before, opening a FIFO for writing blocked until a reader came: start-up hung forever."""
    import subprocess
    import sys

    fifo = tmp_path / "trace.jsonl"
    os.mkfifo(fifo, 0o600)
    code = ("import sys\nfrom kvbm.config import ConfigError\nfrom kvbm.tools.plan.trace import TraceWriter\n"
            "try:\n    TraceWriter(sys.argv[1], {'block_size': 4})\nexcept ConfigError as e:\n    print('REFUSED', e)")
    root = str(Path(__file__).resolve().parent.parent)
    try:
        out = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": root})
    except subprocess.TimeoutExpired:
        pytest.fail("opening a FIFO as DYN_KVBM_TRACE_FILE hung")
    assert "REFUSED DYN_KVBM_TRACE_FILE=" in out.stdout and "FIFO" in out.stdout, out
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # with a reader the open succeeds: fstat refuses
    try:
        with pytest.raises(ConfigError, match="DYN_KVBM_TRACE_FILE=.*not a regular file"):
            TraceWriter(str(fifo), {"block_size": BS})
    finally:
        os.close(reader)


def test_config_checks_the_trace_path(tmp_path):
    from kvbm.config import load_config

    env = {"DYN_KVBM_CPU_CACHE_GB": "1"}
    assert load_config(environ={**env, "DYN_KVBM_TRACE_FILE": str(tmp_path / "t.jsonl")}).trace_file
    with pytest.raises(ConfigError, match="DYN_KVBM_TRACE_FILE.*does not exist"):
        load_config(environ={**env, "DYN_KVBM_TRACE_FILE": str(tmp_path / "nope" / "t.jsonl")})
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(environ={**env, "DYN_KVBM_TRACE_FILE": str(tmp_path)})
    assert load_config(environ=env).trace_file is None


@pytest.mark.parametrize("lines, message", [
    (["not json"], r":1: not JSON"),
    (['{"t": 1, "prompt": 3, "hashes": []}'], "before the trace's header"),
    (['{"kvbm_trace": 1, "block_size": 4}', '{"t": 1, "prompt": 3, "hashes": [12]}'], "hex strings"),
    (['{"kvbm_trace": 1, "block_size": 4}', '{"t": -1, "prompt": 3, "hashes": []}'], r":2: 't' must be"),
    (['{"kvbm_trace": 1, "block_size": 4}', '{"kvbm_trace": 1, "block_size": 8}'], "different block sizes"),
    (['{"kvbm_trace": 7, "block_size": 4}'], "format 7"),
    (['{"kvbm_trace": 1, "block_size": 4}'], "no request"),
    (["[1, 2]"], "expected a JSON object"),
    (['{"kvbm_trace": 1, "block_size": 4}', '{"t": 1, "prompt": 3, "served": [1], "hashes": []}'], "'served'"),
])
def test_bad_kvbm_traces_say_where_and_why(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError, match=message):
        read_trace(path, progress=False)


def test_kvbm_trace_refuses_another_block_size(tmp_path):
    path = tmp_path / "t.jsonl"
    write_kvbm_trace(path, [(1.0, 2.0, 9, 0, chain(1, 2))])
    with pytest.raises(TraceError, match="4-token blocks"):
        read_trace(path, block_size=16, progress=False)
    with pytest.raises(TraceError, match="no such trace"):
        read_trace(tmp_path / "nope.jsonl")


# ---- trace: prompt files ---------------------------------------------------------------------


def test_prompt_trace_with_token_ids(tmp_path):
    path = tmp_path / "p.jsonl"
    system = list(range(100, 108))  # two full blocks
    rows = [
        {"prompt_token_ids": system + [1, 2, 3], "timestamp": 2.0, "output_tokens": 6, "duration": 1.5},
        {"prompt_token_ids": system + [4, 5], "timestamp": 1.0},
        {"token_ids": system + [4, 5], "timestamp": 3.0, "cache_salt": "tenant-b"},
        {"prompt_token_ids": system + [4, 5], "timestamp": 4.0, "lora": "adapter"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    trace = read_trace(path, block_size=BS, progress=False)
    assert trace.kind == "prompts" and trace.gpu_blocks is None
    second, first, salted, lora = trace.requests
    assert (first.time, first.end, first.output_tokens) == (2.0, 3.5, 6)
    root = request_root(engine_root("kvbm plan"))
    assert len(first.blocks) == (11 + 6 - 1) // BS  # prompt blocks, then blocks holding generated tokens
    assert list(first.blocks[:2]) == list(second.blocks[:2])  # shared system prompt, shared ids
    assert len(extend_hashes([], system + [4, 5], BS, root)) == len(second.blocks) == 2
    assert not set(first.blocks[2:]) & set(b for r in (second, salted, lora) for b in r.blocks)  # outputs unique
    assert not set(salted.blocks) & set(second.blocks)  # another tenant never shares blocks
    assert not set(lora.blocks) & (set(second.blocks) | set(salted.blocks))


def test_prompt_trace_text_needs_the_model(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "hello there"}) + "\n")
    with pytest.raises(TraceError, match="--model"):
        read_trace(path, progress=False)
    with pytest.raises(TraceError, match="not a local model directory"):
        read_trace(path, model=str(tmp_path / "nope"), progress=False)
    path.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(TraceError, match=r":1: each line needs 'prompt'"):
        read_trace(path, progress=False)


def test_prompt_trace_tokenizes_with_the_models_tokenizer(tmp_path, model_path):
    from transformers import AutoTokenizer

    path = tmp_path / "p.jsonl"
    text = "the cache block memory " * 20
    path.write_text("\n".join(json.dumps({"prompt": text + f" question {i}"}) for i in range(3)) + "\n")
    trace = read_trace(path, model=model_path, block_size=BS, progress=False)
    tokens = AutoTokenizer.from_pretrained(model_path)(text + " question 0")["input_ids"]
    assert trace.requests[0].prompt_tokens == len(tokens)
    assert [r.time for r in trace.requests] == [0.0, 1.0, 2.0]  # no timestamps: one request a second
    assert list(trace.requests[0].blocks[:5]) == list(trace.requests[2].blocks[:5])


# ---- vLLM's prefix cache -----------------------------------------------------------------


def test_gpu_cache_is_lru_over_freed_blocks():
    gpu = GpuPrefixCache(6)  # block 0 is the null block: 5 usable
    assert gpu.eviction_order() == [1, 2, 3, 4, 5]
    a = gpu.allocate(3)
    for block, h in zip(a, (10, 11)):
        gpu.cache(block, h)  # the third block is partial: never cached
    gpu.free(a)
    # The partial block is reused first, then never-used blocks, then A's tail before its head.
    assert gpu.eviction_order() == [3, 4, 5, 2, 1]
    assert gpu.lookup([10, 11, 12], 3) == [1, 2]  # hits leave the free queue while in use
    assert gpu.eviction_order() == [3, 4, 5]
    b = gpu.allocate(4)
    assert b == [3, 4, 5] and gpu.shortfall == 1
    gpu.free([1, 2] + b)
    gpu.allocate(4)  # evicts the least recently freed: B's blocks were freed tail first, then 2 and 1
    assert gpu.lookup([10], 1) == [1]


def test_gpu_pass_counts_hits_and_respects_the_last_token():
    reqs = [(0.0, 1.0, 4 * BS, 0, chain(1, 4)), (2.0, 3.0, 4 * BS, 0, chain(1, 4))]
    trace = _trace(reqs)
    gpu = gpu_pass(trace, 10)
    # The second request's prompt ends on a block boundary: vLLM recomputes the last block.
    assert gpu.hits == [0, 3]


# ---- replay --------------------------------------------------------------------------------------


def _trace(reqs, tmp_path=None):
    from array import array

    from kvbm.tools.plan.trace import Trace, TraceRequest

    ids: dict[int, int] = {}
    requests = [TraceRequest(t, e, p, o, array("q", [ids.setdefault(h, len(ids)) for h in hs]))
                for t, e, p, o, hs in reqs]
    return Trace(block_size=BS, requests=requests, num_block_ids=len(ids))


def test_gpu_cache_alone_suffices_means_no_kvbm_benefit():
    trace = _trace(chat_requests(users=2, rounds=4))
    gpu = gpu_pass(trace, 200)  # far more than both conversations
    alone = replay(trace, gpu, SizePoint(0))
    results = [replay(trace, gpu, SizePoint(n)) for n in (4, 32, 512)]
    results += [replay(trace, gpu, SizePoint(32, 512, f)) for f in (True, False)]
    for r in results:
        assert r.host_hit_blocks == r.disk_hit_blocks == 0
        assert r.fractions(BS) == alone.fractions(BS)
    assert alone.fractions(BS)["g1"] > 0.5
    plan = Plan("t", len(trace.requests), trace.prompt_tokens, BS, 200, 1000, alone, results[:3])
    assert plan.recommended_host() is None
    assert "No kvbm tier needed" in plan.recommendation()[0]


def test_small_gpu_cache_g2_serves_what_it_evicts():
    reqs = chat_requests(users=6, rounds=4)
    trace = _trace(reqs)
    gpu = gpu_pass(trace, 16)  # one conversation at a time
    sizes = [4, 16, 64, 1024]
    results = [replay(trace, gpu, SizePoint(n)) for n in sizes]
    g2 = [r.fractions(BS)["g2"] for r in results]
    assert g2 == sorted(g2) and g2[0] < g2[-1]
    # With room for everything, G2 holds every block a later request looks up: only never-seen
    # blocks are computed (plus the block holding each prompt's last token).
    big = results[-1]
    seen: set[int] = set()
    expected_computed = 0
    for r in trace.requests:
        full = (r.prompt_tokens - 1) // BS
        reused = next((i for i, b in enumerate(r.blocks[:full]) if b not in seen), full)
        expected_computed += r.prompt_tokens - reused * BS
        seen.update(r.blocks)
    assert big.prompt_tokens - big.g1_tokens - big.host_hit_blocks * BS == expected_computed
    assert big.looked_up_blocks > 0 and 0 < big.host_hit_rate <= 1


def test_disk_tier_and_filter():
    trace = _trace(chat_requests(users=6, rounds=4))
    gpu = gpu_pass(trace, 16)
    host_only = replay(trace, gpu, SizePoint(8))
    no_filter = replay(trace, gpu, SizePoint(8, 1024, False))
    with_filter = replay(trace, gpu, SizePoint(8, 1024, True))
    assert no_filter.disk_hit_blocks > 0
    assert no_filter.host_hit_blocks + no_filter.disk_hit_blocks > host_only.host_hit_blocks
    # The filter keeps blocks seen once off the disk: fewer writes, never more hits.
    assert with_filter.spilled_blocks < no_filter.spilled_blocks
    assert with_filter.filter_rejections > 0
    assert with_filter.disk_hit_blocks <= no_filter.disk_hit_blocks


def test_parallel_sweep_equals_serial():
    trace = _trace(chat_requests(users=5, rounds=3))
    gpu = gpu_pass(trace, 16)
    points = [SizePoint(4), SizePoint(16), SizePoint(8, 64, True), SizePoint(8, 64, False)]
    serial = [replay(trace, gpu, p).as_dict() for p in points]
    parallel = [r.as_dict() for r in sweep(trace, gpu, points, jobs=2, progress=False)]
    for a, b in zip(serial, parallel):
        a.pop("seconds"), b.pop("seconds")
    assert serial == parallel


# ---- report ----------------------------------------------------------------------------------


def test_grid_knee_and_sizes():
    assert grid(10, 1000, 3) == [10, 100, 1000]
    assert grid(5, 5, 8) == [5]
    curve = [0.0, 0.30, 0.55, 0.60, 0.61, 0.61]
    sizes = [1, 2, 4, 8, 16, 32]
    assert knee(sizes, curve) == 2
    assert knee(sizes, [0.2] * 6) is None
    # An S-curve: sizes too small to help do not hide the knee where it saturates.
    assert knee([1, 2, 4, 8, 16, 32, 64], [0, 0, 0, 0.1, 0.9, 1.0, 1.0]) == 4
    assert parse_sizes("2GB, 100", 10**6, "--g2") == [100, 2000]
    with pytest.raises(PlanError, match="--g2"):
        parse_sizes("lots", 10**6, "--g2")
    with pytest.raises(PlanError, match="need --model"):
        parse_sizes("2GB", None, "--g2")


def test_bytes_per_block_from_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "hidden_size": 1024, "torch_dtype": "bfloat16"}))
    assert bytes_per_block_from_model(str(tmp_path), 16) == 28 * 2 * 8 * 128 * 2 * 16
    assert bytes_per_block_from_model(str(tmp_path), 16, "fp8") == 28 * 2 * 8 * 128 * 1 * 16
    with pytest.raises(PlanError, match="--bytes-per-block"):
        bytes_per_block_from_model(str(tmp_path / "nope"), 16)


def test_recommendation_and_ttft_estimate():
    trace = _trace(chat_requests(users=6, rounds=4))
    gpu = gpu_pass(trace, 16)
    sizes = grid(4, trace.num_block_ids, 6)
    sweep_ = [replay(trace, gpu, SizePoint(n)) for n in sizes]
    plan = Plan("t", len(trace.requests), trace.prompt_tokens, BS, 16, 10**6, replay(trace, gpu, SizePoint(0)),
                sweep_, rates=Rates(prefill_tokens_per_s=1000, host_gbps=1))
    rec = plan.recommended_host()
    best = max(plan.share(r, "g2") for r in sweep_)
    assert rec is not None and plan.share(rec, "g2") >= 0.95 * best
    text = "\n".join(plan.recommendation())
    assert f"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS={rec.host_blocks}" in text and "DYN_KVBM_CPU_CACHE_GB=" in text
    saved = plan.rates.saved_seconds(rec, BS, 10**6)
    expected = (rec.host_hit_blocks * BS / 1000 - rec.host_hit_blocks * 10**6 / 1e9) / rec.requests
    assert saved == pytest.approx(expected)
    assert "TTFT saved" in plan.table()


# ---- the command -------------------------------------------------------------------------


def test_kvbm_plan_command(tmp_path, capsys):
    path = tmp_path / "trace.jsonl"
    write_kvbm_trace(path, chat_requests(users=6, rounds=4), gpu_blocks=16, bytes_per_block=2_000_000)
    out = tmp_path / "out"
    rc = kvbm_main(["plan", str(path), "--out", str(out), "--points", "4", "--jobs", "1", "--no-progress",
                    "--prefill-tokens-per-s", "5000", "--host-gbps", "10", "--disk-gbps", "2"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "Recommended settings" in text and "DYN_KVBM_CPU_CACHE_GB=" in text and "knee" in text
    assert "G2+G3 filter" in text and "G2+G3 no filter" in text
    assert {p.name for p in out.iterdir()} == {"plan.csv", "plan.json", "plan.png"}
    data = json.loads((out / "plan.json").read_text())
    assert data["gpu_blocks"] == 16 and data["host_sweep"] and data["disk_sweep"]


def test_kvbm_plan_errors_are_one_line(tmp_path, capsys):
    assert kvbm_main(["plan", str(tmp_path / "none.jsonl")]) == 2
    assert "kvbm plan: error:" in capsys.readouterr().err
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt_token_ids": [1, 2, 3, 4, 5]}) + "\n")
    assert kvbm_main(["plan", str(prompts), "--no-progress", "--out", str(tmp_path / "o")]) == 2
    assert "--gpu-blocks" in capsys.readouterr().err
    assert kvbm_main(["plan", str(prompts), "--gpu-blocks", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--gpu-blocks must be > 0" in capsys.readouterr().err


def test_binary_file_is_refused_cleanly(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b'{"kvbm_trace": 1, "block_size": 4}\n\xff\xfe\x00garbage\n')
    with pytest.raises(TraceError, match=r":2: not UTF-8"):
        read_trace(path, progress=False)


# ---- hostile traces: one clear error naming the line and the field, bounded memory ----------

_HEADER = '{"kvbm_trace": 1, "block_size": 4, "gpu_blocks": 8}'


def _plan_in_a_box(args: list[str], tmp_path: Path, memory_gb: int = 3) -> subprocess.CompletedProcess:
    """``kvbm plan ARGS`` in a child whose address space is capped, so a reader that grows without
    bound fails there (MemoryError) instead of eating the machine the tests share."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_gb << 30, memory_gb << 30))

    return subprocess.run([sys.executable, "-m", "kvbm", "plan", *args, "--no-progress", "--no-plots", "--jobs", "1",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          preexec_fn=cap, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})


def test_deeply_nested_line_is_a_clear_error(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(_HEADER + "\n" + '{"t": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(TraceError, match=r"t.jsonl:2: JSON nested too deeply"):
        read_trace(path, progress=False)


@pytest.mark.parametrize("header, field", [
    ('{"kvbm_trace": 1, "block_size": 4, "gpu_blocks": 8, "bytes_per_block": 1' + "0" * 400 + "}", "bytes_per_block"),
    ('{"kvbm_trace": 1, "block_size": 4, "gpu_blocks": 1000000000000}', "gpu_blocks"),
    ('{"kvbm_trace": 1, "block_size": 1000000000, "gpu_blocks": 8}', "block_size"),
    ('{"kvbm_trace": 1, "block_size": 4, "gpu_blocks": 8, "host_blocks": 100000000000000}', "host_blocks"),
])
def test_absurd_header_values_name_the_line_and_field(tmp_path, header, field):
    """Read only (a reader that let them through would have the replay build a pool that size)."""
    path = tmp_path / "t.jsonl"
    path.write_text(header + "\n" + '{"t": 1, "prompt": 9, "hashes": ["aa", "bb"]}\n')
    with pytest.raises(TraceError, match=rf"t.jsonl:1: '{field}' must be a whole number from 0 to"):
        read_trace(path, progress=False)


def test_huge_bytes_per_block_is_one_line_not_an_overflow(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    path.write_text('{"kvbm_trace": 1, "block_size": 4, "gpu_blocks": 8, "bytes_per_block": 1' + "0" * 400 + "}\n"
                    '{"t": 1, "prompt": 9, "hashes": ["aa", "bb"]}\n')
    assert kvbm_main(["plan", str(path), "--no-progress", "--no-plots", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "t.jsonl:1: 'bytes_per_block' must be a whole number from 0 to" in err and len(err.splitlines()) == 1


def test_absurd_flags_are_refused_or_bounded(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    write_kvbm_trace(path, chat_requests(users=3, rounds=2), gpu_blocks=16)
    base = ["plan", str(path), "--no-progress", "--no-plots", "--jobs", "1", "--out", str(tmp_path / "o")]
    for flags, message in ((["--bytes-per-block", "1" + "0" * 400], "--bytes-per-block"),
                           (["--host-budget-gb", "inf", "--bytes-per-block", "1000"], "--host-budget-gb"),
                           (["--points", "100000000"], "--points"),
                           (["--g2", "1e400GB", "--bytes-per-block", "1000"], "--g2")):
        assert kvbm_main(base + flags) == 2, flags
        assert message in capsys.readouterr().err
    # A G2 larger than the trace's every block replays as that (not a pool of a trillion slots).
    run = _plan_in_a_box([str(path), "--g2", "5,1000000000000", "--g3", "1000000000000"], tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "G2 sizes above" in run.stdout and "G3 sizes above" in run.stdout
    run = _plan_in_a_box([str(path), "--host-budget-gb", "1000000", "--bytes-per-block", "1000", "--no-disk"],
                         tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "G2 sizes above" in run.stdout


def test_lone_surrogate_in_a_prompt_names_the_line(tmp_path, model_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hello"}\n{"prompt": "bad \\ud800 text"}\n')
    with pytest.raises(TraceError, match=r"p.jsonl:2: 'prompt' is not valid Unicode text.*lone surrogate"):
        read_trace(path, model=model_path, progress=False)
    path.write_text('{"prompt_token_ids": [1, 2], "cache_salt": "\\udc00"}\n')
    with pytest.raises(TraceError, match=r"p.jsonl:1: 'cache_salt' is not valid Unicode"):
        read_trace(path, progress=False)


def test_huge_output_tokens_is_refused_in_bounded_memory(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt_token_ids": [1, 2, 3], "output_tokens": 1000000000000}\n')
    run = _plan_in_a_box([str(path), "--gpu-blocks", "8"], tmp_path)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "p.jsonl:1: 'output_tokens' must be a whole number from 0 to 16,777,216" in run.stderr
    assert "Traceback" not in run.stderr


def test_trace_blocks_in_all_are_bounded(tmp_path, monkeypatch):
    """Each line within bounds, the sum too large: stopped at the line that crosses it, with --limit."""
    import kvbm.tools.plan.trace as trace_mod

    monkeypatch.setattr(trace_mod, "MAX_TRACE_BLOCKS", 100)
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt_token_ids": [1] * 8, "output_tokens": 150}) + "\n"
                            for _ in range(20)))
    with pytest.raises(TraceError, match=r"p.jsonl:3: .*--limit 2"):
        read_trace(path, block_size=4, progress=False)
    path.write_text(_HEADER + "\n" + json.dumps({"t": 1, "prompt": 9, "hashes": ["ab"] * 200}) + "\n")
    with pytest.raises(TraceError, match=r"t?.jsonl:2: .*more than the replay keeps"):
        read_trace(path, progress=False)


def test_overlong_line_is_refused_before_it_is_read_whole(tmp_path, monkeypatch):
    import kvbm.tools.plan.trace as trace_mod

    monkeypatch.setattr(trace_mod, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "t.jsonl"
    path.write_text(_HEADER + "\n" + json.dumps({"t": 1, "prompt": 9, "hashes": ["ab"] * 500}) + "\n")
    with pytest.raises(TraceError, match=r"t.jsonl:2: the line is longer than"):
        read_trace(path, progress=False)


def _point(host_blocks: int, g2_share: float, prompt_tokens: int = 100_000) -> PointResult:
    return PointResult(host_blocks, 0, True, requests=10, prompt_tokens=prompt_tokens,
                       host_hit_blocks=round(g2_share * prompt_tokens / BS), looked_up_blocks=prompt_tokens // BS)


def test_recommended_g2_is_never_below_the_printed_knee():
    """The issue's case: refined sizes packed around the 95% point (84, 89 blocks) on a curve still
    rising there; 95% alone recommended 84 while the knee line said 89."""
    shares = {10: 0.0, 20: 0.05, 40: 0.30, 80: 0.80, 84: 0.95, 89: 0.99, 160: 0.995, 320: 1.0}
    sweep_ = [_point(n, g) for n, g in shares.items()]
    plan = Plan("t", 10, 100_000, BS, 16, None, _point(0, 0.0), sweep_)
    knee_line = next(line for line in plan.knees() if line.startswith("G2: knee at"))
    assert knee_line.startswith("G2: knee at 89 blk")
    assert plan.recommended_host().host_blocks == 89
    assert "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS=89" in "\n".join(plan.recommendation())
    # A knee below the 95% point: the recommendation is the 95% point, and the output says why.
    shares = {10: 0.0, 20: 0.60, 40: 0.70, 80: 0.80, 160: 0.96, 320: 1.0}
    plan = Plan("t", 10, 100_000, BS, 16, None, _point(0, 0.0), [_point(n, g) for n, g in shares.items()])
    lines = plan.knees()
    assert lines[0].startswith("G2: knee at 20 blk") and plan.recommended_host().host_blocks == 160
    assert lines[1].startswith("  recommended G2 160 blk: the smallest size with 95% of the largest gain")
