"""Mirroring in a worker process (the default for ``serve``): same results, isolated from live."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import ADMIN_TOKEN, make_settings, wait_until

BODY = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,2],"data":[1,2]}]}'
PROCESS = {"drain_timeout_s": 2, "shed_lag_ms": 0, "mirror_process": True}


async def _post(port: int, request_id: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"http://127.0.0.1:{port}/v2/models/m/infer",
            data=BODY,
            headers={"X-Request-Id": request_id},
        ) as r,
    ):
        return r.status, await r.read()


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


async def _population(port: int, done: Callable[[list[dict[str, Any]]], bool]) -> Any:
    """``/api/summary`` once its population rows (read from Redis) satisfy ``done``."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        summary = await _admin(port, "/api/summary")
        if done(summary["population"] or []):
            return summary
        assert asyncio.get_running_loop().time() < deadline, summary["population"]
        await asyncio.sleep(0.2)


async def _admin(port: int, path: str) -> Any:
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with (
        aiohttp.ClientSession(headers=auth) as s,
        s.get(f"http://127.0.0.1:{port}{path}") as r,
    ):
        assert r.status == 200
        return await (r.json() if path.startswith("/api") else r.text())


async def test_worker_mirrors_compares_and_stores(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    # The slow candidate answers only once released: every client has its answer before.
    hold = asyncio.Event()
    ref, drifted = await fake(), await fake(drift=0.5)
    slow = await fake(mode="slow", delay_s=0.3, hold=hold)
    candidates = [{"name": "int8", "url": drifted.url}, {"name": "slow", "url": slow.url}]
    proxy = await proxy_factory(
        make_settings(ref.url, redis_url, candidates=candidates, proxy=PROCESS)
    )
    for i in range(3):
        status, body = await _post(proxy.data_port, f"w{i}")
        assert status == 200 and b"outputs" in body
    await _post(proxy.data_port, "adm")  # and one admin-route request, never mirrored:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"http://127.0.0.1:{proxy.data_port}/v2/repository/index", data=b"{}") as r,
    ):
        assert r.status == 404  # the fake has no such route: the reference's answer
    # All four copies reached the slow candidate and none is answered: the clients did not
    # wait for it.
    await wait_until(lambda: slow.behaviour.in_flight == 4, 15, what="4 copies held")
    hold.set()
    assert await proxy.drained(15)
    flagged = await proxy.store.list_samples(flagged=True, candidate="int8")
    assert sorted(s["request_id"] for s in flagged) == ["adm", "w0", "w1", "w2"]
    summary = await _admin(proxy.admin_port, "/api/summary")
    assert summary["mirror_worker"] != "in-process"
    # The mirror process calls and times candidates at the live path's priority; its compare
    # workers run only on CPU nothing else wants (SCHED_IDLE on Linux).
    mirror_pid = proxy.mirror._proc.pid
    assert os.sched_getscheduler(mirror_pid) == os.SCHED_OTHER
    workers = _children(mirror_pid)
    assert len(workers) == 1
    assert all(os.sched_getscheduler(pid) == os.SCHED_IDLE for pid in workers)
    assert summary["this_process"]["int8"]["compared"] == 4
    assert summary["this_process"]["slow"]["compared"] == 4
    assert summary["this_process"]["*"]["skipped:admin_route"] == 1
    # Each compare worker adds its statistics to Redis every second.
    summary = await _population(proxy.admin_port, lambda rows: len(rows) == 2)
    assert {p["candidate"] for p in summary["population"]} == {"int8", "slow"}
    text = await _admin(proxy.admin_port, "/metrics")
    assert 'shadowproxy_mirror_outcomes_total{candidate="int8",outcome="compared"} 4.0' in text
    assert "shadowproxy_requests_total" in text
    families = [line for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(families) == len(set(families))  # each family from exactly one process


async def test_a_dead_worker_never_breaks_the_live_path_and_comes_back(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await fake(), await fake(drift=0.5)
    proxy = await proxy_factory(
        make_settings(
            ref.url, redis_url, candidates=[{"name": "c", "url": cand.url}], proxy=PROCESS
        )
    )
    assert (await _post(proxy.data_port, "before"))[0] == 200
    assert await proxy.drained(15)
    pid = proxy.mirror._proc.pid
    os.kill(pid, signal.SIGKILL)

    async def restarted() -> bool:
        snap = await proxy.mirror.snapshot()
        return bool(proxy.mirror._proc.pid != pid and snap["worker"] != "down")

    await wait_until(lambda: not proxy.mirror._up(), what="the live process sees it down")
    for i in range(3):
        assert (await _post(proxy.data_port, f"during{i}"))[0] == 200
    dropped = proxy.telemetry.tally[("c", "dropped_worker_down")]
    assert dropped >= 1
    await wait_until(restarted, what="a new mirror process")  # after a second
    assert (await _post(proxy.data_port, "after"))[0] == 200
    assert await proxy.drained(15)
    ids = {s["request_id"] for s in await proxy.store.list_samples(flagged=True)}
    assert {"before", "after"} <= ids
    # Each copy sent while it was down was dropped and counted (or, had the new process come
    # up meanwhile, compared): none lost, none counted twice.
    assert dropped + len({i for i in ids if i.startswith("during")}) == 3


async def test_over_its_cpu_budget_the_shadow_side_queues_and_only_age_drops(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    # Answers of 20,000 values cost milliseconds to compare; with a hundredth of a core for the
    # shadow side, a few copies a second fit, so most wait until they are too old.
    ref, cand = await fake(size=20_000), await fake(size=20_000)
    tight = {**PROCESS, "mirror_cpu_budget": 0.01, "mirror_queue_age_s": 1.0}
    proxy = await proxy_factory(
        make_settings(ref.url, redis_url, candidates=[{"name": "c", "url": cand.url}], proxy=tight)
    )
    for i in range(100):
        assert (await _post(proxy.data_port, f"b{i}"))[0] == 200
        await asyncio.sleep(0.02)  # spread over several budget and pace windows
    assert await proxy.drained(15)
    summary = await _admin(proxy.admin_port, "/api/summary")
    outcomes = summary["this_process"]["c"]
    assert outcomes.get("compared", 0) >= 1, outcomes
    assert outcomes.get("dropped_queue_age", 0) >= 1, outcomes
    # Being over budget is no reason to drop by itself: only the queue's bounds drop copies.
    assert not {k for k in outcomes if k.startswith("dropped_")} - {
        "dropped_queue_age",
        "dropped_worker_budget",
    }, outcomes
    # Once the queue dropped copies, the mirror process paced the live side, which then dropped
    # copies it would certainly have dropped, unsent.
    assert outcomes.get("dropped_worker_budget", 0) >= 1, outcomes
    accounted = outcomes["compared"] + outcomes["dropped_queue_age"]
    assert accounted + outcomes["dropped_worker_budget"] == 100, outcomes
    # The reviewer is told, with the setting that would fix it.
    coverage = summary["coverage"]["c"]
    assert coverage["sampled"] == 100 and coverage["compared"] == outcomes["compared"]
    assert coverage["recent"]["coverage"] < 0.95
    assert "proxy.mirror_cpu_budget" in coverage["warning"], coverage
    text = await _admin(proxy.admin_port, "/metrics")
    ratio = f"{outcomes['compared'] / 100!r}"
    assert f'shadowproxy_mirror_coverage_ratio{{candidate="c",window="total"}} {ratio}' in text


async def test_a_busy_host_delays_copies_but_drops_none(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    """A CPU burner at normal priority keeps a core busy: the idle-priority compare worker then
    runs late, and its copies wait for it; none is dropped for that (default settings)."""
    ref, cand = await fake(), await fake(drift=0.5)
    proxy = await proxy_factory(
        make_settings(
            ref.url,
            redis_url,
            candidates=[{"name": "c", "url": cand.url}],
            # The live loop here is the test's own, shared with its client: its lag would be the
            # client's. What is under test is the shadow side, which must not drop for lag.
            proxy={"drain_timeout_s": 2, "mirror_process": True, "shed_lag_ms": 0},
            buffer={"redis_url": redis_url, "write_timeout_s": 3},
        )
    )
    burner = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time\nend = time.time() + 60\nwhile time.time() < end: pass"
    )
    try:
        for i in range(60):  # 20 a second: well within the default budget
            assert (await _post(proxy.data_port, f"busy{i}"))[0] == 200
            await asyncio.sleep(0.05)
        assert await proxy.drained(30)
    finally:
        burner.kill()
        await burner.wait()
    summary = await _admin(proxy.admin_port, "/api/summary")
    outcomes = summary["this_process"]["c"]
    assert outcomes == {"compared": 60, "stored": 60}, outcomes
    coverage = summary["coverage"]["c"]
    assert coverage["coverage"] == 1.0 and coverage["warning"] is None, coverage
    flagged = await proxy.store.list_samples(flagged=True, limit=100)
    assert len(flagged) == 60


async def test_several_compare_workers_share_the_work_and_report_as_one(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await fake(), await fake(drift=0.5)
    proxy = await proxy_factory(
        make_settings(
            ref.url,
            redis_url,
            candidates=[{"name": "c", "url": cand.url}],
            proxy={**PROCESS, "mirror_workers": 2},
        )
    )
    workers = _children(proxy.mirror._proc.pid)
    assert len(workers) == 2
    for i in range(20):
        assert (await _post(proxy.data_port, f"m{i}"))[0] == 200
    assert await proxy.drained(15)
    text = await _admin(proxy.admin_port, "/metrics")
    # Each worker counted its own comparisons; /metrics shows their sum, each family once.
    assert 'shadowproxy_mirror_outcomes_total{candidate="c",outcome="compared"} 20.0' in text
    families = [line for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(families) == len(set(families))
    summary = await _admin(proxy.admin_port, "/api/summary")
    assert summary["this_process"]["c"]["compared"] == 20
    summary = await _population(
        proxy.admin_port, lambda rows: sum(row["samples"] for row in rows) >= 20
    )
    assert sum(row["samples"] for row in summary["population"]) == 20  # merged statistics
    # A compare worker that dies is replaced; copies after that are compared again.
    os.kill(workers[0], signal.SIGKILL)

    def replaced() -> bool:
        now = _children(proxy.mirror._proc.pid)
        return len(now) == 2 and workers[0] not in now

    await wait_until(replaced, what="the dead compare worker replaced")
    for i in range(10):
        assert (await _post(proxy.data_port, f"after{i}"))[0] == 200
    assert await proxy.drained(15)
    ids = {s["request_id"] for s in await proxy.store.list_samples(flagged=True, limit=100)}
    summary = await _admin(proxy.admin_port, "/api/summary")
    assert {f"after{i}" for i in range(10)} <= ids, summary["this_process"]
