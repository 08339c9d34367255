"""The canary's evidence at its edges: the sequential rate gate's first decisive look (on the
gates and on a live rollout), McNemar's normal approximation past 1,000 discordant pairs, a failed
flush (kept when Redis refused it, dropped when Redis may have applied it), and the
``uncompared`` counter."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from proxy.buffer.embedded import EmbeddedRedis
from proxy.buffer.keys import KeySchema
from proxy.canary import gates as g
from proxy.canary.evidence import EvidenceBuffer
from proxy.settings import CanaryGates, TelemetrySettings
from proxy.telemetry import Telemetry
from tests.conftest import ADMIN_TOKEN, import_or_skip, make_settings, wait_until
from tests.fakes import start_silent_redis

TAG = ("cand", 1, 0)


def _flagged_gate(k: int, n: int, min_samples: int, field: str = "flagged") -> g.GateResult:
    if field == "flagged":
        evidence = {g.COMPARED: n, g.FLAGGED: k}
    else:
        evidence = {g.CAND_CALLS: n, g.CAND_ERRORS: k}
    result = g.evaluate(
        evidence,
        CanaryGates(),
        min_samples=min_samples,
        elapsed_s=0.0,
        min_duration_s=1.0,
        has_twin=False,
    )
    name = "flagged_rate" if field == "flagged" else "error_rate"
    return next(r for r in result.gates if r.gate == name)


@pytest.mark.parametrize(("field", "limit"), [("flagged", 0.05), ("errors", 0.02)])
def test_an_early_look_fails_only_on_evidence_one_over_alpha(field: str, limit: float) -> None:
    """gates.py ``_rate_gate``: at any look, before ``min_samples`` or after, a rate gate fails
    once the evidence that the rate is above its limit reaches 1 / (1 - confidence) = 20."""
    first, _ = g.sequential_evidence(1, 1, limit)
    second, _ = g.sequential_evidence(2, 2, limit)
    assert first < 20 <= second
    # One event of one is not enough (5.04 at a 5% limit, 11.4 at 2%): it waits.
    r = _flagged_gate(1, 1, 200, field)
    assert r.status == "wait" and "above the limit" not in r.detail, r
    assert "1/200" in r.detail
    # The second fails it, long before min_samples.
    assert _flagged_gate(2, 2, 200, field).status == "fail"
    # And a sound rate never fails: 3 of 200 is evidence of a rate below the limit, not above.
    assert _flagged_gate(3, 200, 200, field).status != "fail"


async def test_one_flagged_answer_holds_a_live_rollout_and_the_second_rolls_it_back(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    """The same boundary on a running rollout: every compared request is flagged; after one the
    controller evaluates again and again without moving, the second rolls it back."""
    ref, cand = await fake(), await fake(drift=1.0)
    settings = make_settings(
        ref.url,
        redis_url,
        candidates=[{"name": "cand", "url": cand.url}],
        canary={
            "candidate": "cand",
            "steps": [100],
            "min_samples": 200,
            "min_duration_s": 0,
            "interval_s": 3600,  # the test evaluates by calling tick()
            "gates": {"latency_slack_ms": 1000},
        },
    )
    proxy = await proxy_factory(settings)
    controller = proxy.canary

    async def send(n: int, first: int) -> None:
        async with aiohttp.ClientSession() as s:
            for k in range(first, first + n):
                body = f'{{"inputs":[{{"name":"x","datatype":"FP32","shape":[1],"data":[{k}]}}]}}'
                url = f"http://127.0.0.1:{proxy.data_port}/v2/models/m/infer"
                async with s.post(url, data=body.encode()) as r:
                    assert r.status == 200
        assert await proxy.drained(10)

    await send(1, 0)
    for _ in range(5):
        await controller.tick()
    state = await controller.store.read()
    assert state is not None and state.status == "running", state
    evidence = await controller.store.evidence(state.attempt, state.step)
    assert (evidence["compared"], evidence["flagged"]) == (1, 1)
    await send(1, 1)
    await controller.tick()
    state = await controller.store.read()
    assert state is not None and state.status == "rolled_back", state
    assert "flagged_rate: 2/2" in state.reason


def _normal_sf(z: float) -> float:
    """The upper tail of the standard normal, by erfc (independent of statistics.NormalDist)."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def _exact_tail(b: int, c: int) -> float:
    n = b + c
    tail: int = sum(math.comb(n, i) for i in range(b, n + 1))
    return tail / (1 << n)  # ints: no overflow


