"""LMBenchmark's synthetic multi-round QA, as an asyncio client.

The shape follows LMBenchmark's ``synthetic-multi-round-qa`` (the benchmark the
KVBM guide names) so numbers are comparable with it:

* ``num_users`` users are active at once. Each user's first message is a
  system prompt shared by all users plus a context of its own (the "chat
  history"), then one question per round; every answer is appended, so each
  round resends the whole conversation. A server that keeps the users' KV
  (vLLM's prefix cache, kvbm's tiers) skips most of each prefill.
* Pacing: every user asks one question every ``num_users / qps`` seconds
  (later if its previous answer has not arrived), so the overall rate is
  ``qps``. New users join at a steady rate and leave after ``num_rounds``
  questions; at the start the first users are placed part-way through their
  sessions (LMBenchmark's ramp-up) so the rate is ``qps`` from the first second.
* A warm-up phase first sends the opening of the first ``warmup_users`` users'
  conversations (LMBenchmark: 20 users), as a long-running server would have
  seen them before; the measured run then starts with those histories cached
  somewhere, or evicted, depending on the server.
* Streamed completions at temperature 0; TTFT is the time from sending the
  request to the first streamed text; token counts come from the usage the
  server streams last.

Why an event-driven asyncio client rather than LMBenchmark's 0.1 s polling
loop over a thread: every launch happens at its due time (the lag is measured
and reported), and one process can hold hundreds of streams open, so the
client is never what limits the rate.
"""

from __future__ import annotations

import asyncio
import csv
import itertools
import json
import logging
import math
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: LMBenchmark's output columns, in its order.
CSV_COLUMNS = [
    "prompt_tokens", "generation_tokens", "ttft", "generation_time",
    "user_id", "question_id", "launch_time", "finish_time",
]
FILLERS = ("varied", "hi")
APIS = ("completions", "chat")

# Common English words: one token each in typical BPE vocabularies (and in the
# locally built demo tokenizer), so N words are about N tokens, as with
# LMBenchmark's "hi" filler, but a model sees varied text rather than one
# repeated token, which some tokenizers and attention kernels treat specially.
_COMMON_WORDS = (
    "the a an of to in on at for with from by about into over after before under and or but so because while "
    "if when then than that this these those it its he she they we you me him her them us my your our their is "
    "are was were be been has have had do does did will would can could should may might must not no "
    "cache block memory disk host device layer token model prompt request server engine worker queue batch page "
    "table index value key tensor kernel thread process system network storage offload reload transfer copy "
    "write read save load hit miss evict policy pool buffer size time latency throughput speed river mountain "
    "city garden window morning evening winter summer music story letter market bridge station village forest "
    "ocean island harbor castle road people child teacher doctor farmer driver writer painter friend family "
    "quick slow bright dark quiet loud green blue small large old new early late happy careful simple strange "
    "gentle heavy light warm cold run walk speak think build open close start stop give take make find keep "
    "watch carry follow learn teach remember forget believe explain measure"
).split()


def filler_text(num_words: int, seed: str, kind: str = "varied") -> str:
    """``num_words`` filler words: LMBenchmark's ``hi hi hi ...`` or varied common words.

    Deterministic in ``seed`` so every configuration of a comparison (and every
    rerun) sends byte-identical prompts.
    """
    if kind == "hi":
        return " ".join(["hi"] * num_words)
    if kind != "varied":
        raise ValueError(f"unknown filler {kind!r}; choose one of {FILLERS}")
    rng = random.Random(seed)
    return " ".join(rng.choices(_COMMON_WORDS, k=num_words))


