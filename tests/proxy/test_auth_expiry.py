"""Sessions end when their Redis record does, and a Flagger payload's wrong token is a failure.

``admin.session_ttl_s`` has a lower bound of 60 s, too long to wait for in a test: the session's
lifetime is its Redis record's TTL, so the tests check that TTL and then end the record (expire or
delete it) the way the TTL would.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from proxy.buffer.keys import KeySchema
from tests.conftest import ADMIN_TOKEN, make_settings, wait_until

TTL_S = 7200  # not the default (12 h): the record's TTL is the configured one


async def _session_proxy(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> str:
    """A proxy with ``session_ttl_s`` set; its admin plane's base URL."""
    admin = {"host": "127.0.0.1", "port": 0, "token": ADMIN_TOKEN, "session_ttl_s": TTL_S}
    proxy = await proxy_factory(make_settings((await fake()).url, redis_url, admin=admin))
    return f"http://127.0.0.1:{proxy.admin_port}"


async def _me(base: str, sid: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{base}/api/me", headers={"Cookie": f"sp_session={sid}"}) as r,
    ):
        return r.status, await r.json(content_type=None)


async def _login(base: str) -> str:
    """Log in with the admin token; the session id from the cookie."""
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{base}/login", json={"token": ADMIN_TOKEN}) as r,
    ):
        assert r.status == 200
        found = re.search(r"sp_session=([^;]+)", " ".join(r.headers.getall("Set-Cookie")))
        assert found is not None
        return found.group(1)


@pytest.mark.parametrize("end", ["expire", "delete"])
async def test_a_session_lives_session_ttl_s_in_redis_and_ends_with_its_record(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str, end: str
) -> None:
    base = await _session_proxy(fake, proxy_factory, redis_url)
    sid = await _login(base)
    key = KeySchema().session(sid)
    client = aioredis.Redis.from_url(redis_url)
    try:
        ttl_ms = await client.pttl(key)
        # Set with EX session_ttl_s at login: at most that, and only the moments since then less.
        assert (TTL_S - 60) * 1000 < ttl_ms <= TTL_S * 1000, ttl_ms
        status, body = await _me(base, sid)
        assert status == 200 and body["user"] == "admin" and body["role"] == "admin"
        # The TTL runs out (here: 1 ms from now), or the record is deleted (an operator, a
        # flush): the cookie is then worth nothing.
        if end == "expire":
            assert await client.pexpire(key, 1)
            await wait_until(lambda: _gone(client, key), what="the session record expired")
        else:
            assert await client.delete(key) == 1
        status, body = await _me(base, sid)
        assert status == 401 and "user" not in body, body
    finally:
        await client.aclose()


async def _gone(client: aioredis.Redis, key: str) -> bool:
    return not await client.exists(key)


async def test_a_wrong_token_in_a_flagger_payload_is_refused_and_counted(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await fake(), await fake()
    admin = {"host": "127.0.0.1", "port": 0, "token": ADMIN_TOKEN, "auth_failures_per_min": 1}
    settings = make_settings(
        ref.url,
        redis_url,
        admin=admin,
        candidates=[{"name": "cand", "url": cand.url}],
        canary={"candidate": "cand", "steps": [50, 100], "min_samples": 10, "interval_s": 0.05},
    )
    proxy = await proxy_factory(settings)
    url = f"http://127.0.0.1:{proxy.admin_port}/api/canary/flagger"
    payload = {"name": "m", "namespace": "ml", "phase": "Progressing"}
    async with aiohttp.ClientSession() as s:
        good = {**payload, "metadata": {"token": ADMIN_TOKEN}}
        async with s.post(url, json=good) as r:
            assert r.status == 425  # the right token: the rollout's evidence (too little yet)
        bad = {**payload, "metadata": {"token": "not-the-token-0123456789"}}
        async with s.post(url, json=bad) as r:
            assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
            body = await r.json()
            assert set(body) == {"error"}, body  # nothing of the rollout's evidence
        # That failure counted against the address (the limit here is one a minute): the right
        # token is now refused too, before it is looked at.
        async with s.post(url, json=good) as r:
            assert r.status == 429 and int(r.headers["Retry-After"]) > 0