@pytest.mark.parametrize(("b", "c"), [(520, 482), (560, 460), (1100, 1000), (2600, 2400)])
def test_mcnemar_past_1000_pairs_is_the_continuity_corrected_normal_tail(b: int, c: int) -> None:
    p = g.mcnemar_greater_p(b, c)
    z = (b - c - 1) / math.sqrt(b + c)
    assert p == pytest.approx(_normal_sf(z), rel=1e-9)
    # ... and it is a good approximation of the exact binomial tail it stands in for (exact
    # integers: this needs no scipy, so a missing scipy never skips it).
    assert p == pytest.approx(_exact_tail(b, c), rel=0.05)
    # The same normal tail by an independent implementation.
    stats = import_or_skip("scipy.stats")
    assert p == pytest.approx(float(stats.norm.sf(z)), rel=1e-9)


def test_mcnemar_is_continuous_where_the_exact_test_hands_over() -> None:
    """1,000 discordant pairs: exact; 1,001: the approximation. The two agree closely."""
    exact = g.mcnemar_greater_p(530, 470)
    approx = g.mcnemar_greater_p(531, 470)
    assert exact == pytest.approx(_exact_tail(530, 470), rel=1e-12)
    assert approx == pytest.approx(_normal_sf((531 - 470 - 1) / math.sqrt(1001)), rel=1e-9)
    assert approx < exact < 2 * approx  # one more candidate-only pair: a little smaller p
    # The gate uses it past 1,000 pairs: 560 vs 460 fails at alpha 0.01, 520 vs 482 passes.
    for (b, c), status in (((560, 460), "fail"), ((520, 482), "pass")):
        evidence = {g.PAIRS: 5000, g.PAIRS_CAND_ONLY: b, g.PAIRS_TWIN_ONLY: c}
        result = g.evaluate(
            evidence, CanaryGates(), min_samples=1, elapsed_s=1, min_duration_s=0, has_twin=True
        )
        paired = next(r for r in result.gates if r.gate == "paired_vs_noise")
        assert paired.status == status, paired


# ---------------------------------------------------------------- a failed flush