@dataclass
class WorkloadSpec:
    """The knobs of LMBenchmark's ``multi-round-qa.py`` (its defaults where it has them)."""

    #: Users active at once.
    num_users: int = 15
    #: Questions per user session.
    num_rounds: int = 20
    #: Words in the system prompt every user shares.
    system_prompt_words: int = 1000
    #: Words of per-user context ("chat history") at the start of each conversation.
    chat_history_words: int = 20000
    #: Tokens generated per answer.
    answer_tokens: int = 100
    #: Overall request rate.
    qps: float = 1.0
    #: Seconds during which requests are launched (in-flight ones are awaited); None: until max_users are done.
    duration: float | None = 100.0
    #: Total user sessions to run, ramp-up users included; None: keep admitting users until ``duration``.
    max_users: int | None = None
    #: Users whose conversation openings the warm-up sends (the first users of the run).
    warmup_users: int = 20
    #: Warm-up launch rate (LMBenchmark's warm-up: a new user every 0.5 s).
    warmup_qps: float = 2.0
    init_user_id: int = 1
    filler: str = "varied"
    api: str = "completions"
    #: Ask vLLM to ignore end-of-sequence so every answer has ``answer_tokens`` tokens.
    ignore_eos: bool = True
    request_timeout: float = 1800.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_users < 1 or self.num_rounds < 1:
            raise ValueError("num_users and num_rounds must be at least 1")
        if not self.qps > 0:
            raise ValueError("qps must be > 0")
        if self.duration is None and self.max_users is None:
            raise ValueError("set a duration, max_users, or both; otherwise users keep joining forever")
        if self.filler not in FILLERS:
            raise ValueError(f"unknown filler {self.filler!r}; choose one of {FILLERS}")
        if self.api not in APIS:
            raise ValueError(f"unknown api {self.api!r}; choose one of {APIS}")

    @property
    def gap_between_requests(self) -> float:
        """Seconds between two questions of one user: ``num_users`` users share ``qps``."""
        return self.num_users / self.qps

    @property
    def gap_between_users(self) -> float:
        """Seconds between two users joining, so about ``num_users`` are active at once."""
        return self.gap_between_requests * max(self.num_rounds - 1, 1) / self.num_users

    def describe(self) -> str:
        bound = []
        if self.duration is not None:
            bound.append(f"{self.duration:g}s")
        if self.max_users is not None:
            bound.append(f"{self.max_users} users in all")
        return (f"{self.num_users} users x {self.num_rounds} rounds at {self.qps:g} QPS ({', '.join(bound)}); "
                f"system prompt {self.system_prompt_words} words, history {self.chat_history_words} words, "
                f"answers {self.answer_tokens} tokens; warm-up {self.warmup_users} users")


@dataclass(frozen=True)
class Arrival:
    """When a user starts asking, and from which question (ramp-up users start part-way)."""

    offset: float
    user_id: int
    first_question: int

    def questions(self, spec: WorkloadSpec) -> range:
        return range(self.first_question, spec.num_rounds + 1)


def arrivals(spec: WorkloadSpec) -> Iterator[Arrival]:
    """Every user session of the run, ramp-up users first, then steady joins.

    Ramp-up as LMBenchmark's ``_ramp_up``: user i would have joined
    ``(num_users - i) * gap_between_users`` seconds before the start, so it has
    already asked the questions due by then and asks its next one within the
    first ``gap_between_requests`` seconds. Ends at ``max_users`` sessions or
    at the first join after ``duration``.
    """
    gap_req, gap_users = spec.gap_between_requests, spec.gap_between_users
    user_id = spec.init_user_id
    count = 0

    def done(offset: float) -> bool:
        return (spec.max_users is not None and count >= spec.max_users) or (
            spec.duration is not None and offset >= spec.duration)

    for i in range(spec.num_users):
        age = (spec.num_users - i) * gap_users
        passed = math.floor(age / gap_req + 1e-9) + 1  # questions already asked
        if passed >= spec.num_rounds:
            continue  # this user's session would already be over
        offset = passed * gap_req - age
        if done(offset):
            return
        yield Arrival(offset, user_id, passed + 1)
        user_id += 1
        count += 1
    k = 0
    while not done(k * gap_users):
        yield Arrival(k * gap_users, user_id, 1)
        user_id += 1
        count += 1
        k += 1


def opening(spec: WorkloadSpec, user_id: int) -> str:
    """A user's first message before its question: the shared system prompt and its own context.

    Worded as LMBenchmark's, so only the filler differs.
    """
    system = filler_text(spec.system_prompt_words, f"{spec.seed}:system", spec.filler)
    context = filler_text(spec.chat_history_words, f"{spec.seed}:user:{user_id}", spec.filler)
    return (f"Hi, here's some system prompt: {system}.For user {user_id}, "
            f"here are some other context: {context}.")


def question(question_id: int) -> str:
    return f"Here's question #{question_id}: can you tell me a new long story with a happy ending?"


def render_prompt(messages: Sequence[dict[str, str]]) -> str:
    """A conversation as one completions prompt, exactly as LMBenchmark renders it."""
    return "\n".join(f"{m['role'].upper()}: {m['content']}" for m in messages) + "\nASSISTANT:"


