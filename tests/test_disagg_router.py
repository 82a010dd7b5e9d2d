"""kvbm's disaggregated router against fake workers (fast; no vLLM, no NIXL).

The fakes speak just enough of vLLM's P/D protocol: a request with
``kv_transfer_params.do_remote_decode`` is a prefill and answers with
``kv_transfer_params``; any other request is a decode, which must carry the
params its prefill returned. Failure modes (500s, hangs, dying mid-stream,
refusing connections) are switched on per fake.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from kvbm.tools.router import PrefixIndex, Router, RouterConfig, prompt_text  # noqa: E402


class FakeWorker:
    """A stand-in vLLM server for one role."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.requests: list[dict[str, Any]] = []
        self.healthy = True
        self.fail_status: int | None = None  # answer generation requests with this status
        self.hang = False  # never answer generation requests (nor /health when unhealthy)
        self.die_mid_stream = False
        self.die_on_request = False  # stop listening and reset the connection, like a killed process
        self.server: TestServer | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        return app

    async def start(self) -> str:
        self.server = TestServer(self.app(), host="127.0.0.1")
        await self.server.start_server()
        return str(self.server.make_url("")).rstrip("/")

    async def stop(self) -> None:
        assert self.server is not None
        await self.server.close()

    async def _health(self, request: web.Request) -> web.Response:
        if not self.healthy:
            if self.hang:
                await asyncio.sleep(3600)
            return web.Response(status=503)
        return web.Response(status=200)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if self.hang:
            await asyncio.sleep(3600)
        if self.die_on_request:
            assert self.server is not None and self.server.runner is not None
            for site in list(self.server.runner.sites):
                await site.stop()
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        if self.fail_status is not None:
            return web.json_response({"error": {"message": f"{self.name} failing"}}, status=self.fail_status)
        params = body.get("kv_transfer_params") or {}
        if params.get("do_remote_decode"):
            assert body["max_tokens"] == 1 and body["stream"] is False
            return web.json_response({
                "choices": [{"text": "x"}],
                "kv_transfer_params": {"do_remote_prefill": True, "remote_engine_id": self.name,
                                       "remote_block_ids": [[1, 2]], "remote_host": "127.0.0.1",
                                       "remote_port": 1, "remote_request_id": "r"},
            })
        if params.get("remote_engine_id") is None:
            return web.json_response({"error": {"message": "decode without kv_transfer_params"}}, status=400)
        text = f"{self.name}<-{params['remote_engine_id']}"
        if not body.get("stream"):
            return web.json_response({"choices": [{"text": text}], "usage": {"completion_tokens": 3}})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i, piece in enumerate([text[:3], text[3:], "!"]):
            await response.write(f"data: {json.dumps({'choices': [{'text': piece}]})}\n\n".encode())
            await asyncio.sleep(0.05)
            if self.die_mid_stream and i == 0:
                assert request.transport is not None
                request.transport.abort()  # like a killed process: connection reset mid-stream
                return response
        await response.write(b"data: [DONE]\n\n")
        return response


async def _run(n_prefill: int, n_decode: int, body: Callable[..., Awaitable[None]], **config: Any) -> None:
    prefill = [FakeWorker(f"P{i}") for i in range(n_prefill)]
    decode = [FakeWorker(f"D{i}") for i in range(n_decode)]
    urls = [await w.start() for w in [*prefill, *decode]]
    settings = {"health_interval_s": 0.1, "health_timeout_s": 0.5, "connect_timeout_s": 1.0,
                "read_timeout_s": 5.0, **config}
    router = Router(RouterConfig(urls[:n_prefill], urls[n_prefill:], **settings))
    client = TestClient(TestServer(router.make_app(), host="127.0.0.1"))
    await client.start_server()
    try:
        await body(client, router, prefill, decode)
    finally:
        await client.close()
        for w in [*prefill, *decode]:
            await w.stop()


