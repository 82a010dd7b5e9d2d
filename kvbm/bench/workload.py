"""A multi-user, multi-round chat workload with streamed completions.

Shaped like LMBenchmark's synthetic multi-round QA: every user shares one
system prompt, owns a long chat history, and asks one question per round;
each round's prompt is the whole conversation so far, so a server that keeps
the users' KV (vLLM's prefix cache, kvbm's tiers) skips most of the prefill.
TTFT is the time from sending the request to the first streamed token.
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

logger = logging.getLogger(__name__)

CSV_COLUMNS = [
    "prompt_tokens", "generation_tokens", "ttft", "generation_time",
    "user_id", "question_id", "launch_time", "finish_time",
]


@dataclass
class WorkloadSpec:
    users: int = 8
    rounds: int = 4
    system_prompt_words: int = 400
    history_words: int = 1200
    question_words: int = 40
    answer_tokens: int = 16
    #: Requests in flight at once. 1 measures pure TTFT; more adds queueing.
    concurrency: int = 1
    seed: int = 0


@dataclass
class RequestRecord:
    prompt_tokens: int
    generation_tokens: int
    ttft: float
    generation_time: float
    user_id: int
    question_id: int
    launch_time: float
    finish_time: float


@dataclass
class WorkloadResult:
    records: list[RequestRecord] = field(default_factory=list)
    wall_time: float = 0.0

    def summary(self) -> dict[str, float]:
        ttfts = sorted(r.ttft for r in self.records)
        if not ttfts:
            return {"requests": 0}

        def pct(p: float) -> float:
            return ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))]

        return {
            "requests": len(ttfts),
            "ttft_mean": statistics.fmean(ttfts),
            "ttft_p50": pct(0.50),
            "ttft_p90": pct(0.90),
            "ttft_p99": pct(0.99),
            "input_tok_s": sum(r.prompt_tokens for r in self.records) / max(self.wall_time, 1e-9),
            "output_tok_s": sum(r.generation_tokens for r in self.records) / max(self.wall_time, 1e-9),
        }

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for record in self.records:
                writer.writerow(asdict(record))


def _words(rng: random.Random, n: int) -> str:
    # Varied words (not one repeated word) so tokenizers cannot collapse them.
    vocab = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
             "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
             "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu"]
    return " ".join(rng.choice(vocab) for _ in range(n))


async def _stream_completion(
    session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int
) -> tuple[str, int, int, float, float]:
    """Returns (text, prompt_tokens, completion_tokens, ttft, total_time)."""
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
    }
    start = time.perf_counter()
    ttft = None
    text: list[str] = []
    usage: dict = {}
    async with session.post(f"{url}/v1/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{url} answered HTTP {response.status}: {(await response.text())[:500]}")
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                if choice.get("text"):
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    text.append(choice["text"])
    total = time.perf_counter() - start
    return "".join(text), usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), ttft or total, total


async def run_workload(url: str, model: str, spec: WorkloadSpec) -> WorkloadResult:
    """Run every user's rounds; users take turns so each round revisits every history."""
    rng = random.Random(spec.seed)
    system = _words(rng, spec.system_prompt_words)
    conversations = [f"{system}\n\nUser history: {_words(rng, spec.history_words)}" for _ in range(spec.users)]
    questions = [[_words(rng, spec.question_words) for _ in range(spec.rounds)] for _ in range(spec.users)]
    result = WorkloadResult()
    semaphore = asyncio.Semaphore(spec.concurrency)
    t0 = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def ask(user: int, question: int) -> None:
            prompt = f"{conversations[user]}\nQuestion: {questions[user][question]}\nAnswer:"
            async with semaphore:
                launch = time.perf_counter() - t0
                answer, p_tok, g_tok, ttft, total = await _stream_completion(
                    session, url, model, prompt, spec.answer_tokens
                )
            conversations[user] = prompt + answer
            result.records.append(RequestRecord(
                prompt_tokens=p_tok, generation_tokens=g_tok, ttft=ttft, generation_time=total - ttft,
                user_id=user, question_id=question, launch_time=launch, finish_time=time.perf_counter() - t0,
            ))

        for question in range(spec.rounds):
            await asyncio.gather(*(ask(user, question) for user in range(spec.users)))
    result.wall_time = time.perf_counter() - t0
    return result
