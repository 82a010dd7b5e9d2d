"""A tiny OpenAI-compatible streaming server for testing the benchmark client's own logic.

It answers instantly (or after a set delay), counts prompt "tokens" as words,
and records every request with its arrival time, so tests can check pacing,
prompt growth and client overhead without a model. It runs on its own event
loop in a thread, so the client under test keeps its loop to itself.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Received:
    arrival: float  # time.time()
    path: str
    body: dict
    user_id: int | None


@dataclass
class FakeOpenAIServer:
    """``with FakeOpenAIServer() as server: ... server.url ... server.requests``."""

    #: Seconds before the first token (per request).
    ttft: float = 0.0
    #: Seconds between streamed tokens.
    token_gap: float = 0.0
    requests: list[Received] = field(default_factory=list)
    url: str = ""

    def __enter__(self) -> FakeOpenAIServer:
        started = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("fake server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main(started))

    async def _main(self, started: threading.Event) -> None:
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/completions", self._handle)
        app.router.add_post("/v1/chat/completions", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        started.set()
        await self._stop.wait()
        await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        arrival = time.time()
        body = await request.json()
        user = request.headers.get("x-user-id")
        self.requests.append(Received(arrival, request.path, body, int(user) if user else None))
        chat = request.path.endswith("chat/completions")
        prompt = " ".join(m["content"] for m in body["messages"]) if chat else body["prompt"]
        n = body.get("max_tokens", 16)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if self.ttft:
            await asyncio.sleep(self.ttft)
        for i in range(n):
            if i and self.token_gap:
                await asyncio.sleep(self.token_gap)
            choice = {"index": 0, "delta": {"content": f" w{i}"}} if chat else {"index": 0, "text": f" w{i}"}
            await response.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": n, "total_tokens": 0}
        await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def by_user(self) -> dict[int, list[Received]]:
        users: dict[int, list[Received]] = {}
        for r in sorted(self.requests, key=lambda r: r.arrival):
            users.setdefault(r.user_id, []).append(r)
        return users
