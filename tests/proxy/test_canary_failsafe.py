"""The canary fail-safe: a rollout whose state vanished from Redis is served by the reference and
waits for a person's `canary restart`; no controller starts it again on its own.

Fakes as in test_canary: the candidate answers like the reference, the rollout sits at 100% with
more samples needed than the tests send, so it would stay there (and keep serving the candidate)
if nothing happened to its state.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml

from proxy.app import ProxyRunner
from proxy.buffer.embedded import EmbeddedRedis
from proxy.canary.state import fingerprint
from proxy.settings import Settings
from tests.conftest import ADMIN_TOKEN, wait_until
from tests.proxy.test_canary import AUTH, _admin, _canary_settings, _cli, _infer, _weight_here


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def _settings(ref: str, cand: str, redis_url: str, **canary: Any) -> Settings:
    settings: Settings = _canary_settings(
        ref, cand, redis_url, steps=[100], min_samples=10_000, **canary
    )
    return settings


async def _served_by_candidate(proxy: ProxyRunner) -> bool:
    # Until the reference's config says the model is stateless (looked up in the background)
    # even plain requests stay on the reference.
    return (await _infer(proxy, 1))[0][1] == "cand"


async def _stored_status(proxy: ProxyRunner) -> str | None:
    state = await proxy.canary.store.read()
    return None if state is None else state.status


async def test_a_flushed_rollout_serves_the_reference_until_restarted(
    fake: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    redis_client: aioredis.Redis,
) -> None:
    ref, cand = await fake(), await fake()
    proxy = await proxy_factory(_settings(ref.url, cand.url, redis_url))
    await wait_until(lambda: _served_by_candidate(proxy), what="the candidate serving at 100%")

    await redis_client.flushall()
    await wait_until(lambda: _weight_here(proxy) == 0, what="the lost rollout adopted")
    assert {who for _, who in await _infer(proxy, 10, first=100)} == {"ref"}
    # Ten evaluations later it is still halted: nothing started it again from its first step.
    for _ in range(10):
        await proxy.canary.tick()
    state = await proxy.canary.store.read()
    assert state is not None and (state.status, state.attempt, state.weight) == ("lost", 1, 0)
    assert "disappeared from Redis" in state.reason and "canary restart" in state.reason
    assert [d["outcome"] for d in await proxy.canary.store.decisions()] == ["state_lost"]
    assert {who for _, who in await _infer(proxy, 10, first=200)} == {"ref"}
    # Counted and visible: the decision counter, the gauge, the summary, the Flagger webhook.
    async with aiohttp.ClientSession(headers=AUTH) as s:
        base = f"http://127.0.0.1:{proxy.admin_port}"
        metrics = await (await s.get(f"{base}/metrics")).text()
        summary = await (await s.get(f"{base}/api/summary")).json()
    assert 'shadowproxy_canary_decisions_total{outcome="state_lost",rollout="cand"} 1' in metrics
    assert 'stat="state_lost"} 1' in metrics
    assert summary["canary"]["state_lost"] is True
    assert summary["canary"]["serving_weight_here"] == 0
    code, body = await _admin(proxy, "POST", "/api/canary/flagger", json={"name": "m"})
    assert code == 409 and body["rollout_status"] == "lost"
    # Commands other than restart are refused; restart is a new attempt, from the first step.
    code, body = await _admin(proxy, "POST", "/api/canary/resume")
    assert code == 409 and "only `restart`" in body["error"]
    code, body = await _admin(proxy, "POST", "/api/canary/restart")
    assert code == 200 and body["state"]["status"] == "running"
    assert body["state"]["attempt"] == 2 and body["decision"]["by"] == "admin"
    await wait_until(lambda: _served_by_candidate(proxy), what="the candidate serving again")


async def test_a_replica_started_on_the_empty_store_is_overruled(
    fake: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    redis_client: aioredis.Redis,
) -> None:
    """A replica that never saw the rollout finds nothing and starts it; a replica that knew it
    halts that start as soon as the start is announced (with an hour between evaluations, only
    the announcement wakes it), and both then serve the reference."""
    ref, cand = await fake(), await fake()
    settings = _settings(ref.url, cand.url, redis_url, interval_s=3600, stale_after_s=3600)
    knew = await proxy_factory(settings)
    assert await _stored_status(knew) == "running"

    await redis_client.flushall()
    fresh = await proxy_factory(settings)
    await wait_until(lambda: _weight_here(knew) == 0, what="the replica that knew halts it")
    assert await _stored_status(knew) == "lost"
    fresh.canary.poke()
    await wait_until(lambda: _weight_here(fresh) == 0, what="the fresh replica adopts the halt")
    for proxy in (knew, fresh):
        assert {who for _, who in await _infer(proxy, 5)} == {"ref"}
    outcomes = [d["outcome"] for d in await knew.canary.store.decisions()]
    assert outcomes == ["started", "state_lost"]


async def test_a_restarted_proxy_finds_the_log_and_the_cli_restarts_the_rollout(
    fake: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    """Only the state key is gone (evicted) and the proxy restarts: the decision log that
    survived says a rollout ran, so the new process halts it rather than start it again."""
    ref, cand = await fake(), await fake()
    settings = _settings(ref.url, cand.url, redis_url)
    first = await proxy_factory(settings)
    assert await _stored_status(first) == "running"
    await first.stop()
    await redis_client.delete(first.store.keys.canary("cand"))

    again = await proxy_factory(settings)
    state = await again.canary.store.read()
    assert state is not None and (state.status, state.attempt) == ("lost", 1)
    assert {who for _, who in await _infer(again, 5)} == {"ref"}

    data = settings.model_dump(mode="json")
    data["admin"]["token"] = ADMIN_TOKEN  # secrets dump as stars
    data["buffer"]["redis_url"] = redis_url
    config = tmp_path / "proxy.yaml"
    config.write_text(yaml.safe_dump(data))
    rc, out, err = await _cli("status", "--config", str(config))
    assert rc == 0, err
    assert "status   lost (attempt 1)" in out and "disappeared from Redis" in out
    rc, out, err = await _cli("restart", "--config", str(config))
    assert rc == 0, err
    assert "restarted" in out and "cli:" in out
    state = await again.canary.store.read()
    assert state is not None and (state.status, state.attempt) == ("running", 2)
    again.canary.poke()
    await wait_until(lambda: _served_by_candidate(again), what="the candidate serving again")


async def _metrics(proxy: ProxyRunner) -> str:
    async with aiohttp.ClientSession(headers=AUTH) as s:
        return await (await s.get(f"http://127.0.0.1:{proxy.admin_port}/metrics")).text()


async def _serving_weights(proxy: ProxyRunner) -> tuple[Any, Any]:
    """The weight this replica serves as /api/summary and /api/canary report it."""
    _, summary = await _admin(proxy, "GET", "/api/summary")
    code, view = await _admin(proxy, "GET", "/api/canary")
    return summary["canary"]["serving_weight_here"], (
        view["serving_weight_here"] if code == 200 else code
    )


async def test_redis_out_of_reach_serves_the_reference_after_stale_after_s(
    dedicated_redis: EmbeddedRedis, fake: Callable[..., Any], proxy_factory: Callable[..., Any]
) -> None:
    """Redis stops answering: the replica keeps the weight it confirmed for ``stale_after_s``
    (a blip does not flip it), then serves the reference, and the candidate again once Redis
    is back with the rollout."""
    url = dedicated_redis.url
    ref, cand = await fake(), await fake()
    proxy = await proxy_factory(_settings(ref.url, cand.url, url, stale_after_s=0.5))
    await wait_until(lambda: _served_by_candidate(proxy), what="the candidate serving at 100%")

    began = time.monotonic()
    await asyncio.to_thread(dedicated_redis.stop)
    await wait_until(lambda: _weight_here(proxy) is None, what="the rollout's view gone stale")
    # Its last confirmed read was at most one interval (50 ms) before Redis stopped.
    assert time.monotonic() - began >= 0.5 - 0.05
    assert {who for _, who in await _infer(proxy, 10, first=100)} == {"ref"}
    assert (await _serving_weights(proxy))[0] == 0

    await asyncio.to_thread(dedicated_redis.start)
    assert dedicated_redis.url == url  # the same server, its data kept
    await wait_until(lambda: _served_by_candidate(proxy), what="the candidate serving again")
    state = await proxy.canary.store.read()
    assert state is not None and (state.status, state.attempt, state.weight) == ("running", 1, 100)


async def test_an_unreadable_rollout_state_serves_the_reference_and_restart_mends_it(
    fake: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    redis_client: aioredis.Redis,
) -> None:
    """A corrupt state key (not JSON, or JSON that is no rollout) is no weight to serve: the
    replica serves the reference at once (not after ``stale_after_s``), says why and counts it;
    a proxy starting on it starts and serves; ``canary restart`` writes a good state over it."""
    ref, cand = await fake(), await fake()
    settings = _settings(ref.url, cand.url, redis_url, stale_after_s=3600)
    proxy = await proxy_factory(settings)
    key = proxy.store.keys.canary("cand")
    await wait_until(lambda: _served_by_candidate(proxy), what="the candidate serving at 100%")

    await redis_client.set(key, b"{")
    await wait_until(lambda: _weight_here(proxy) is None, what="the unreadable state noticed")
    assert {who for _, who in await _infer(proxy, 10, first=100)} == {"ref"}
    assert await _serving_weights(proxy) == (0, 503)  # /api/canary: the rollout cannot be read
    _, summary = await _admin(proxy, "GET", "/api/summary")
    assert summary["canary"]["state_unreadable"] is True
    metrics = await _metrics(proxy)
    assert 'decisions_total{outcome="state_unreadable",rollout="cand"} 1' in metrics
    assert await redis_client.get(key) == b"{"  # no controller writes over it

    # JSON, but no rollout state: a proxy (re)started on it starts, and serves the reference.
    await redis_client.set(key, b'{"rollout": "cand"}')
    second = await proxy_factory(settings)
    assert _weight_here(second) is None
    assert {who for _, who in await _infer(second, 5, first=200)} == {"ref"}
    assert (await _serving_weights(second))[0] == 0

    code, body = await _admin(proxy, "POST", "/api/canary/pause")
    assert code == 503 and "unreadable" in body["error"]
    code, body = await _admin(proxy, "POST", "/api/canary/restart")
    assert code == 200 and (body["state"]["status"], body["state"]["attempt"]) == ("running", 2)
    for replica in (proxy, second):
        replica.canary.poke()
        await wait_until(lambda r=replica: _served_by_candidate(r), what="the candidate again")
        assert await _serving_weights(replica) == (100, 100)
    _, summary = await _admin(proxy, "GET", "/api/summary")
    assert summary["canary"]["state_unreadable"] is False


async def test_a_rollout_of_another_build_is_served_by_the_reference(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    """Two replicas on one Redis whose canary candidates differ (another URL: another build):
    the one whose build is not the running rollout's serves every request from the reference,
    reports a serving weight of 0, and leaves the rollout alone."""
    ref, cand, other = await fake(), await fake(), await fake()
    ours = await proxy_factory(_settings(ref.url, cand.url, redis_url))
    await wait_until(lambda: _served_by_candidate(ours), what="the candidate serving at 100%")

    theirs = await proxy_factory(_settings(ref.url, other.url, redis_url))
    for _ in range(3):
        await theirs.canary.tick()
    calls = other.behaviour.calls
    assert {who for _, who in await _infer(theirs, 20, first=100)} == {"ref"}
    assert await _serving_weights(theirs) == (0, 0)
    assert re.search(r'stat="weight"\} 0(\.0)?$', await _metrics(theirs), re.M)
    assert await theirs.drained(10)
    assert other.behaviour.calls - calls == 20  # shadow copies only: no live answer came from it
    # The rollout is untouched: still the first build's, served by its candidate there.
    assert await _serving_weights(ours) == (100, 100)
    assert {who for _, who in await _infer(ours, 5, first=200)} == {"cand"}
    state = await ours.canary.store.read()
    assert state is not None and state.fingerprint == fingerprint(ours.settings)
    assert [d["outcome"] for d in await ours.canary.store.decisions()] == ["started"]