@dataclass
class RequestRecord:
    """One answered request; the first eight fields are LMBenchmark's CSV columns."""

    prompt_tokens: int
    generation_tokens: int
    #: Seconds from sending the request to the first streamed text.
    ttft: float
    #: Seconds from the first streamed text to the end of the stream.
    generation_time: float
    user_id: int
    question_id: int
    #: Unix time at launch and at the end of the stream (LMBenchmark writes Unix times too).
    launch_time: float
    finish_time: float
    #: Seconds the client launched this request after it was due (its own overhead; not in the CSV).
    client_lag: float = 0.0


def _percentile(sorted_values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default), p in [0, 100]."""
    if not sorted_values:
        return math.nan
    k = (len(sorted_values) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


@dataclass
class WorkloadResult:
    """The records of one run plus what the summary needs besides them."""

    records: list[RequestRecord] = field(default_factory=list)
    #: Unix times of the run's start (first scheduled launch) and end (last answer).
    start_time: float = 0.0
    end_time: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def wall_time(self) -> float:
        return max(0.0, self.end_time - self.start_time)

    def summary(self) -> dict[str, float]:
        """LMBenchmark's numbers (mean TTFT, tokens/s, QPS) plus TTFT percentiles and client lag."""
        recs = self.records
        ttfts = sorted(r.ttft for r in recs)
        duration = max(self.wall_time, 1e-9)
        lags = sorted(r.client_lag for r in recs)
        speeds = [r.generation_tokens / r.generation_time for r in recs if r.generation_time > 0]
        later = sorted(r.ttft for r in recs if r.question_id > 1)
        return {
            "requests": len(recs),
            "errors": len(self.errors),
            "duration": self.wall_time,
            "qps": len(recs) / duration,
            "ttft_mean": statistics.fmean(ttfts) if ttfts else math.nan,
            "ttft_p50": _percentile(ttfts, 50),
            "ttft_p90": _percentile(ttfts, 90),
            "ttft_p99": _percentile(ttfts, 99),
            "input_tok_s": sum(r.prompt_tokens for r in recs) / duration,
            "output_tok_s": sum(r.generation_tokens for r in recs) / duration,
            "prompt_tokens_mean": statistics.fmean(r.prompt_tokens for r in recs) if recs else math.nan,
            "gen_tok_s_per_request": statistics.fmean(speeds) if speeds else math.nan,
            "client_lag_p99": _percentile(lags, 99),
            # Later turns: requests a cache can serve (a user's first question is new to every server).
            "later_ttft_mean": statistics.fmean(later) if later else math.nan,
            "later_ttft_p90": _percentile(later, 90),
        }

    def write_csv(self, path: Path) -> None:
        """LMBenchmark's columns, so its ``--process-summary`` and notebooks read our files."""
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            for r in self.records:
                writer.writerow([getattr(r, name) for name in CSV_COLUMNS])

    @classmethod
    def read_csv(cls, path: Path) -> WorkloadResult:
        """Read a CSV written by us or by LMBenchmark (the run spans its launch and finish times)."""
        ints = {"prompt_tokens", "generation_tokens", "user_id", "question_id"}
        with open(path, newline="") as handle:
            records = [
                RequestRecord(**{k: int(float(v)) if k in ints else float(v)
                                 for k, v in row.items() if k in CSV_COLUMNS})
                for row in csv.DictReader(handle)
            ]
        start = min((r.launch_time for r in records), default=0.0)
        end = max((r.finish_time for r in records), default=0.0)
        return cls(records, start, end)


def format_summary(summary: dict[str, float], title: str = "Performance summary") -> str:
    """The printed summary of ``kvbm bench run``."""
    lines = [
        f"==================== {title} ====================",
        f"  requests:            {summary['requests']:.0f} ({summary['errors']:.0f} failed) "
        f"in {summary['duration']:.1f}s ({summary['qps']:.3f} req/s)",
        f"  TTFT mean:           {summary['ttft_mean']:.4f}s",
        f"  TTFT p50/p90/p99:    {summary['ttft_p50']:.4f}s / {summary['ttft_p90']:.4f}s / "
        f"{summary['ttft_p99']:.4f}s",
        f"  input tokens/s:      {summary['input_tok_s']:.1f} (mean prompt {summary['prompt_tokens_mean']:.0f} "
        "tokens)",
        f"  output tokens/s:     {summary['output_tok_s']:.1f} "
        f"({summary['gen_tok_s_per_request']:.1f} per request while generating)",
        f"  client launch lag:   p99 {1000 * summary['client_lag_p99']:.1f} ms",
    ]
    return "\n".join(lines)


@dataclass
class StreamedAnswer:
    text: str
    prompt_tokens: int
    generation_tokens: int
    ttft: float
    total: float


