"""SIGTERM under load: no live request lost, the mirror queue drained into Redis, exit 0; copies
a candidate never answers end with the drain timeout, and every process with them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from loadtest.procs import descendants, free_port
from tests.conftest import ADMIN_TOKEN, finish, serve_process, wait_until

REQUESTS = 24


def _config(
    data_port: int, ref_url: str, cand_url: str, redis_url: str, *, drain_s: float
) -> dict[str, Any]:
    """A proxy with one candidate, its live port ``data_port``, draining for ``drain_s``."""
    return {
        "listen": {"host": "127.0.0.1", "port": data_port},
        "admin": {"host": "127.0.0.1", "port": free_port(), "token": ADMIN_TOKEN},
        "reference": {"name": "ref", "url": ref_url},
        "candidates": [{"name": "c", "url": cand_url}],
        "buffer": {"redis_url": redis_url},
        "proxy": {"drain_timeout_s": drain_s, "shed_lag_ms": 0},
    }


async def test_sigterm_finishes_live_requests_and_drains_copies(
    fake: Callable[..., Any], redis_url: str, tmp_path: Path
) -> None:
    # A slow reference keeps every request in flight when the signal lands; the candidate
    # diverges on every copy, so each drained copy leaves one flagged sample behind.
    ref, cand = await fake(delay_s=0.6), await fake(drift=1.0, delay_s=0.3)
    data_port = free_port()
    config = _config(data_port, ref.url, cand.url, redis_url, drain_s=20)
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


def _running(pids: list[int]) -> list[int]:
    """The processes among ``pids`` that still run (a zombie has ended: it only awaits reaping)."""
    out = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2] != "Z":
            out.append(pid)
    return out


async def test_sigterm_with_copies_held_ends_every_process_long_before_the_hard_kill(
    fake: Callable[..., Any], redis_url: str, tmp_path: Path
) -> None:
    """Copies a candidate never answers hold the mirror worker for the drain timeout at most:
    then it cancels them and exits with its compare workers, so the live process's hard kill
    (2 * drain_timeout_s + 10 s, proxy/shadow/mirror_link.py) is never what ends them."""
    drain = 1
    hard_kill = 2 * drain + 10
    ref, cand = await fake(), await fake(drift=1.0)
    cand.behaviour.hold = asyncio.Event()  # the copies reach the candidate, never answered
    data_port = free_port()
    config = _config(data_port, ref.url, cand.url, redis_url, drain_s=drain)
    try:
        async with serve_process(config, tmp_path / "c.yaml") as proc:
            url = f"http://127.0.0.1:{data_port}/v2/models/m/infer"
            async with aiohttp.ClientSession() as s:
                for k in range(4):
                    body = (
                        f'{{"inputs":[{{"name":"x","datatype":"FP32","shape":[1],"data":[{k}]}}]}}'
                    )
                    async with s.post(url, data=body.encode()) as r:
                        assert r.status == 200  # the reference answers; the copy goes on
            await wait_until(lambda: cand.behaviour.in_flight == 4, what="four copies held")
            tree = descendants(proc.pid)
            assert len(tree) >= 2, "a mirror worker and its compare worker(s)"
            loop = asyncio.get_running_loop()
            signalled = loop.time()
            stopping = asyncio.create_task(finish(proc))
            await wait_until(
                lambda: not _running([proc.pid, *tree]),
                timeout_s=hard_kill + 5,
                interval_s=0.05,
                what="the proxy and every process it started ended",
            )
            ended = loop.time() - signalled
            output = await stopping
    finally:
        cand.behaviour.hold.set()
    assert proc.returncode == 0, output
    # The drain timeout, then the exits: well before the hard kill at 12 s.
    assert ended < hard_kill / 2, (ended, output)
