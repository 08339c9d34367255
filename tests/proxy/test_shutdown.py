"""SIGTERM under load: no live request lost, the mirror queue drained into Redis, exit 0."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from loadtest.procs import free_port
from tests.conftest import ADMIN_TOKEN, finish, serve_process, wait_until

REQUESTS = 24


async def test_sigterm_finishes_live_requests_and_drains_copies(
    fake: Callable[..., Any], redis_url: str, tmp_path: Path
) -> None:
    # A slow reference keeps every request in flight when the signal lands; the candidate
    # diverges on every copy, so each drained copy leaves one flagged sample behind.
    ref, cand = await fake(delay_s=0.6), await fake(drift=1.0, delay_s=0.3)
    data_port = free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": data_port},
        "admin": {"host": "127.0.0.1", "port": free_port(), "token": ADMIN_TOKEN},
        "reference": {"name": "ref", "url": ref.url},
        "candidates": [{"name": "c", "url": cand.url}],
        "buffer": {"redis_url": redis_url},
        "proxy": {"drain_timeout_s": 20, "shed_lag_ms": 0},
    }
    async with serve_process(config, tmp_path / "c.yaml") as proc:
        url = f"http://127.0.0.1:{data_port}/v2/models/m/infer"
        async with aiohttp.ClientSession() as s:

            async def infer(k: int) -> tuple[int, bytes]:
                body = f'{{"inputs":[{{"name":"x","datatype":"FP32","shape":[1],"data":[{k}]}}]}}'
                # Half as plain requests (the fast lane), half chunked (handed to aiohttp).
                data: Any = body.encode() if k % 2 else _chunks(body.encode())
                async with s.post(url, data=data) as r:
                    return r.status, await r.read()

            calls = [asyncio.create_task(infer(k)) for k in range(REQUESTS)]
            await wait_until(lambda: ref.behaviour.in_flight == REQUESTS, 20, what="in flight")
            stopping = asyncio.create_task(finish(proc))
            answers = await asyncio.gather(*calls)
        assert [status for status, _ in answers] == [200] * REQUESTS
        assert all(b'"outputs"' in body for _, body in answers)
        output = await stopping
    assert proc.returncode == 0, output
    assert cand.behaviour.calls == REQUESTS  # every copy was sent before the exit
    client = aioredis.Redis.from_url(redis_url)
    try:
        (index,) = [k async for k in client.scan_iter(match="*:flagged")]
        flagged = await client.zcard(index)
        samples = [k async for k in client.scan_iter(match="*:sample:*", count=1000)]
    finally:
        await client.aclose()
    assert flagged == len(samples) == REQUESTS, output


async def _chunks(body: bytes) -> Any:
    yield body[:10]
    yield body[10:]
