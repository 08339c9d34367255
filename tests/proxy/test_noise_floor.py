"""Noise-aware verdicts through the proxy: the twin's A/A divergence calibrates the flags."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp

from tests.conftest import ADMIN_TOKEN, make_settings, send_infers

NOISE = 1e-3
WARMUP, MEASURED = 30, 20


async def _traffic(proxy: Any, start: int, count: int) -> None:
    # One request at a time, so the twin's verdict on it is in before the next.
    ids = [f"r{i:03d}" for i in range(start, start + count)]
    await send_infers(proxy, ids, first=start, drain_each=True)


async def _population(proxy: Any, candidate: str, samples: int) -> dict[str, Any]:
    """The candidate's row once Redis holds all ``samples`` verdicts (each process adds its
    statistics every second)."""
    url = f"http://127.0.0.1:{proxy.admin_port}/api/summary"
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        async with (
            aiohttp.ClientSession() as s,
            s.get(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r,
        ):
            summary = await r.json()
        rows = [p for p in summary["population"] or [] if p["candidate"] == candidate]
        if rows and rows[0]["samples"] >= samples:
            assert rows[0]["samples"] == samples
            return rows[0]
        assert asyncio.get_running_loop().time() < deadline, rows
        await asyncio.sleep(0.2)


def _settings(ref: str, twin: str, cand: str, redis_url: str) -> Any:
    candidates = [
        {"name": "twin", "url": twin, "noise_floor": True},
        {"name": "cand", "url": cand},
    ]
    return make_settings(
        ref,
        redis_url,
        candidates=candidates,
        noise={"min_samples": WARMUP},
        comparisons={"*": {"*": {"metric": "tolerance"}}},
    )


async def test_noise_at_the_floor_is_not_flagged(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    # A non-deterministic reference: two instances already differ by NOISE on every answer.
    ref, twin, cand = [await fake(noise=NOISE, size=256, noise_seed=k) for k in range(3)]
    proxy = await proxy_factory(_settings(ref.url, twin.url, cand.url, redis_url))
    await _traffic(proxy, 0, WARMUP + MEASURED)
    verdicts = await proxy.store.list_samples(flagged=False, candidate="cand", limit=1000)
    measured = [v for v in verdicts if v["request_id"] >= f"r{WARMUP:03d}"]
    assert len(measured) == MEASURED
    # The static threshold (atol=rtol=1e-5) fires on every one of them...
    assert all(v["outputs"][0]["scores"]["fail_fraction"] > 0 for v in measured)
    # ...but each lies within what the reference does to itself, so none is flagged.
    assert not any(v["flagged"] for v in measured)
    assert all(v["outputs"][0]["scores"]["noise_p"] > 0.01 for v in measured)
    pop = await _population(proxy, "cand", WARMUP + MEASURED)
    assert pop["paired_vs_noise_floor"]["wilcoxon_greater"]["p"] > 0.01


async def test_the_same_magnitude_is_flagged_where_the_reference_is_deterministic(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, twin = await fake(size=256), await fake(size=256)
    cand = await fake(noise=NOISE, size=256, noise_seed=0)  # a divergence of the same size
    proxy = await proxy_factory(_settings(ref.url, twin.url, cand.url, redis_url))
    await _traffic(proxy, 0, WARMUP)
    await _traffic(proxy, WARMUP, 10)  # fewer samples than the noise floor saw
    flagged = await proxy.store.list_samples(flagged=True, candidate="cand", limit=1000)
    late = [v for v in flagged if v["request_id"] >= f"r{WARMUP:03d}"]
    assert len(late) == 10
    assert all("beyond the noise floor" in v["reason"] for v in late)
    pop = await _population(proxy, "cand", WARMUP + 10)
    assert pop["flagged_rate_ci95"][0] > 0.5
    assert pop["paired_vs_noise_floor"]["wilcoxon_greater"]["p"] < 0.001
    assert pop["paired_vs_noise_floor"]["mcnemar"]["candidate_only"] == WARMUP + 10
