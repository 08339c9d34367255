"""Access to the admin plane: failures rate-limited per address, sessions that follow the config,
security headers on the review page, and a Secure cookie under TLS."""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.app import ProxyRunner
from tests.conftest import ADMIN_TOKEN, make_settings

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
RITA = "rita-token-0123456789"
VERA = "vera-token-0123456789"


def _admin_settings(ref: str, redis_url: str, **admin: Any) -> Any:
    base: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "token": ADMIN_TOKEN}
    return make_settings(ref, redis_url, admin={**base, **admin})


def _base(proxy: ProxyRunner, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{proxy.admin_port}"


async def _status(
    method: str, url: str, headers: dict[str, str] | None = None, **kw: Any
) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.request(method, url, headers=headers, **kw) as r:
        return r.status, r


async def _login(base: str, token: str, **kw: Any) -> tuple[int, dict[str, Any], list[str]]:
    """POST /login: (status, JSON body, the Set-Cookie header lines)."""
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{base}/login", json={"token": token}, **kw) as r,
    ):
        return r.status, await r.json(), r.headers.getall("Set-Cookie", [])


def _session(set_cookie: list[str]) -> dict[str, str]:
    sid = re.search(r"sp_session=([^;]+)", " ".join(set_cookie))
    assert sid is not None, set_cookie
    return {"Cookie": f"sp_session={sid.group(1)}"}


