"""A rollout's change reaches every replica at once: written through one, announced on the
rollout's channel, applied by the other within a second (not at its next evaluation)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp

from tests.canary_config import fast_canary
from tests.conftest import ADMIN_TOKEN, make_settings, wait_until

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def _served_by(s: aiohttp.ClientSession, port: int, k: int) -> str:
    body = f'{{"inputs":[{{"name":"x","datatype":"FP32","shape":[1],"data":[{k}]}}]}}'
    async with s.post(f"http://127.0.0.1:{port}/v2/models/m/infer", data=body) as r:
        await r.read()
        assert r.status == 200
        return r.headers.get("X-Served-By", "")


async def test_a_rollback_through_one_replica_stops_the_other_within_a_second(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await fake(), await fake()
    settings = make_settings(
        ref.url,
        redis_url,
        candidates=[{"name": "cand", "url": cand.url}],
        # At 100% from the start; the gates never decide (min_samples out of reach) and the
        # replicas evaluate only hourly: only the announcement can move the second one.
        canary=fast_canary(steps=[100], min_samples=100_000, interval_s=3600, stale_after_s=3600),
    )
    first, second = await proxy_factory(settings), await proxy_factory(settings)
    async with aiohttp.ClientSession() as s:
        await wait_until(
            lambda: _served_by(s, second.data_port, 0), what="the second replica serving"
        )
        assert await _served_by(s, second.data_port, 1) == "cand"
        async with s.post(
            f"http://127.0.0.1:{first.admin_port}/api/canary/abort",
            headers=AUTH,
            json={"reason": "rolled back by a person"},
        ) as r:
            assert r.status == 200 and (await r.json())["state"]["status"] == "aborted"
        loop = asyncio.get_running_loop()
        written = loop.time()
        late: list[float] = []
        first_ref_after = None
        k = 2
        while loop.time() - written < 2.0:
            who = await _served_by(s, second.data_port, k)
            after = loop.time() - written
            if who == "ref" and first_ref_after is None:
                first_ref_after = after
            if who == "cand" and after > 1.0:
                late.append(after)
            k += 1
        assert not late, f"the candidate still answered {len(late)} requests after 1 s"
        assert first_ref_after is not None and first_ref_after < 1.0
        print(f"the second replica served the reference {first_ref_after * 1000:.0f} ms after")
