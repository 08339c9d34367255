"""Access at its edges: roles on admin-only routes, logout and CSRF, login with Redis down."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import ADMIN_TOKEN, make_settings
from tests.fakes import refused_url
from tests.proxy.test_review_api import USERS, _login

NO_CANARY = "no canary is configured"
# Each admin-only route, and what it answers the admin here: no such sample, no canary configured.
ADMIN_ONLY = [
    ("DELETE", "/api/samples/some-id", "no sample 'some-id' (unknown or expired)"),
    ("POST", "/api/canary/pause", NO_CANARY),
    ("POST", "/api/canary/abort", NO_CANARY),
]


async def _proxy(fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis: str) -> Any:
    ref = await fake()
    admin = {"host": "127.0.0.1", "port": 0, "token": ADMIN_TOKEN, "users": USERS}
    return await proxy_factory(make_settings(ref.url, redis, admin=admin))


@pytest.mark.parametrize(("method", "path", "admin_error"), ADMIN_ONLY)
async def test_viewers_and_reviewers_get_403_on_admin_only_routes(
    fake: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    method: str,
    path: str,
    admin_error: str,
) -> None:
    proxy = await _proxy(fake, proxy_factory, redis_url)
    url = f"http://127.0.0.1:{proxy.admin_port}{path}"
    async with aiohttp.ClientSession() as s:
        for user in USERS:
            bearer = {"Authorization": f"Bearer {user['token']}"}
            async with s.request(method, url, headers=bearer) as r:
                assert r.status == 403, (user["name"], path)
                error = (await r.json())["error"]
                assert f"{user['name']} is a {user['role']}" in error and "admin role" in error
        # The admin passes the same check and meets the route itself, which answers for its
        # own reason (no such sample, no canary here): an unregistered route would answer a
        # 404 without that JSON error.
        async with s.request(method, url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            assert r.status == 404, await r.text()
            assert admin_error in (await r.json())["error"]


async def test_a_session_is_not_logged_out_without_its_csrf_token(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    proxy = await _proxy(fake, proxy_factory, redis_url)
    base = f"http://127.0.0.1:{proxy.admin_port}"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        csrf = await _login(s, base, "viewer-token-0123456")
        # A cross-site form could post /logout with the cookie, never with the token.
        async with s.post(f"{base}/logout") as r:
            assert r.status == 403 and "X-CSRF-Token" in (await r.json())["error"]
        async with s.get(f"{base}/api/me") as r:
            assert r.status == 200 and (await r.json())["user"] == "vera"  # still logged in
        async with s.post(f"{base}/logout", headers={"X-CSRF-Token": csrf}) as r:
            assert r.status == 200
        async with s.get(f"{base}/api/me") as r:
            assert r.status == 401


async def test_login_with_redis_down_is_a_503_and_bearer_tokens_still_work(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any]
) -> None:
    dead_redis = refused_url().replace("http", "redis") + "/0"
    proxy = await _proxy(fake, proxy_factory, dead_redis)
    base = f"http://127.0.0.1:{proxy.admin_port}"
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/login", json={"token": "reviewer-token-0123456"}) as r:
            assert r.status == 503 and "Redis" in (await r.json())["error"]
            assert "Set-Cookie" not in r.headers
        bearer = {"Authorization": "Bearer reviewer-token-0123456"}
        async with s.get(f"{base}/api/me", headers=bearer) as r:
            assert r.status == 200 and (await r.json())["role"] == "reviewer"