async def test_failures_from_one_address_are_limited_and_successes_never(
    fake: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ref = await fake()
    proxy = await proxy_factory(_admin_settings(ref.url, redis_url, auth_failures_per_min=5))
    base = _base(proxy)
    # Far more good requests than the limit, from this one address: never refused.
    async with aiohttp.ClientSession(headers=AUTH) as s:
        for _ in range(40):
            async with s.get(f"{base}/api/me") as r:
                assert r.status == 200
    status, _, cookie = await _login(base, ADMIN_TOKEN)
    assert status == 200
    session = _session(cookie)
    # Five failures: three bad bearer tokens, a bad login and a bad Flagger token.
    for _ in range(3):
        assert (await _status("GET", f"{base}/api/me", {"Authorization": "Bearer wrong"}))[0] == 401
    assert (await _login(base, "not-a-known-token-at-all"))[0] == 401
    flagger = {"name": "m", "metadata": {"token": "wrong"}}
    assert (await _status("POST", f"{base}/api/canary/flagger", json=flagger))[0] == 401
    # The sixth try is refused before its token is looked at, the right token included.
    async with aiohttp.ClientSession() as s:
        for headers in ({"Authorization": "Bearer wrong"}, AUTH):
            async with s.get(f"{base}/api/me", headers=headers) as r:
                assert r.status == 429
                assert 0 < int(r.headers["Retry-After"]) <= 60
                assert "too many failed" in (await r.json())["error"]
    status, body, _ = await _login(base, ADMIN_TOKEN)
    assert status == 429 and "error" in body
    assert "127.0.0.1 failed 5 token checks within a minute" in caplog.text
    # A browser already logged in is not locked out by someone else's guessing.
    status, r = await _status("GET", f"{base}/api/me", session)
    assert status == 200
    # Health checks need no token and are never refused.
    assert (await _status("GET", f"{base}/healthz"))[0] == 200


async def test_a_session_follows_the_users_in_the_current_config(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    """Sessions live in Redis; each proxy here is the same deployment with its config changed
    (and restarted), so a cookie made by one is presented to the next."""
    ref = await fake()
    users = [
        {"name": "rita", "token": RITA, "role": "reviewer"},
        {"name": "vera", "token": VERA, "role": "viewer"},
    ]
    first = await proxy_factory(_admin_settings(ref.url, redis_url, users=users))
    status, body, cookie = await _login(_base(first), RITA)
    assert status == 200 and body["role"] == "reviewer"
    rita = {**_session(cookie), "X-CSRF-Token": body["csrf"]}
    _, body, cookie = await _login(_base(first), VERA)
    vera = _session(cookie)

    async def me(proxy: ProxyRunner, session: dict[str, str]) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{_base(proxy)}/api/me", headers=session) as r,
        ):
            return r.status, await r.json()

    async def label(proxy: ProxyRunner) -> tuple[int, Any]:
        url = f"{_base(proxy)}/api/samples/nosuch/label"
        async with (
            aiohttp.ClientSession() as s,
            s.post(url, headers=rita, json={"verdict": "regression"}) as r,
        ):
            return r.status, await r.json()

    assert (await me(first, rita))[1]["role"] == "reviewer"
    # Allowed to label; there is merely no such sample, and the answer says so. Labelling it
    # wrote nothing: no sample hash made of a label alone, no entry in the labels hash.
    status, body = await label(first)
    assert status == 404 and body["error"] == "no sample 'nosuch' (unknown or expired)", body
    keys = first.store.keys
    redis = first.store.redis
    assert not await redis.exists(keys.sample("nosuch"))
    assert not await redis.hexists(keys.labels, "nosuch")
    await first.stop()

    # rita demoted to viewer: the same session now reads only.
    users[0]["role"] = "viewer"
    demoted = await proxy_factory(_admin_settings(ref.url, redis_url, users=users))
    status, body = await me(demoted, rita)
    assert status == 200 and body["user"] == "rita" and body["role"] == "viewer"
    status, body = await label(demoted)
    assert status == 403 and "rita is a viewer" in body["error"], body
    await demoted.stop()

    # rita's token replaced, vera removed: both sessions are over, for good.
    changed = [{"name": "rita", "token": "rita-new-token-0123456789", "role": "reviewer"}]
    rotated = await proxy_factory(_admin_settings(ref.url, redis_url, users=changed))
    assert (await me(rotated, rita))[0] == 401
    assert (await me(rotated, vera))[0] == 401
    await rotated.stop()
    restored = await proxy_factory(_admin_settings(ref.url, redis_url, users=users))
    assert (await me(restored, rita))[0] == 401  # deleted when refused: the old token revives none


async def test_review_page_and_assets_send_csp_and_nosniff(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref = await fake()
    proxy = await proxy_factory(_admin_settings(ref.url, redis_url))
    base = _base(proxy)
    for path, headers, code in (
        ("/review", AUTH, 200),
        ("/review", {}, 401),  # the login page, in place of the review page
        ("/login", {}, 200),
        ("/static/review.js", {}, 200),
        ("/static/builds.js", {}, 200),
        ("/static/review.css", {}, 200),
        ("/api/samples", AUTH, 200),
    ):
        status, r = await _status("GET", base + path, headers)
        assert status == code, path
        csp = r.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert "unsafe-inline" not in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff", path
        assert r.headers["X-Frame-Options"] == "DENY", path


def test_the_pages_need_no_inline_script_or_style() -> None:
    """What the CSP above forbids, the pages must not use, or the browser would block it."""
    static = resources.files("proxy.review").joinpath("static")
    for page in ("review.html", "login.html"):
        html = static.joinpath(page).read_text(encoding="utf-8")
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), page
        assert "<style" not in html and not re.search(r"\sstyle=", html), page
        assert not re.search(r"\son[a-z]+=", html), page
        assert "javascript:" not in html, page
        srcs = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert all(s.startswith("/static/") or s == "data:," for s in srcs), (page, srcs)


async def test_the_cookie_is_secure_under_tls_or_when_told(
    fake: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    self_signed: tuple[Path, Path],
) -> None:
    ref = await fake()
    cert, key = self_signed
    tls = await proxy_factory(
        _admin_settings(ref.url, redis_url, tls_cert=str(cert), tls_key=str(key))
    )
    trust = ssl.create_default_context(cafile=str(cert))
    status, _, cookie = await _login(_base(tls, "https"), ADMIN_TOKEN, ssl=trust)
    assert status == 200
    attrs = {a.strip().lower() for a in cookie[0].split(";")[1:]}
    assert {"secure", "httponly", "samesite=strict"} <= attrs
    with pytest.raises(aiohttp.ClientError):  # no plain HTTP beside it
        await _login(_base(tls), ADMIN_TOKEN)

    behind = await proxy_factory(_admin_settings(ref.url, redis_url, secure_cookies=True))
    _, _, cookie = await _login(_base(behind), ADMIN_TOKEN)
    assert "secure" in {a.strip().lower() for a in cookie[0].split(";")[1:]}

    plain = await proxy_factory(_admin_settings(ref.url, redis_url))
    _, _, cookie = await _login(_base(plain), ADMIN_TOKEN)
    assert "secure" not in {a.strip().lower() for a in cookie[0].split(";")[1:]}
