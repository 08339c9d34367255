"""The link between the live process and the shadow processes, when the far end hangs.

A mirror process or a compare worker that is stopped (SIGSTOP: a hung process, a debugger, a host
swapping) is not dead: nothing restarts it, and whatever is sent to it waits. The live path must
keep answering, the admin plane must not get stuck asking it for numbers, the live process's
buffer towards it is bounded (copies beyond ``MAX_BUFFERED_BYTES`` are dropped as ``link_full``),
and once it runs again every copy is compared or counted.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp

from proxy.shadow.mirror_link import MAX_BUFFERED_BYTES
from tests.conftest import ADMIN_TOKEN, make_settings, wait_until

PROCESS = {"drain_timeout_s": 2, "shed_lag_ms": 0, "mirror_process": True}
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The process ``pid`` stopped (SIGSTOP) for the block; always continued after it."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


async def _proxy(fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis: str) -> Any:
    ref, cand = await fake(), await fake()
    settings = make_settings(
        ref.url, redis, candidates=[{"name": "c", "url": cand.url}], proxy=PROCESS
    )
    return await proxy_factory(settings)


async def _send(proxy: Any, bodies: list[bytes]) -> None:
    """POST each body to the data port; every one must be answered 200 by the reference."""
    async with aiohttp.ClientSession() as s:
        for body in bodies:
            url = f"http://127.0.0.1:{proxy.data_port}/v2/models/m/infer"
            async with s.post(url, data=body) as r:
                assert r.status == 200
                await r.read()


def _small(k: int) -> bytes:
    return f'{{"inputs":[{{"name":"x","datatype":"FP32","shape":[1],"data":[{k}]}}]}}'.encode()


async def _summary(proxy: Any) -> Any:
    async with (
        aiohttp.ClientSession(headers=AUTH) as s,
        s.get(f"http://127.0.0.1:{proxy.admin_port}/api/summary") as r,
    ):
        assert r.status == 200
        return await r.json()


async def test_a_hung_mirror_process_holds_up_nothing_and_compares_all_once_continued(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    proxy = await _proxy(fake, proxy_factory, redis_url)
    await _send(proxy, [_small(0)])
    assert await proxy.drained(15)
    pid = proxy.mirror._proc.pid
    with stopped(pid):
        await _send(proxy, [_small(k) for k in range(1, 6)])  # answered while it hangs
        summary = await _summary(proxy)  # answered too: not stuck on the hung process
        assert summary["mirror_worker"] == "not answering", summary["mirror_worker"]
    assert await proxy.drained(15)
    summary = await _summary(proxy)
    assert proxy.mirror._proc.pid == pid, "a stopped process is not restarted"
    tally = summary["this_process"]["c"]
    assert tally["compared"] == 6 and not any(k.startswith("dropped") for k in tally), tally


async def test_a_hung_compare_worker_holds_up_nothing_and_compares_all_once_continued(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    proxy = await _proxy(fake, proxy_factory, redis_url)
    await _send(proxy, [_small(0)])
    assert await proxy.drained(15)
    (worker,) = _children(proxy.mirror._proc.pid)
    with stopped(worker):
        await _send(proxy, [_small(k) for k in range(1, 6)])
        summary = await _summary(proxy)  # the mirror process answers for it
        assert summary["mirror_worker"] != "not answering"
        # The five copies it holds are still owed (their pairs wait for the worker).
        assert summary["in_flight"]["c"] == 5, summary["in_flight"]
    assert await proxy.drained(15)
    assert _children(proxy.mirror._proc.pid) == [worker], "a stopped worker is not replaced"
    tally = (await _summary(proxy))["this_process"]["c"]
    assert tally["compared"] == 6 and not any(k.startswith("dropped") for k in tally), tally


async def test_a_full_link_drops_copies_as_link_full_and_the_rest_are_compared(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    """With the mirror process stopped, copies pile up in the live process's buffer towards it;
    past MAX_BUFFERED_BYTES (128 MiB) each further copy is dropped and counted as link_full.
    Continued, the mirror process compares every copy that was buffered."""
    proxy = await _proxy(fake, proxy_factory, redis_url)
    size = 12 * 1024 * 1024  # under the fast lane's 16 MiB: 11 of these fill the link
    filler = "a" * size

    def body(k: int) -> bytes:
        data = f'"data":["{k}{filler}"]'
        return f'{{"inputs":[{{"name":"t","datatype":"BYTES","shape":[1],{data}}}]}}'.encode()

    def link_full() -> int:
        return int(proxy.telemetry.tally[("c", "dropped_link_full")])

    sent = 0
    with stopped(proxy.mirror._proc.pid):
        while not link_full():
            assert sent * size <= MAX_BUFFERED_BYTES + 2 * size, "never full"
            await _send(proxy, [body(sent)])
            sent += 1
        await _send(proxy, [body(sent), _small(sent + 1)])  # both dropped: it is still full
        sent += 2
        assert link_full() == 3
    assert await proxy.drained(30)
    tally = (await _summary(proxy))["this_process"]["c"]
    assert tally["compared"] == sent - 3 and tally["dropped_link_full"] == 3, tally
    async with (
        aiohttp.ClientSession(headers=AUTH) as s,
        s.get(f"http://127.0.0.1:{proxy.admin_port}/metrics") as r,
    ):
        metrics = await r.text()
    assert 'shadowproxy_mirror_link_dropped_total{candidate="c",reason="link_full"} 3.0' in (
        metrics
    )


async def test_a_canary_answer_whose_copy_the_link_drops_is_counted_uncompared(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await fake(), await fake()
    settings = make_settings(
        ref.url,
        redis_url,
        candidates=[{"name": "c", "url": cand.url}],
        canary={"candidate": "c", "steps": [100], "min_samples": 50, "interval_s": 0.05},
        proxy=PROCESS,
    )
    proxy = await proxy_factory(settings)
    await _send(proxy, [_small(0)])  # a model's first request is the reference's (config lookup)
    assert await proxy.drained(15)
    os.kill(proxy.mirror._proc.pid, signal.SIGKILL)
    await wait_until(lambda: not proxy.mirror._up(), what="the live process sees it down")
    await _send(proxy, [_small(1)])  # the candidate answers; its copy cannot be sent
    assert proxy.telemetry.tally[("c", "dropped_worker_down")] == 1
    await proxy.canary.evidence.flush()
    state = await proxy.canary.store.read()
    assert state is not None
    evidence = await proxy.canary.store.evidence(state.attempt, state.step)
    assert evidence.get("served_cand") == 1, evidence
    assert evidence.get("uncompared") == 1, evidence


async def test_a_compare_worker_killed_holding_pairs_counts_them_lost_and_the_rest_compared(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    """A compare worker holds at most a credit's worth of pairs (8); killed while it holds
    them, exactly those are counted ``compare_lost``; the pairs still waiting in the mirror
    process go to its replacement, and every copy has exactly one fate."""
    proxy = await _proxy(fake, proxy_factory, redis_url)
    (worker,) = _children(proxy.mirror._proc.pid)
    with stopped(worker):
        await _send(proxy, [_small(k) for k in range(12)])

        async def held() -> Any:
            return (await _summary(proxy))["in_flight"]["c"] == 12

        await wait_until(held, 20, what="12 copies in flight behind the stopped worker")
        os.kill(worker, signal.SIGKILL)
    assert await proxy.drained(30)
    tally = (await _summary(proxy))["this_process"]["c"]
    assert tally.get("compare_lost") == 8, tally
    assert tally.get("compared") == 4, tally
    assert _children(proxy.mirror._proc.pid) != [worker], "the dead worker was replaced"
