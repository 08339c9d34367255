"""The admin plane's heavy reads run in the review worker, never on the live process's loop."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import aiohttp

from proxy.review.admin_worker import ADMIN_WORKER
from tests.conftest import ADMIN_TOKEN, make_settings, send_infers, wait_until

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def test_sample_lists_and_plots_are_served_by_the_review_worker(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await fake(), await fake(drift=1.0)
    proxy = await proxy_factory(
        make_settings(ref.url, redis_url, candidates=[{"name": "c", "url": cand.url}])
    )
    await send_infers(proxy, ["a", "b"])
    base = f"http://127.0.0.1:{proxy.admin_port}"
    review = proxy.admin[ADMIN_WORKER]
    assert review.pid is None  # started by the first heavy read, not before
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/api/samples?flagged=1") as r:
            assert r.status == 401  # access is checked before anything is forwarded
            assert "X-Review-Worker" not in r.headers
        async with s.get(f"{base}/api/samples?flagged=1", headers=AUTH) as r:
            assert r.status == 200, await r.text()
            samples = await r.json()
            served_by = int(r.headers["X-Review-Worker"])
        assert len(samples) == 2 and served_by == review.pid and served_by != os.getpid()
        sid = samples[0]["id"]
        async with s.get(f"{base}/api/samples/{sid}/tensors", headers=AUTH) as r:
            assert r.status == 200 and r.headers["X-Review-Worker"] == str(served_by)
            assert (await r.json())["outputs"]
        async with s.get(f"{base}/api/samples/nope", headers=AUTH) as r:
            assert r.status == 404 and "no sample 'nope'" in (await r.json())["error"]
        async with s.get(f"{base}/api/summary", headers=AUTH) as r:
            # Live figures (coverage, in flight) are this process's own: answered here.
            assert r.status == 200 and "X-Review-Worker" not in r.headers

        # A review worker that dies costs one 503 at most, then a new one serves.
        os.kill(served_by, signal.SIGKILL)
        await wait_until(lambda: not _alive(served_by), 10)
        statuses = []
        for _ in range(2):
            async with s.get(f"{base}/api/samples?flagged=1", headers=AUTH) as r:
                statuses.append(r.status)
                if r.status == 200:
                    assert len(await r.json()) == 2
                else:
                    assert "review worker unavailable" in (await r.json())["error"]
        assert statuses[-1] == 200 and review.pid not in (None, served_by)
    pid = review.pid
    await proxy.stop()
    assert pid is not None and not _alive(pid)  # the proxy's stop takes the worker with it


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