def run(n_prefill: int, n_decode: int, **config: Any) -> Callable:
    """Decorator: run an async test body against fresh fakes and a router."""

    def wrap(fn: Callable[..., Awaitable[None]]) -> Callable[[], None]:
        def test() -> None:
            asyncio.run(asyncio.wait_for(_run(n_prefill, n_decode, fn, **config), timeout=60))

        test.__name__ = fn.__name__
        test.__doc__ = fn.__doc__
        return test

    return wrap


async def read_stream(resp: aiohttp.ClientResponse) -> tuple[str, list[dict]]:
    text, events = "", []
    async for line in resp.content:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        events.append(event)
        for choice in event.get("choices", []):
            text += choice.get("text", "")
    return text, events


def chat(turns: list[str]) -> dict:
    messages: list[dict] = []
    for i, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        if i < len(turns) - 1:
            messages.append({"role": "assistant", "content": f"answer {i}"})
    return {"model": "fake-model", "messages": messages, "max_tokens": 5}


# ---------------------------------------------------------------------------
@run(1, 1)
async def test_prefill_then_decode_both_endpoints(client, router, prefill, decode):
    """P gets max_tokens=1 + do_remote_decode; D gets P's params; the answer is D's."""
    resp = await client.post("/v1/completions", json={"model": "m", "prompt": "hello", "max_tokens": 7,
                                                      "stream_options": {"include_usage": True}, "min_tokens": 3})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["choices"][0]["text"] == "D0<-P0"
    assert resp.headers["x-kvbm-prefill-worker"] == "p0" and resp.headers["x-kvbm-decode-worker"] == "d0"
    p_body, d_body = prefill[0].requests[0], decode[0].requests[0]
    assert p_body["kv_transfer_params"]["do_remote_decode"] is True
    assert "stream_options" not in p_body and "min_tokens" not in p_body
    assert d_body["max_tokens"] == 7 and d_body["kv_transfer_params"]["remote_engine_id"] == "P0"
    resp = await client.post("/v1/chat/completions", json={**chat(["hi"]), "stream": True})
    assert resp.status == 200
    text, _ = await read_stream(resp)
    assert text == "D0<-P0!"
    assert prefill[0].requests[1]["messages"][0]["content"] == "hi"


@run(1, 1)
async def test_models_health_metrics(client, router, prefill, decode):
    resp = await client.get("/v1/models")
    assert (await resp.json())["data"][0]["id"] == "fake-model"
    resp = await client.get("/health")
    assert resp.status == 200 and {w["name"] for w in (await resp.json())["workers"]} == {"p0", "d0"}
    await client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2})
    text = await (await client.get("/metrics")).text()
    assert 'kvbm_router_requests_total{endpoint="/v1/completions",status="200"} 1.0' in text
    assert 'kvbm_router_worker_healthy{role="decode",url=' in text


@run(1, 1)
async def test_bad_requests_get_clear_errors(client, router, prefill, decode):
    resp = await client.post("/v1/completions", data=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status == 400 and "JSON" in (await resp.json())["error"]["message"]
    resp = await client.post("/v1/completions", json={"model": "m", "prompt": ["a", "b"]})
    assert resp.status == 400 and "one prompt" in (await resp.json())["error"]["message"]
    prefill[0].fail_status = 400  # a client error from the worker passes through unchanged
    resp = await client.post("/v1/completions", json={"model": "m", "prompt": "x"})
    assert resp.status == 400 and "P0 failing" in await resp.text()


@run(2, 2)
async def test_conversations_stick_to_one_prefill_worker_and_spread(client, router, prefill, decode):
    """Every later turn goes to its first turn's prefill worker; conversations and decodes spread."""
    homes: dict[int, set[str]] = {}
    decoders: set[str] = set()
    for turn in range(1, 4):
        for conv in range(8):
            turns = [f"conversation {conv} " + "lorem ipsum " * 40] + [f"turn {t} " * 30 for t in range(1, turn)]
            resp = await client.post("/v1/chat/completions", json=chat(turns))
            assert resp.status == 200
            homes.setdefault(conv, set()).add(resp.headers["x-kvbm-prefill-worker"])
            decoders.add(resp.headers["x-kvbm-decode-worker"])
    assert all(len(h) == 1 for h in homes.values()), homes
    assert {next(iter(h)) for h in homes.values()} == {"p0", "p1"}
    assert decoders == {"d0", "d1"}
    text = await (await client.get("/metrics")).text()
    assert 'kvbm_router_prefill_routes_total{reason="overlap"} 16.0' in text


@run(2, 1)
async def test_dead_prefill_worker_is_skipped(client, router, prefill, decode):
    """A prefill worker that stops answering connections: requests retry on the other one."""
    await prefill[0].stop()
    for i in range(4):
        resp = await client.post("/v1/completions", json={"model": "m", "prompt": f"p{i}" * 300, "max_tokens": 2})
        assert resp.status == 200
        assert resp.headers["x-kvbm-prefill-worker"] == "p1"
    health = await (await client.get("/health")).json()
    p0 = next(w for w in health["workers"] if w["name"] == "p0")
    assert p0["healthy"] is False and p0["last_error"]


@run(1, 2, health_failures=100)
async def test_decode_500_retries_elsewhere(client, router, prefill, decode):
    decode[0].fail_status = 500
    for _ in range(3):
        resp = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2})
        assert resp.status == 200
        assert (await resp.json())["choices"][0]["text"] == "D1<-P0"