class OpenAIStreamClient:
    """Streamed completions against an OpenAI-compatible server, over one aiohttp session.

    The connection pool is unbounded (aiohttp's default caps it at 100, which
    would silently queue users beyond that in the client).
    """

    def __init__(self, base_url: str, model: str, *, api: str = "completions", ignore_eos: bool = True,
                 timeout: float = 1800.0) -> None:
        base = base_url.rstrip("/")
        self.base_url = base[: -len("/v1")] if base.endswith("/v1") else base
        self.model = model
        self.api = api
        self.ignore_eos = ignore_eos
        self.timeout = timeout
        self._session: Any = None

    async def __aenter__(self) -> OpenAIStreamClient:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=0)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout, sock_read=self.timeout)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()

    def _body(self, messages: Sequence[dict[str, str]], max_tokens: int) -> tuple[str, dict]:
        body: dict[str, Any] = {
            "model": self.model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.api == "chat":
            return "/v1/chat/completions", {**body, "messages": list(messages)}
        return "/v1/completions", {**body, "prompt": render_prompt(messages)}

    async def ask(self, messages: Sequence[dict[str, str]], max_tokens: int,
                  headers: dict[str, str] | None = None) -> StreamedAnswer:
        """Send one streamed request; time the first text and the end of the stream."""
        path, body = self._body(messages, max_tokens)
        payload = json.dumps(body)
        start = time.perf_counter()
        ttft: float | None = None
        parts: list[str] = []
        usage: dict = {}
        chunks = 0
        async with self._session.post(self.base_url + path, data=payload,
                                      headers={"Content-Type": "application/json", **(headers or {})}) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status} from {self.base_url}{path}: {(await resp.text())[:300]}")
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or ():
                    text = choice.get("text") if self.api == "completions" else (choice.get("delta") or {}).get(
                        "content")
                    if text:
                        if ttft is None:
                            ttft = time.perf_counter() - start
                        chunks += 1
                        parts.append(text)
        total = time.perf_counter() - start
        return StreamedAnswer(
            text="".join(parts),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            generation_tokens=int(usage.get("completion_tokens") or chunks),
            ttft=total if ttft is None else ttft,
            total=total,
        )


#: Called after every answered request (progress bars, live summaries).
RecordCallback = Callable[[RequestRecord], None]


async def _sleep_until(loop: asyncio.AbstractEventLoop, when: float) -> None:
    delay = when - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def warm_up(client: OpenAIStreamClient, spec: WorkloadSpec,
                  on_record: RecordCallback | None = None) -> WorkloadResult:
    """Send the openings of the run's first ``warmup_users`` users (their system prompt and history).

    LMBenchmark's warm-up runs the same user ids for a few seconds before the
    measured run so those users' histories exist on the server. Only the
    prompts' KV matters for that, so each opening asks for a single token.
    Launched at ``warmup_qps`` and all awaited before returning.
    """
    users = [a.user_id for a in itertools.islice(arrivals(spec), spec.warmup_users)]
    # A run with fewer users than the warm-up still warms up that many (distinct ids after its own).
    next_id = users[-1] + 1 if users else spec.init_user_id
    users += range(next_id, next_id + spec.warmup_users - len(users))
    loop = asyncio.get_running_loop()
    result = WorkloadResult(start_time=time.time())
    t0 = loop.time()

    async def one(i: int, user_id: int) -> None:
        await _sleep_until(loop, t0 + i / spec.warmup_qps)
        launch = time.time()
        messages = [{"role": "user", "content": opening(spec, user_id) + question(1)}]
        try:
            answer = await client.ask(messages, 1, headers={"x-user-id": str(user_id)})
        except Exception as exc:  # noqa: BLE001 - reported with the result, the run goes on
            result.errors.append(f"warm-up user {user_id}: {exc}")
            logger.warning("warm-up request for user %d failed: %s", user_id, exc)
            return
        record = RequestRecord(answer.prompt_tokens, answer.generation_tokens, answer.ttft,
                               answer.total - answer.ttft, user_id, 0, launch, time.time())
        result.records.append(record)
        if on_record:
            on_record(record)

    await asyncio.gather(*(one(i, u) for i, u in enumerate(users)))
    result.end_time = time.time()
    return result


