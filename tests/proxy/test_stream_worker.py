"""``proxy.compare: redis`` in one process: the live proxy only appends copies to the stream, a
worker compares them; credentials, garbage entries and every drop reason."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from loadtest.procs import free_port
from proxy.app import build_worker_app
from proxy.buffer.keys import COPIES_GROUP, KeySchema
from proxy.keys import TELEMETRY
from proxy.settings import Settings
from tests.conftest import make_settings

KEYS = KeySchema()


def _settings(ref: str, cand: str, redis_url: str, **proxy: Any) -> Settings:
    return make_settings(
        ref,
        redis_url,
        candidates=[
            {
                "name": "c",
                "url": cand,
                "headers": {"Authorization": "Bearer cand-secret-0123456789"},
            }
        ],
        proxy={"compare": "redis", "shed_lag_ms": 0, "drain_timeout_s": 2, **proxy},
    )


@pytest.fixture
async def worker() -> AsyncIterator[Callable[[Settings], Any]]:
    runners: list[web.AppRunner] = []

    async def start(settings: Settings) -> web.Application:
        app = build_worker_app(settings)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()  # starts the consumer
        runners.append(runner)
        return app

    yield start
    for runner in runners:
        await runner.cleanup()


async def _infer(port: int, k: int, *, size: int = 1, auth: str = "") -> None:
    data = ",".join(str(k) for _ in range(size))
    body = f'{{"inputs":[{{"name":"x","datatype":"FP32","shape":[{size}],"data":[{data}]}}]}}'
    headers = {"X-Request-Id": f"r{k}", **({"Authorization": auth} if auth else {})}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"http://127.0.0.1:{port}/v2/models/m/infer", data=body, headers=headers) as r,
    ):
        assert r.status == 200


async def _eventually(check: Callable[[], Any], what: str, timeout_s: float = 10) -> Any:
    """``check()``'s first truthy result (awaited when it is a coroutine), polled."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def _proxy_and_worker(
    fake: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    worker: Callable[..., Any],
    redis_url: str,
) -> tuple[Any, Callable[[], Any], Any]:
    """A live proxy in ``compare: redis`` mode, a way to start its worker, and the drifting
    candidate."""
    ref, cand = await fake(), await fake(drift=0.5)
    settings = _settings(ref.url, cand.url, redis_url)
    proxy = await proxy_factory(settings)
    return proxy, lambda: worker(settings), cand


async def test_copies_carry_the_candidates_own_credentials_never_the_clients(
    fake: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    worker: Callable[..., Any],
    redis_url: str,
) -> None:
    proxy, start_worker, cand = await _proxy_and_worker(fake, proxy_factory, worker, redis_url)
    await _infer(proxy.data_port, 1, auth="Bearer client-secret-0123456789")
    r = aioredis.Redis.from_url(redis_url)
    try:
        # The stream entry holds no credentials (read before a worker takes and deletes it).
        entries = await _eventually(lambda: r.xrange(KEYS.copies), "the copy appended")
        assert len(entries) == 1 and b"client-secret" not in repr(entries).encode()
        await start_worker()
        flagged = await _eventually(
            lambda: proxy.store.list_samples(flagged=True), "the worker's flagged sample"
        )
        assert cand.behaviour.seen_headers[0]["Authorization"] == "Bearer cand-secret-0123456789"
        # Compared, stored, acknowledged and deleted: the stream holds only the backlog.
        assert await r.xlen(KEYS.copies) == 0
        sample = await proxy.store.get_sample(flagged[0]["id"])
        assert sample is not None and sample["request_id"] == "r1"
        stored = repr(sample).encode()
        assert b"client-secret" not in stored and b"cand-secret" not in stored
        # Acknowledged once stored: nothing left pending.
        assert await _pending(r, 0)
    finally:
        await r.aclose()


async def test_a_garbage_entry_is_skipped_counted_and_acknowledged(
    fake: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    worker: Callable[..., Any],
    redis_url: str,
) -> None:
    proxy, start_worker, _ = await _proxy_and_worker(fake, proxy_factory, worker, redis_url)
    app = await start_worker()
    r = aioredis.Redis.from_url(redis_url)
    try:
        # Anyone with write access to Redis could add this: it is never unpickled or trusted.
        await r.xadd(KEYS.copies, {"v": b"1", "meta": b"\x80\x04garbage", "body": b""})
        await r.xadd(KEYS.copies, {"v": b"9"})
        # Well-formed, but naming a route no live proxy mirrors: a worker must never send a
        # candidate (with its own credentials) an admin call because an entry says so.
        meta = {
            "route": ["openai", None, None, "/v2/repository/models/x/unload"],
            "query": "",
            "headers": [],
            "received_at": 0.0,
            "candidates": ["c"],
            "served_by": None,
            "canary": None,
            "span": None,
            "ref": {
                "upstream": "ref",
                "status": 200,
                "headers": [],
                "latency_s": 0.01,
                "timeline": [],
                "complete": True,
            },
        }
        await r.xadd(
            KEYS.copies, {"v": b"1", "meta": json.dumps(meta), "body": b"{}", "ref_body": b"{}"}
        )
        await _infer(proxy.data_port, 2)
        await _eventually(lambda: proxy.store.list_samples(flagged=True), "the real copy")
        tally = app[TELEMETRY].tally
        await _eventually(
            lambda: tally[("*", "skipped:bad_stream_entry")] == 3, "all three entries counted"
        )
        await _eventually(lambda: _pending(r, 0), "every entry acknowledged")
    finally:
        await r.aclose()


async def _pending(r: aioredis.Redis, pending: int) -> bool:
    return bool((await r.xpending(KEYS.copies, COPIES_GROUP))["pending"] == pending)


async def test_every_copy_the_stream_cannot_take_is_counted_and_live_traffic_is_untouched(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await fake(), await fake()
    # Too large for one entry.
    big = await proxy_factory(_settings(ref.url, cand.url, redis_url, max_copy_bytes=1024))
    await _infer(big.data_port, 3, size=400)
    await _infer(big.data_port, 4)
    tally = big.data[TELEMETRY].tally
    await _eventually(lambda: tally[("c", "streamed")] == 1, "the small copy streamed")
    assert tally[("c", "dropped_copy_too_large")] == 1
    # Redis away: the live answers are unchanged, each copy counted as dropped.
    dead = f"redis://127.0.0.1:{free_port()}/0"
    away = await proxy_factory(_settings(ref.url, cand.url, dead))
    for k in range(3):
        await _infer(away.data_port, k)
    tally = away.data[TELEMETRY].tally
    await _eventually(lambda: tally[("c", "dropped_redis_unreachable")] == 3, "three drops counted")
    assert cand.behaviour.calls == 0