@run(1, 2, abort_after_s=1.0)
async def test_hung_decode_worker_is_taken_out_and_request_retried(client, router, prefill, decode):
    """A hung worker fails its health checks; its in-flight request is aborted and retried, not left hanging."""
    decode[0].hang = True
    decode[0].healthy = False
    router._decode_rr = iter(range(0, 10**6, 2))  # force the first pick onto d0 while it still looks healthy
    router.decode[0].state = "up"
    resp = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2})
    assert resp.status == 200
    assert resp.headers["x-kvbm-decode-worker"] == "d1" and resp.headers["x-kvbm-attempts"] == "2"
    assert router.decode[0].state == "down"


@run(1, 2, health_failures=1)
async def test_slow_worker_is_suspect_not_dead(client, router, prefill, decode):
    """Failing health checks: no new requests while another worker is up; still used when it is the last."""
    decode[0].healthy = False  # /health answers 503, generation still works
    await asyncio.sleep(0.5)
    assert router.decode[0].state == "suspect"
    for _ in range(3):
        resp = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2})
        assert resp.headers["x-kvbm-decode-worker"] == "d1"
    await decode[1].stop()
    await asyncio.sleep(0.5)
    assert router.decode[1].state == "down"
    health = await client.get("/health")
    assert health.status == 200 and (await health.json())["status"] == "degraded"
    resp = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2})
    assert resp.status == 200 and resp.headers["x-kvbm-decode-worker"] == "d0"


@run(1, 1)
async def test_stream_broken_mid_way_ends_with_error_event(client, router, prefill, decode):
    decode[0].die_mid_stream = True
    resp = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "stream": True})
    assert resp.status == 200
    text, events = await read_stream(resp)
    assert text.startswith("D0<")
    assert "decode failed mid-stream" in events[-1]["error"]["message"]
    await asyncio.sleep(0.3)
    assert router.decode[0].state == "up"  # a one-off broken connection; /health still answers


@run(1, 2)
async def test_decode_worker_dying_mid_request_is_retried_and_taken_out(client, router, prefill, decode):
    """A worker killed under a request: the request retries on the other one, the dead one leaves rotation."""
    decode[0].die_on_request = True
    router._decode_rr = iter(range(0, 10**6, 2))  # the first pick goes to d0
    resp = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2})
    assert resp.status == 200
    assert resp.headers["x-kvbm-decode-worker"] == "d1" and resp.headers["x-kvbm-attempts"] == "2"
    await asyncio.sleep(0.3)
    assert router.decode[0].state == "down" and "cannot connect" in router.decode[0].last_error


