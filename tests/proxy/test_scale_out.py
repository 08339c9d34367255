"""Many replicas as one system: two live proxies append copies to the Redis stream, three
``shadowproxy worker`` processes compare them; one worker is SIGKILLed holding copies, the others
claim them; every copy is compared exactly once and both proxies show the same summary, before
and after a restart."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from loadtest.procs import free_port
from proxy.buffer.keys import COPIES_GROUP, KeySchema
from tests.conftest import ADMIN_TOKEN, finish, serve_process

REQUESTS = 60
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _config(ref_url: str, cand_url: str, redis_url: str) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port(), "token": ADMIN_TOKEN},
        "reference": {"name": "ref", "url": ref_url},
        "candidates": [{"name": "c", "url": cand_url, "max_in_flight": 8}],
        "buffer": {"redis_url": redis_url, "copies_claim_idle_s": 2},
        "proxy": {"compare": "redis", "shed_lag_ms": 0, "drain_timeout_s": 5},
    }


async def _summary(port: int) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession(headers=AUTH) as s,
        s.get(f"http://127.0.0.1:{port}/api/summary") as r,
    ):
        assert r.status == 200
        rows: list[dict[str, Any]] = (await r.json())["population"]
        return rows


async def _post(s: aiohttp.ClientSession, port: int, k: int) -> None:
    body = f'{{"inputs":[{{"name":"x","datatype":"FP32","shape":[1],"data":[{k}]}}]}}'
    async with s.post(
        f"http://127.0.0.1:{port}/v2/models/m/infer",
        data=body.encode(),
        headers={"X-Request-Id": f"r{k:03d}"},
    ) as r:
        assert r.status == 200
        await r.read()


async def test_two_proxies_three_workers_one_killed(
    fake: Callable[..., Any], redis_url: str, tmp_path: Path
) -> None:
    # The candidate diverges on every copy (each leaves a flagged sample) and answers slowly, so
    # a worker holds copies in flight when it is killed.
    ref, cand = await fake(), await fake(drift=0.5, delay_s=0.3)
    proxies = [_config(ref.url, cand.url, redis_url) for _ in range(2)]
    workers = [_config(ref.url, cand.url, redis_url) for _ in range(3)]
    keys = KeySchema()
    client = aioredis.Redis.from_url(redis_url)
    async with (
        serve_process(proxies[0], tmp_path / "p0.yaml") as p0,
        serve_process(proxies[1], tmp_path / "p1.yaml") as p1,
        serve_process(workers[0], tmp_path / "w0.yaml", command="worker") as w0,
        serve_process(workers[1], tmp_path / "w1.yaml", command="worker"),
        serve_process(workers[2], tmp_path / "w2.yaml", command="worker"),
    ):
        async with aiohttp.ClientSession() as s:
            # Through both proxies, ten at a time.
            for start in range(0, REQUESTS // 2, 10):
                await asyncio.gather(
                    *(
                        _post(s, proxies[k % 2]["listen"]["port"], k)
                        for k in range(start, start + 10)
                    )
                )

            # Kill the first worker while it holds copies it has not acknowledged.
            async def held_by_w0() -> int:
                consumers = await client.xinfo_consumers(keys.copies, COPIES_GROUP)
                return sum(
                    c["pending"] for c in consumers if c["name"].decode().endswith(str(w0.pid))
                )

            pending = 0
            sent = REQUESTS // 2
            for _ in range(100):
                pending = await held_by_w0()
                if pending:
                    break
                await _post(s, proxies[0]["listen"]["port"], REQUESTS // 2)
                sent += 1
                await asyncio.sleep(0.01)
            w0.send_signal(signal.SIGKILL)
            await w0.wait()
            assert pending > 0, "the killed worker held no pending copies"
            await asyncio.gather(
                *(
                    _post(s, proxies[k % 2]["listen"]["port"], k)
                    for k in range(REQUESTS // 2 + 1, REQUESTS)
                )
            )
            sent += REQUESTS // 2 - 1
        streamed = sent  # every request sampled (sample_rate 1), one entry each

        async def all_compared() -> bool:
            # Workers delete what they finished: an empty stream with nothing pending, and a
            # sample for every copy sent.
            backlog = await client.xlen(keys.copies)
            info = await client.xpending(keys.copies, COPIES_GROUP)
            stored = await client.zcard(keys.flagged)
            return bool(backlog == 0 and info["pending"] == 0 and stored >= streamed)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not await all_compared():
            assert loop.time() < deadline, await client.xpending(keys.copies, COPIES_GROUP)
            await asyncio.sleep(0.25)
        # Exactly once: one flagged sample per copy, none twice.
        ids = await client.zrange(keys.flagged, 0, -1)
        request_ids: Counter[str] = Counter()
        for sid in ids:
            meta = await client.hget(keys.sample(sid.decode()), "summary")
            assert meta is not None
            request_ids[json.loads(meta)["request_id"]] += 1
        assert len(ids) == streamed
        assert max(request_ids.values()) == 1
        print(f"killed worker held {pending} pending copies; all claimed by the others")

        # Both proxies show the same population, from Redis.
        await asyncio.sleep(2.5)  # the workers add their statistics every second
        first = await _summary(proxies[0]["admin"]["port"])
        second = await _summary(proxies[1]["admin"]["port"])
        assert first == second
        assert sum(r["samples"] for r in first) == streamed
        for proc in (p0, p1):
            await finish(proc)
    # ...and after both restart.
    async with (
        serve_process(proxies[0], tmp_path / "p0.yaml"),
        serve_process(proxies[1], tmp_path / "p1.yaml"),
    ):
        assert await _summary(proxies[0]["admin"]["port"]) == first
        assert await _summary(proxies[1]["admin"]["port"]) == first
    await client.aclose()
