"""The admin plane: token enforced, samples API, summary, metrics, readiness."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp

from loadtest.procs import free_port
from tests.conftest import ADMIN_TOKEN, make_settings, send_infers
from tests.fakes import refused_url

BODY = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,2],"data":[1,2]}]}'
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers or {}) as r:
        ctype = r.headers.get("Content-Type", "")
        return r.status, (await r.json() if "json" in ctype else await r.text())


async def test_every_route_but_health_needs_the_token(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref = await fake()
    proxy = await proxy_factory(make_settings(ref.url, redis_url))
    base = f"http://127.0.0.1:{proxy.admin_port}"
    for path in ("/metrics", "/api/samples", "/api/samples/x", "/api/summary", "/review"):
        assert (await _get(base + path))[0] == 401, path
        assert (await _get(base + path, {"Authorization": "Bearer wrong"}))[0] == 401, path
    # With the token each route answers as itself: a route that is not registered at all would
    # answer aiohttp's plain-text 404, which none of these checks accept.
    status, text = await _get(base + "/metrics", AUTH)
    assert status == 200 and text.startswith("# HELP shadowproxy_")  # Prometheus text
    assert await _get(base + "/api/samples", AUTH) == (200, [])  # a clean database
    status, body = await _get(base + "/api/samples/x", AUTH)
    assert status == 404 and "no sample 'x'" in body["error"]  # the route's own JSON answer
    status, body = await _get(base + "/api/summary", AUTH)
    assert status == 200 and "this_process" in body and "coverage" in body
    status, text = await _get(base + "/review", AUTH)
    assert status == 200 and "<title>shadowproxy review</title>" in text
    assert (await _get(base + "/healthz"))[0] == 200
    status, body = await _get(base + "/readyz")
    assert status == 200 and body["checks"] == {"reference": "ok", "redis": "ok"}


async def test_readyz_names_what_is_down(proxy_factory: Callable[..., Any], redis_url: str) -> None:
    proxy = await proxy_factory(make_settings(refused_url(), redis_url))
    status, body = await _get(f"http://127.0.0.1:{proxy.admin_port}/readyz")
    assert status == 503 and body["checks"]["reference"].startswith("unreachable")
    assert body["checks"]["redis"] == "ok"


async def test_readyz_stays_ready_while_redis_is_away(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any]
) -> None:
    """The live path does not need Redis: a Redis outage must not empty the Service."""
    ref = await fake()
    proxy = await proxy_factory(make_settings(ref.url, f"redis://127.0.0.1:{free_port()}/0"))
    status, body = await _get(f"http://127.0.0.1:{proxy.admin_port}/readyz")
    assert status == 200 and body["checks"] == {"reference": "ok", "redis": "unreachable"}


async def test_flagged_samples_api_summary_label_and_metrics(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, drifted = await fake(), await fake(drift=0.5)
    proxy = await proxy_factory(
        make_settings(ref.url, redis_url, candidates=[{"name": "int8", "url": drifted.url}])
    )
    await send_infers(proxy, ["r0", "r1", "r2"])
    base = f"http://127.0.0.1:{proxy.admin_port}"
    status, items = await _get(f"{base}/api/samples?flagged=1&candidate=int8&limit=2", AUTH)
    assert status == 200 and len(items) == 2
    ids = {i["request_id"] for i in items}
    assert len(ids) == 2 and ids <= {"r0", "r1", "r2"}  # two different samples, not one twice
    assert all(i["flagged"] and i["candidate"] == "int8" for i in items)
    assert await _get(f"{base}/api/samples?flagged=1&candidate=nobody", AUTH) == (200, [])
    assert (await _get(f"{base}/api/samples?limit=abc", AUTH))[0] == 400
    status, sample = await _get(f"{base}/api/samples/{items[0]['id']}", AUTH)
    assert status == 200 and sample["payloads"]["request"]["json"]["inputs"][0]["name"] == "x"
    assert sample["outputs"][0]["output"] == "scores" and sample["outputs"][0]["flagged"]
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async with s.post(
            f"{base}/api/samples/{items[0]['id']}/label",
            json={"verdict": "regression", "note": "bad"},
        ) as r:
            assert r.status == 200
        async with s.post(
            f"{base}/api/samples/{items[0]['id']}/label", json={"verdict": "meh"}
        ) as r:
            assert r.status == 400
    status, sample = await _get(f"{base}/api/samples/{items[0]['id']}", AUTH)
    assert status == 200 and sample["label"]["verdict"] == "regression"
    assert sample["label"]["note"] == "bad"
    status, summary = await _get(f"{base}/api/summary", AUTH)
    assert status == 200
    assert summary["this_process"]["int8"]["compared"] == 3
    assert summary["stored_counters"]["int8|compared"] == 3
    assert summary["stored_counters"]["int8|m|scores|flagged"] == 3
    status, text = await _get(f"{base}/metrics", AUTH)
    assert status == 200
    assert 'shadowproxy_mirror_outcomes_total{candidate="int8",outcome="compared"} 3.0' in text
    assert "shadowproxy_divergence_bucket" in text
    # Counted, not merely declared: one live and one shadow latency per request.
    assert 'shadowproxy_live_latency_seconds_count{side="reference",upstream="ref"} 3.0' in text
    assert 'shadowproxy_shadow_latency_seconds_count{side="candidate",upstream="int8"} 3.0' in text
