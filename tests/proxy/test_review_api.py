"""The review API: logins, roles, CSRF, filters and sorting, tensors for plots, labels that last."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from tests.conftest import ADMIN_TOKEN, make_settings, send_infers

USERS = [
    {"name": "vera", "token": "viewer-token-0123456", "role": "viewer"},
    {"name": "rita", "token": "reviewer-token-0123456", "role": "reviewer"},
]


async def _setup(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> Any:
    ref, small, big = await fake(), await fake(drift=0.01), await fake(drift=1.0)
    candidates = [{"name": "small", "url": small.url}, {"name": "big", "url": big.url}]
    admin = {"host": "127.0.0.1", "port": 0, "token": ADMIN_TOKEN, "users": USERS}
    proxy = await proxy_factory(
        make_settings(ref.url, redis_url, candidates=candidates, admin=admin)
    )
    await send_infers(proxy, ["r0", "r1", "r2"])
    return proxy


async def _login(s: aiohttp.ClientSession, base: str, token: str) -> str:
    async with s.post(f"{base}/login", json={"token": token}) as r:
        assert r.status == 200
        return str((await r.json())["csrf"])


async def test_browser_login_roles_and_csrf(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    proxy = await _setup(fake, proxy_factory, redis_url)
    base = f"http://127.0.0.1:{proxy.admin_port}"
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for a bare IP host
    async with aiohttp.ClientSession(cookie_jar=jar) as s:
        async with s.get(f"{base}/review") as r:
            assert r.status == 401 and "<form" in await r.text()  # the way in, and no data
        async with s.get(f"{base}/api/samples?flagged=1") as r:
            assert r.status == 401
        async with s.post(f"{base}/login", json={"token": "nope"}) as r:
            assert r.status == 401
        csrf = await _login(s, base, "reviewer-token-0123456")
        cookie = next(c for c in jar if c.key == "sp_session")
        assert cookie["httponly"] and cookie["samesite"] == "Strict"
        async with s.get(f"{base}/review") as r:
            assert r.status == 200
        async with s.get(f"{base}/api/me") as r:
            assert await r.json() == {"user": "rita", "role": "reviewer", "csrf": csrf}
        async with s.get(f"{base}/api/samples?flagged=1") as r:
            sid = (await r.json())[0]["id"]
        label_url = f"{base}/api/samples/{sid}/label"
        async with s.post(label_url, json={"verdict": "regression"}) as r:
            assert r.status == 403 and "X-CSRF-Token" in (await r.json())["error"]
        async with s.post(
            label_url, json={"verdict": "regression"}, headers={"X-CSRF-Token": "forged"}
        ) as r:
            assert r.status == 403
        async with s.post(
            label_url,
            json={"verdict": "regression", "note": "drifted"},
            headers={"X-CSRF-Token": csrf},
        ) as r:
            assert r.status == 200
            label = await r.json()
        assert label["by"] == "rita" and label["verdict"] == "regression" and label["at"] > 0
        async with s.post(f"{base}/logout", headers={"X-CSRF-Token": csrf}) as r:
            assert r.status == 200
        async with s.get(f"{base}/api/me") as r:
            assert r.status == 401
    # A viewer reads but cannot label; nobody may change what their role does not allow.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        csrf = await _login(s, base, "viewer-token-0123456")
        async with s.get(f"{base}/api/samples/{sid}") as r:
            assert r.status == 200 and (await r.json())["label"]["by"] == "rita"
        async with s.post(
            label_url, json={"verdict": "acceptable"}, headers={"X-CSRF-Token": csrf}
        ) as r:
            assert r.status == 403 and "viewer" in (await r.json())["error"]
    # Scripts use bearer tokens (no cookie, so no CSRF needed); the user's name is recorded.
    bearer = {"Authorization": "Bearer reviewer-token-0123456"}
    async with (
        aiohttp.ClientSession(headers=bearer) as s,
        s.post(label_url, json={"verdict": "needs-look"}) as r,
    ):
        assert r.status == 200 and (await r.json())["by"] == "rita"


async def test_filters_sorting_paging_tensors_and_timeseries(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    proxy = await _setup(fake, proxy_factory, redis_url)
    base = f"http://127.0.0.1:{proxy.admin_port}"
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(headers=auth) as s:

        async def get(query: str) -> tuple[list[dict[str, Any]], int]:
            async with s.get(f"{base}/api/samples?flagged=1&{query}") as r:
                assert r.status == 200, await r.text()
                return await r.json(), int(r.headers["X-Total-Count"])

        items, total = await get("sort=severity")
        assert total == 6 and [i["candidate"] for i in items[:3]] == ["big"] * 3
        assert items[0]["severity"] >= items[-1]["severity"]
        assert (await get("candidate=small"))[1] == 3
        assert (await get("model=m&output=scores&metric=tolerance"))[1] == 6
        assert (await get("metric=cosine"))[1] == 0
        cut = (items[2]["severity"] + items[3]["severity"]) / 2
        assert {i["candidate"] for i in (await get(f"min_severity={cut}"))[0]} == {"big"}
        page, total = await get("sort=severity&limit=2&offset=2")
        assert total == 6 and [p["id"] for p in page] == [i["id"] for i in items[2:4]]
        assert (await get("since=0&until=1"))[1] == 0
        async with s.post(
            f"{base}/api/samples/{items[0]['id']}/label", json={"verdict": "acceptable"}
        ) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["verdict"] == "acceptable"
        assert [i["id"] for i in (await get("label=acceptable"))[0]] == [items[0]["id"]]
        assert (await get("label=none"))[1] == 5
        async with s.get(f"{base}/api/samples?flagged=1&sort=nope") as r:
            assert r.status == 400 and "sort" in (await r.json())["error"]
        async with s.get(f"{base}/api/samples/{items[0]['id']}/tensors") as r:
            tensors = (await r.json())["outputs"]["scores"]
        assert tensors["kind"] == "dense" and tensors["metric"] == "tolerance"
        assert tensors["reference"]["shape"] == [1, 8] and len(tensors["candidate"]["values"]) == 8
        diff = tensors["candidate"]["values"][0] - tensors["reference"]["values"][0]
        assert abs(diff - 1.0) < 1e-5  # the "big" candidate drifts by 1.0
        async with s.get(f"{base}/api/timeseries?bucket_s=60") as r:
            series = {x["candidate"]: x for x in (await r.json())["series"]}
        assert sum(p["n"] for p in series["big"]["points"]) == 3
        assert sum(p["flagged"] for p in series["small"]["points"]) == 3


async def test_labelled_samples_outlive_the_sample_ttl_until_exported(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    proxy = await _setup(fake, proxy_factory, redis_url)
    items = await proxy.store.list_samples(flagged=True)
    client = aioredis.Redis.from_url(redis_url)
    try:
        key = proxy.store.keys.sample(items[0]["id"])
        assert await client.ttl(key) > 0
        await proxy.store.label(items[0]["id"], "regression", "", "rita")
        # Past the sample TTL while it waits to be exported, but not forever.
        assert proxy.settings.buffer.sample_ttl_s < await client.ttl(key)
        assert await client.ttl(key) <= proxy.settings.buffer.labelled_ttl_s
        await proxy.store.mark_exported([items[0]["id"]])
        assert await client.ttl(key) > 0
    finally:
        await client.aclose()


async def test_most_severe_first_is_on_one_scale_across_metrics(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    """A tolerance verdict twenty times its tolerance no longer outranks a cosine verdict fifty
    times its threshold because its raw number is larger; the A/A p-value breaks ties."""
    ref = await fake()
    proxy = await proxy_factory(make_settings(ref.url, redis_url))

    def meta(name: str, candidate: str, metric: str, raw: float, norm: float, **kw: Any) -> Any:
        out = {"output": "y", "metric": metric, "severity": raw, "severity_norm": norm}
        return {
            "id": name,
            "ts": time.time(),
            "request_id": name,
            "candidate": candidate,
            "model": "m",
            "outcome": "compared",
            "flagged": True,
            "severity": raw,
            "severity_norm": norm,
            "reason": "",
            "outputs": [{**out, "flagged": True}],
            **kw,
        }

    for m in (
        meta("tol", "distilled", "tolerance", 20.0, 20.0),
        meta("cos-far", "int8", "cosine", 0.05, 50.0),
        meta("cos-noisy", "int8", "cosine", 0.01, 10.0, noise_p=0.5),
        meta("cos-clear", "int8", "cosine", 0.01, 10.0, noise_p=0.01),
    ):
        await proxy.store.record(m, {"request": b"{}"})
    base = f"http://127.0.0.1:{proxy.admin_port}/api/samples?flagged=1"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as s:

        async def ids(query: str) -> list[str]:
            async with s.get(f"{base}&{query}") as r:
                assert r.status == 200, await r.text()
                return [i["id"] for i in await r.json()]

        assert await ids("sort=severity") == ["cos-far", "tol", "cos-clear", "cos-noisy"]
        assert (await ids("sort=severity&scale=raw"))[0] == "tol"
        assert sorted(await ids("min_severity=15")) == ["cos-far", "tol"]
        assert await ids("min_severity=15&scale=raw") == ["tol"]
        async with s.get(f"{base}&sort=severity&scale=log") as r:
            assert r.status == 400 and "scale" in (await r.json())["error"]