@run(1, 1)
async def test_no_healthy_worker_is_a_fast_clear_error(client, router, prefill, decode):
    await decode[0].stop()
    await asyncio.sleep(0.3)
    resp = await client.post("/v1/completions", json={"model": "m", "prompt": "x"})
    assert resp.status == 503
    message = (await resp.json())["error"]["message"]
    assert "no decode worker available" in message and "d0" in message
    assert (await client.get("/health")).status == 503


def test_prefix_index_matches_longest_chain_and_evicts():
    index = PrefixIndex(chunk_chars=4, capacity=3)
    first = index.hashes("root", "aaaabbbbcc")
    assert len(first) == 2  # the partial tail is not a chunk
    index.record("w", first)
    assert index.match("w", index.hashes("root", "aaaabbbbccccdddd")) == 2
    assert index.match("w", index.hashes("other", "aaaabbbb")) == 0
    assert index.match("w", index.hashes("root", "aaaaXbbb")) == 1
    index.record("w", index.hashes("root", "zzzzyyyy"))
    assert index.size("w") == 3


def test_chat_rendering_keeps_earlier_turns_as_a_prefix():
    short = prompt_text("chat", chat(["hello"]))
    longer = prompt_text("chat", chat(["hello", "more"]))
    assert longer.startswith(short)


# ---- hostile clients -----------------------------------------------------------
@run(1, 1)
async def test_deeply_nested_json_is_a_400_not_a_500(client, router, prefill, decode):
    for depth in (100_000, 500):  # beyond the parser's stack, and beyond what the router forwards
        body = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
        resp = await client.post("/v1/completions", data=body, headers={"Content-Type": "application/json"})
        assert resp.status == 400, await resp.text()
        assert "nests deeper" in (await resp.json())["error"]["message"]
    assert prefill[0].requests == []
    resp = await client.post("/v1/completions", data=b"null", headers={"Content-Type": "application/json"})
    assert resp.status == 400 and "object" in (await resp.json())["error"]["message"]


def test_half_sent_connections_are_bounded_and_closed(monkeypatch):
    """300 connections that never finish their headers, and a few that never finish their body:
    the router holds at most its bound, closes them by itself, and serves real requests meanwhile."""
    import threading

    from kvbm.tools import router as router_module
    from kvbm.tools.router import ConnectionGuard, start_site

    monkeypatch.setattr(router_module, "BODY_TIMEOUT_S", 1.0)

    async def body() -> None:
        workers = [FakeWorker("P0"), FakeWorker("D0")]
        urls = [await w.start() for w in workers]
        router = Router(RouterConfig(urls[:1], urls[1:], health_interval_s=0.2))
        guard = ConnectionGuard(max_connections=64, header_timeout_s=1.0)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        runner = await start_site(router.make_app(guard), "127.0.0.1", port, guard=guard)
        threads = threading.active_count()
        stalled = []
        try:
            for _ in range(300):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # headers never end
                stalled.append((reader, writer))
            half_bodies = []
            for _ in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100\r\n\r\n{\"prompt\"")  # body never ends
                half_bodies.append((reader, writer))
            await asyncio.sleep(0.2)
            assert sum(h.transport is not None for h in runner.server.connections) <= 64
            assert threading.active_count() <= threads + 2
            async with aiohttp.ClientSession() as session:  # a real client still gets through
                async with session.post(f"http://127.0.0.1:{port}/v1/completions",
                                        json={"model": "m", "prompt": "hi", "max_tokens": 2}) as resp:
                    assert resp.status == 200, await resp.text()
            for reader, _ in stalled:  # closed by the router (evicted or timed out), none left hanging
                assert await asyncio.wait_for(reader.read(), 10) == b""
            for reader, _ in half_bodies:
                answer = await asyncio.wait_for(reader.read(), 10)
                assert answer.startswith(b"HTTP/1.1 408") or answer == b""  # evicted ones just close
            assert sum(h.transport is not None for h in runner.server.connections) == 0
        finally:
            for _, writer in stalled:
                writer.close()
            await runner.cleanup()
            for w in workers:
                await w.stop()

    asyncio.run(asyncio.wait_for(body(), timeout=60))