async def run_workload(client: OpenAIStreamClient, spec: WorkloadSpec,
                       on_record: RecordCallback | None = None) -> WorkloadResult:
    """Run the measured phase: every session of ``arrivals(spec)`` as its own task.

    Each user launches a question at its due time, or as soon as its previous
    answer arrives if that is later (LMBenchmark's rule). No launch happens
    after ``duration``; requests in flight then are awaited and recorded.
    """
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    wall0 = time.time() - t0  # Unix time = wall0 + loop time
    deadline = math.inf if spec.duration is None else t0 + spec.duration
    gap = spec.gap_between_requests
    result = WorkloadResult(start_time=wall0 + t0)

    async def session(arrival: Arrival) -> None:
        messages: list[dict[str, str]] = []
        due = t0 + arrival.offset
        for qid in arrival.questions(spec):
            if due >= deadline:
                return
            await _sleep_until(loop, due)
            launched = loop.time()
            text = question(qid) if messages else opening(spec, arrival.user_id) + question(qid)
            messages.append({"role": "user", "content": text})
            try:
                answer = await client.ask(messages, spec.answer_tokens,
                                          headers={"x-user-id": str(arrival.user_id)})
            except Exception as exc:  # noqa: BLE001 - one failed user must not stop the others
                result.errors.append(f"user {arrival.user_id} question {qid}: {exc}")
                logger.warning("user %d question %d failed, ending its session: %s", arrival.user_id, qid, exc)
                return
            finished = loop.time()
            messages.append({"role": "assistant", "content": answer.text})
            record = RequestRecord(
                prompt_tokens=answer.prompt_tokens, generation_tokens=answer.generation_tokens,
                ttft=answer.ttft, generation_time=answer.total - answer.ttft, user_id=arrival.user_id,
                question_id=qid, launch_time=wall0 + launched, finish_time=wall0 + finished,
                client_lag=max(0.0, launched - due),
            )
            result.records.append(record)
            if on_record:
                on_record(record)
            # Next question: a full gap after this launch, or now if the answer came later.
            due = max(launched + gap, loop.time())

    await asyncio.gather(*(session(a) for a in arrivals(spec)))
    result.end_time = time.time()
    result.records.sort(key=lambda r: r.launch_time)
    return result


def planned_requests(spec: WorkloadSpec) -> int:
    """Requests the run would send if the server kept up (for progress bars)."""
    total = 0
    for arrival in arrivals(spec):
        for i, _ in enumerate(arrival.questions(spec)):
            if spec.duration is not None and arrival.offset + i * spec.gap_between_requests >= spec.duration:
                break
            total += 1
    return total


def run_benchmark(url: str, model: str, spec: WorkloadSpec, *, label: str = "", progress: bool | None = None,
                  before_run: Callable[[], None] | None = None) -> tuple[WorkloadResult, WorkloadResult]:
    """Warm-up, then the measured run, with progress bars; returns (warm-up, run).

    ``before_run`` is called between the two (to snapshot server counters so
    that the warm-up does not count). ``progress=None`` shows bars only on a
    terminal.
    """
    return asyncio.run(_run_benchmark(url, model, spec, label, progress, before_run))


async def _run_benchmark(url: str, model: str, spec: WorkloadSpec, label: str, progress: bool | None,
                         before_run: Callable[[], None] | None) -> tuple[WorkloadResult, WorkloadResult]:
    from tqdm import tqdm

    prefix = f"[{label}] " if label else ""
    disable = None if progress is None else not progress
    async with OpenAIStreamClient(url, model, api=spec.api, ignore_eos=spec.ignore_eos,
                                  timeout=spec.request_timeout) as client:
        warm = WorkloadResult()
        if spec.warmup_users > 0:
            with tqdm(total=spec.warmup_users, desc=f"{prefix}warm-up", unit="user", disable=disable,
                      leave=False) as bar:
                warm = await warm_up(client, spec, lambda r: bar.update(1))
            logger.info("%swarm-up: %d users in %.1fs", prefix, len(warm.records), warm.wall_time)
            if warm.errors and not warm.records:
                raise RuntimeError(f"every warm-up request failed, e.g. {warm.errors[0]}")
        if before_run is not None:
            before_run()
        ttfts: list[float] = []
        with tqdm(total=planned_requests(spec), desc=f"{prefix}run", unit="req", disable=disable) as bar:

            def on_record(record: RequestRecord) -> None:
                ttfts.append(record.ttft)
                bar.set_postfix_str(f"mean TTFT {statistics.fmean(ttfts):.3f}s", refresh=False)
                bar.update(1)

            result = await run_workload(client, spec, on_record)
            bar.total = bar.n  # requests that waited on slow answers past the deadline never ran
            bar.refresh()
    return warm, result
