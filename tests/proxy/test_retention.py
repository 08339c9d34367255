"""Retention: labelled samples live ``labelled_ttl_s``, not forever; a sample can be deleted (admin
only); trimming an index never leaves a sample behind that no index names."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from proxy.buffer.keys import KeySchema
from proxy.buffer.store import SampleStore
from proxy.settings import BufferSettings
from tests.conftest import ADMIN_TOKEN, make_settings, send_infers

USERS = [{"name": "rita", "token": "reviewer-token-0123456", "role": "reviewer"}]


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url)
    yield c
    await c.aclose()


def _record(flagged: bool = True) -> tuple[dict[str, Any], dict[str, bytes]]:
    meta = {
        "id": uuid.uuid4().hex,
        "ts": time.time(),
        "request_id": "r",
        "candidate": "c",
        "model": "m",
        "outcome": "compared",
        "flagged": flagged,
        "severity": 1.0,
        "reason": "",
        "outputs": [],
    }
    return meta, {"request": b"{}"}


async def test_a_label_keeps_the_sample_for_the_labelled_ttl_not_forever(
    redis_url: str, client: aioredis.Redis
) -> None:
    settings = BufferSettings(sample_ttl_s=600, labelled_ttl_s=90 * 24 * 3600)
    store = SampleStore.from_url(redis_url, settings, spool=False)
    try:
        meta, payloads = _record()
        await store.record(meta, payloads)
        key = store.keys.sample(meta["id"])
        assert 0 < await client.ttl(key) <= 600
        await store.label(meta["id"], "regression", "", "rita")
        assert 600 < await client.ttl(key) <= settings.labelled_ttl_s
    finally:
        await store.close()


async def test_trimming_an_index_never_orphans_a_sample_and_keeps_labelled_ones(
    redis_url: str, client: aioredis.Redis
) -> None:
    settings = BufferSettings(flagged_index_max=100)
    store = SampleStore.from_url(redis_url, settings, spool=False)
    keys = KeySchema()
    try:
        oldest = [_record() for _ in range(3)]
        await store.record_many(list(oldest))
        for meta, _ in oldest[:2]:
            await store.label(meta["id"], "regression", "keep me", "rita")
        await store.record_many([_record() for _ in range(107)])  # 110 flagged in all
        await store.record_many([_record(flagged=False) for _ in range(105)])  # kept for context
        flagged = {i.decode() for i in await client.zrange(keys.flagged, 0, -1)}
        kept = {i.decode() for i in await client.zrange(keys.kept, 0, -1)}
        samples = {
            k.decode().rsplit(":", 1)[1].strip("{}")  # the id is the key's hash tag
            async for k in client.scan_iter(match=keys.sample("*"), count=500)
        }
    finally:
        await store.close()
    assert len(flagged) == 100 and len(kept) == 100
    assert {m["id"] for m, _ in oldest[:2]} <= flagged  # labelled: never trimmed
    assert oldest[2][0]["id"] not in flagged
    assert samples == flagged | kept  # every sample is in an index, every index entry a sample


async def test_delete_removes_a_sample_and_its_label_for_admins_only(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, drifted = await fake(), await fake(drift=1.0)
    admin = {"host": "127.0.0.1", "port": 0, "token": ADMIN_TOKEN, "users": USERS}
    proxy = await proxy_factory(
        make_settings(
            ref.url, redis_url, candidates=[{"name": "c", "url": drifted.url}], admin=admin
        )
    )
    await send_infers(proxy, ["d-0", "d-1"])
    first, second = await proxy.store.list_samples(flagged=True)
    await proxy.store.label(first["id"], "regression", "", "rita")
    base = f"http://127.0.0.1:{proxy.admin_port}"
    url = f"{base}/api/samples/{first['id']}"
    reviewer = {"Authorization": "Bearer reviewer-token-0123456"}
    async with aiohttp.ClientSession(headers=reviewer) as s, s.delete(url) as r:
        assert r.status == 403  # a reviewer labels, but only an admin deletes
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        async with s.post(f"{base}/login", json={"token": ADMIN_TOKEN}) as r:
            csrf = (await r.json())["csrf"]
        async with s.delete(url) as r:
            assert r.status == 403  # a browser session must prove it is not a forged request
        async with s.delete(url, headers={"X-CSRF-Token": csrf}) as r:
            assert r.status == 200 and (await r.json()) == {"deleted": first["id"]}
        async with s.delete(url, headers={"X-CSRF-Token": csrf}) as r:
            assert r.status == 404
        async with s.get(url) as r:
            assert r.status == 404
        async with s.get(f"{base}/api/samples?flagged=1&label=regression") as r:
            assert await r.json() == []
        async with s.get(f"{base}/api/samples?flagged=1") as r:
            assert [i["id"] for i in await r.json()] == [second["id"]]
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert not await client.hexists(proxy.store.keys.labels, first["id"])
        assert await client.exists(proxy.store.keys.sample(second["id"]))
    finally:
        await client.aclose()