def _unflushed(tel: Telemetry) -> float:
    text = tel.prometheus_text().decode()
    found = re.search(r"^shadowproxy_canary_evidence_unflushed_total(?:\{\})? (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def _stored(url: str) -> dict[str, int]:
    client = aioredis.Redis.from_url(url)
    try:
        raw = client.hgetall(KeySchema().canary_evidence(*TAG))
        assert not isinstance(raw, dict)  # typed sync-or-async by redis-py
        return {k.decode(): int(v) for k, v in (await raw).items()}
    finally:
        await client.aclose()


async def test_evidence_redis_refused_is_kept_and_written_once_it_is_back(
    dedicated_redis: EmbeddedRedis,
) -> None:
    url = dedicated_redis.url
    tel = Telemetry(TelemetrySettings())
    client = aioredis.Redis.from_url(url, socket_connect_timeout=1)
    buffer = EvidenceBuffer(client, KeySchema(), tel, timeout_s=1.0)
    try:
        await asyncio.to_thread(dedicated_redis.stop)
        buffer.add(TAG, {g.COMPARED: 5, g.FLAGGED: 2})
        assert not await buffer.flush()
        buffer.add(TAG, {g.COMPARED: 1})  # more arrives meanwhile
        assert not await buffer.flush()
        assert _unflushed(tel) > 0  # each failed try is counted
        await asyncio.to_thread(dedicated_redis.start)
        assert await buffer.flush()
        assert await _stored(url) == {"compared": 6, "flagged": 2}  # all of it, once
        assert await buffer.flush()  # nothing left pending: nothing written twice
        assert await _stored(url) == {"compared": 6, "flagged": 2}
    finally:
        await client.aclose()


async def test_evidence_kept_after_a_refusal_is_counted_in_counts(
    dedicated_redis: EmbeddedRedis,
) -> None:
    tel = Telemetry(TelemetrySettings())
    client = aioredis.Redis.from_url(dedicated_redis.url, socket_connect_timeout=1)
    buffer = EvidenceBuffer(client, KeySchema(), tel, timeout_s=1.0)
    try:
        await asyncio.to_thread(dedicated_redis.stop)
        buffer.add(TAG, {g.COMPARED: 5, g.FLAGGED: 2})
        assert not await buffer.flush()
        assert _unflushed(tel) == 7
    finally:
        await client.aclose()


async def test_evidence_redis_may_have_applied_is_dropped_not_counted_twice(
    redis_url: str,
) -> None:
    """A Redis that takes the write and never answers: the batch may be in, so it is dropped
    (never retried, which could count it twice) and the loss counted."""
    silent = await start_silent_redis(redis_url)
    tel = Telemetry(TelemetrySettings())
    client = aioredis.Redis.from_url(silent.url)
    buffer = EvidenceBuffer(client, KeySchema(), tel, timeout_s=0.3)
    try:
        buffer.add(TAG, {g.COMPARED: 5, g.FLAGGED: 2})
        assert not await buffer.flush()
        assert silent.connections >= 1
        assert _unflushed(tel) == 7
        silent.relay = True  # Redis answers again: the dropped batch is not sent again
        buffer.add(TAG, {g.COMPARED: 1})
        await wait_until(buffer.flush, what="a flush through the relay")
        assert await _stored(redis_url) == {"compared": 1}
    finally:
        await client.aclose()
        silent.close()


# ---------------------------------------------------------------- uncompared


async def test_canary_answers_whose_copy_is_dropped_are_counted_uncompared(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    """At 100% the candidate answers and a copy goes to the reference (one call at a time here,
    and the reference holds it). The next copy waits in the mirror queue, which is then full
    (1 MiB): the copies after it are dropped, and the step's evidence counts each such canary
    answer as ``uncompared``, next to what was served and compared."""
    ref, cand = await fake(), await fake()
    settings = make_settings(
        ref.url,
        redis_url,
        candidates=[{"name": "cand", "url": cand.url, "max_in_flight": 1}],
        canary={"candidate": "cand", "steps": [100], "min_samples": 50, "interval_s": 0.05},
        proxy={
            "drain_timeout_s": 2,
            "shed_lag_ms": 0,
            "mirror_process": False,
            "mirror_queue_bytes": 1024 * 1024,
        },
    )
    proxy = await proxy_factory(settings)
    values = ",".join(["1.5"] * 200_000)  # 800 KiB of JSON: one fits the queue, two do not
    big = f'{{"inputs":[{{"name":"x","datatype":"FP32","shape":[200000],"data":[{values}]}}]}}'
    url = f"http://127.0.0.1:{proxy.data_port}/v2/models/m/infer"

    async def post(s: aiohttp.ClientSession, body: str) -> None:
        async with s.post(url, data=body.replace("1.5", str(next(n)), 1).encode()) as r:
            assert r.status == 200

    n = iter(range(100))
    async with aiohttp.ClientSession() as s:
        # The first request of a model goes to the reference while its config is looked up.
        await post(s, SMALL)
        assert await proxy.drained(10)
        ref.behaviour.hold = asyncio.Event()
        await post(s, big)  # its copy: the one call to the reference, held there
        await wait_until(lambda: ref.behaviour.in_flight == 1, what="the copy held")
        await post(s, big)  # waits in the queue, which is now full
        await post(s, big)  # dropped
        await post(s, big)  # dropped
        ref.behaviour.hold.set()
        assert await proxy.drained(10)
        await proxy.canary.evidence.flush()
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with s.get(f"http://127.0.0.1:{proxy.admin_port}/api/canary", headers=auth) as r:
            evidence = (await r.json())["evidence"]
    assert (evidence["served_ref"], evidence["served_cand"]) == (1, 4), evidence
    assert (evidence["compared"], evidence["uncompared"]) == (3, 2), evidence
    assert proxy.telemetry.tally[("cand", "dropped_queue_bytes")] == 2


SMALL = '{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1.5]}]}'
