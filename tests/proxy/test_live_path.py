"""The live path: transparent, and never hurt by the shadow side."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from proxy.shadow.mirror import MirrorScheduler
from tests.conftest import make_settings, wait_until
from tests.fakes import refused_url

BODY = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,2],"data":[1,2]}]}'


async def _post(url: str, body: bytes, headers: dict[str, str] | None = None) -> Any:
    async with (
        aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=("Accept-Encoding",)) as s,
        s.post(url, data=body, headers=headers or {}) as r,
    ):
        return r.status, dict(r.headers), await r.read()


async def test_gzip_request_and_response_pass_through_untouched(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref = await fake()
    proxy = await proxy_factory(make_settings(ref.url, redis_url))
    url = f"http://127.0.0.1:{proxy.data_port}/v2/models/m/infer"
    gz = gzip.compress(BODY)
    status, _, _ = await _post(url, gz, {"Content-Encoding": "gzip"})
    assert status == 200
    # The reference saw the client's compressed bytes and header, not a decompressed copy.
    assert ref.behaviour.seen_headers[-1]["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" not in ref.behaviour.seen_headers[-1]


@pytest.mark.parametrize(
    ("mode", "status", "word"),
    [("refused", 503, "cannot connect"), ("slow", 504, "timed out"), ("reset", 502, "closed")],
)
async def test_reference_failures_get_v2_errors_naming_the_upstream(
    fake: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    mode: str,
    status: int,
    word: str,
) -> None:
    if mode == "refused":
        url = refused_url()
    else:
        url = (await fake(mode=mode, delay_s=2.0 if mode == "slow" else 0)).url
    settings = make_settings(
        url, redis_url, reference={"name": "ref", "url": url, "timeout_s": 0.5}
    )
    proxy = await proxy_factory(settings)
    got_status, headers, body = await _post(
        f"http://127.0.0.1:{proxy.data_port}/v2/models/m/infer", BODY
    )
    assert got_status == status
    assert headers["Content-Type"].startswith("application/json")
    import json

    message = json.loads(body)["error"]
    assert "upstream 'ref'" in message and url in message and word in message


@pytest.mark.parametrize("mode", ["slow", "refused", "garbage", "error", "reset"])
async def test_a_broken_candidate_changes_neither_answer_nor_latency(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str, mode: str
) -> None:
    ref = await fake()
    # The candidate (but a refused one) receives its copy and answers only when released: the
    # live answer arriving before that proves the client never waited for the shadow side.
    hold = asyncio.Event()
    cand = None if mode == "refused" else await fake(mode=mode, delay_s=0.3, hold=hold)
    cand_url = refused_url() if cand is None else cand.url
    candidates = [{"name": "c", "url": cand_url, "timeout_s": 5}]
    proxy = await proxy_factory(make_settings(ref.url, redis_url, candidates=candidates))
    url = f"http://127.0.0.1:{proxy.data_port}/v2/models/m/infer"
    direct = await _post(f"{ref.url}/v2/models/m/infer", BODY)
    via = await _post(url, BODY)
    assert via[0] == direct[0] and via[2] == direct[2]
    if cand is not None:
        # The client has its answer; its copy is at the candidate, unanswered.
        await wait_until(lambda: cand.behaviour.in_flight == 1, what="the copy held there")
        assert cand.behaviour.calls == 1
    hold.set()
    assert await proxy.drained(10)
    tally = proxy.telemetry.tally
    expected = {
        "slow": "compared",
        "refused": "unavailable",
        "garbage": "candidate_invalid",
        "error": "status_mismatch",
        "reset": "bad_response",
    }[mode]
    assert tally[("c", expected)] == 1, dict(tally)


async def test_redis_down_keeps_the_live_path_and_spools_the_samples(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any]
) -> None:
    ref = await fake()
    cand = await fake(drift=1.0)
    dead_redis = refused_url().replace("http", "redis") + "/0"
    candidates = [{"name": "c", "url": cand.url}]
    proxy = await proxy_factory(make_settings(ref.url, dead_redis, candidates=candidates))
    url = f"http://127.0.0.1:{proxy.data_port}/v2/models/m/infer"
    for _ in range(3):
        status, _, body = await _post(url, BODY)
        assert status == 200 and b"outputs" in body
    assert await proxy.drained(10)
    # Nothing lost: the verdicts wait on disk for Redis (test_spool replays them).
    await wait_until(lambda: proxy.store.outbox.spooled == 3, 10, what="3 verdicts spooled")
    assert proxy.telemetry.tally[("c", "store_failed")] == 0
    metrics = proxy.telemetry.prometheus_text().decode()
    assert 'shadowproxy_spool_records{state="spooled"} 3.0' in metrics, metrics


async def test_copies_beyond_max_in_flight_wait_and_are_all_compared(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref = await fake()
    cand = await fake(mode="slow", delay_s=0.3)
    candidates = [{"name": "c", "url": cand.url, "max_in_flight": 2}]
    proxy = await proxy_factory(make_settings(ref.url, redis_url, candidates=candidates))
    url = f"http://127.0.0.1:{proxy.data_port}/v2/models/m/infer"
    results = await asyncio.gather(*(_post(url, BODY) for _ in range(6)))
    assert all(r[0] == 200 for r in results)
    assert await proxy.drained(10)
    tally = proxy.telemetry.tally
    assert tally[("c", "compared")] == 6  # none dropped: they waited their turn
    assert cand.behaviour.peak_in_flight == 2  # and the bound on calls held


async def test_copies_older_than_the_queue_age_are_dropped_and_counted(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref = await fake()
    cand = await fake(mode="slow", delay_s=0.3)
    candidates = [{"name": "c", "url": cand.url, "max_in_flight": 1}]
    proxy = await proxy_factory(
        make_settings(
            ref.url,
            redis_url,
            candidates=candidates,
            proxy={
                "drain_timeout_s": 2,
                "shed_lag_ms": 0,
                "mirror_process": False,
                "mirror_queue_age_s": 1.0,
            },
        )
    )
    url = f"http://127.0.0.1:{proxy.data_port}/v2/models/m/infer"
    # Six copies, one at a time, 0.3 s each: the last ones cannot start within a second.
    results = await asyncio.gather(*(_post(url, BODY) for _ in range(6)))
    assert all(r[0] == 200 for r in results)
    assert await proxy.drained(10)
    tally = proxy.telemetry.tally
    assert tally[("c", "compared")] >= 1
    assert tally[("c", "dropped_queue_age")] >= 1
    assert tally[("c", "compared")] + tally[("c", "dropped_queue_age")] == 6


async def test_copies_that_would_overfill_the_queue_are_dropped_and_counted(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref = await fake()
    cand = await fake(mode="slow", delay_s=0.5)
    candidates = [{"name": "c", "url": cand.url, "max_in_flight": 1}]
    proxy = await proxy_factory(
        make_settings(
            ref.url,
            redis_url,
            candidates=candidates,
            proxy={
                "drain_timeout_s": 5,
                "shed_lag_ms": 0,
                "mirror_process": False,
                "mirror_queue_bytes": 1024 * 1024,
            },
        )
    )
    url = f"http://127.0.0.1:{proxy.data_port}/v2/models/m/infer"
    # Bodies of 400 kB: one is called at a time, two more fit the 1 MiB queue, the rest do not.
    big = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,200000],"data":[%s]}]}' % (
        b",".join([b"0"] * 200_000)
    )
    results = await asyncio.gather(*(_post(url, big) for _ in range(6)))
    assert all(r[0] == 200 for r in results)
    assert await proxy.drained(10)
    tally = proxy.telemetry.tally
    assert tally[("c", "dropped_queue_bytes")] >= 1
    assert tally[("c", "compared")] >= 3
    assert tally[("c", "compared")] + tally[("c", "dropped_queue_bytes")] == 6


async def test_64_mib_infer_body_is_forwarded_and_mirrored(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await fake(), await fake()
    candidates = [{"name": "c", "url": cand.url}]
    proxy = await proxy_factory(make_settings(ref.url, redis_url, candidates=candidates))
    header = b'{"inputs":[{"name":"x","datatype":"UINT8","shape":[67108000],'
    header += b'"parameters":{"binary_data_size":67108000}}]}'
    body = header + b"\x01" * 67108000  # about 64 MiB in all
    status, _, answer = await _post(
        f"http://127.0.0.1:{proxy.data_port}/v2/models/m/infer",
        body,
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 200 and b"outputs" in answer
    assert await proxy.drained(30)
    assert cand.behaviour.calls == 1 and proxy.telemetry.tally[("c", "compared")] == 1


async def test_large_bodies_stream_both_ways(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref = await fake()
    proxy = await proxy_factory(make_settings(ref.url, redis_url))
    base = f"http://127.0.0.1:{proxy.data_port}"

    async def chunks() -> Any:
        for _ in range(80):  # 80 MiB unsized upload (chunked), beyond client_max_size
            yield b"\x02" * (1024 * 1024)

    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.put(f"{base}/upload", data=chunks()) as r:
            assert r.status == 200 and (await r.json())["received"] == 80 * 1024 * 1024
        async with s.get(f"{base}/big?chunks=64") as r, s.get(f"{ref.url}/big?chunks=64") as d:
            assert r.status == d.status == 200
            assert "Content-Length" not in r.headers  # streamed (chunked), like the reference
            assert await r.read() == await d.read()


def _burn(seconds: float) -> None:
    """Hold the CPU (and the event loop) for ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def test_overload_sheds_mirrors_and_keeps_serving(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await fake(), await fake()
    settings = make_settings(
        ref.url,
        redis_url,
        candidates=[{"name": "c", "url": cand.url}],
        proxy={"drain_timeout_s": 2, "shed_lag_ms": 5, "mirror_process": False},
    )
    proxy = await proxy_factory(settings)
    url = f"http://127.0.0.1:{proxy.data_port}/v2/models/m/infer"
    assert (await _post(url, BODY))[0] == 200
    assert await proxy.drained(10)
    assert proxy.telemetry.tally[("c", "compared")] == 1  # a quiet loop mirrors
    loop = asyncio.get_running_loop()
    # The loop kept 30 ms late, repeatedly, but off the CPU (as when other processes have it):
    # not this process's overload, so copying costs it little and nothing is shed.
    for _ in range(5):
        hog = loop.call_later(0.005, time.sleep, 0.03)
        await asyncio.sleep(0.04)
        assert (await _post(url, BODY))[0] == 200
    assert await proxy.drained(10)
    assert proxy.telemetry.tally[("c", "dropped_overload")] == 0
    assert proxy.telemetry.tally[("c", "compared")] == 6
    # One long stall on the CPU (a first connection or an import as a proxy starts) is not
    # overload: the copies right after it are made.
    burnt = asyncio.Event()
    loop.call_soon(lambda: (_burn(0.2), burnt.set()))
    await burnt.wait()  # the stall is over before the requests come
    for _ in range(3):
        assert (await _post(url, BODY))[0] == 200
    assert await proxy.drained(10)
    assert proxy.telemetry.tally[("c", "dropped_overload")] == 0
    assert proxy.telemetry.tally[("c", "compared")] == 9
    # Something CPU-bound keeps the loop 30 ms late, repeatedly: the proxy is overloaded. (The
    # guard sheds only when the loop's own thread had the CPU: on a host where other processes
    # took much of it, a burst is not this process's overload, so bursts go on, up to six, until
    # the guard has shed three copies; a guard that never sheds fails.)
    shares = []
    for _attempt in range(6):
        cpu, wall = time.thread_time(), time.perf_counter()
        for _ in range(10):
            hog = loop.call_later(0.005, _burn, 0.03)
            await asyncio.sleep(0.04)
            assert (await _post(url, BODY))[0] == 200  # live traffic is still served
        hog.cancel()
        shares.append(round((time.thread_time() - cpu) / (time.perf_counter() - wall), 2))
        if proxy.telemetry.tally[("c", "dropped_overload")] >= 3:
            break
    assert await proxy.drained(10)
    assert proxy.telemetry.tally[("c", "dropped_overload")] >= 3, f"CPU shares {shares}"
    # The lag reading decays once the loop is on time again; then copies are made again.
    scheduler = proxy.mirror
    assert isinstance(scheduler, MirrorScheduler) and scheduler._lag is not None
    lag = scheduler._lag
    await wait_until(lambda: not lag.overloaded(), what="the loop on time again")
    compared = proxy.telemetry.tally[("c", "compared")]
    assert (await _post(url, BODY))[0] == 200
    assert await proxy.drained(10)
    assert proxy.telemetry.tally[("c", "compared")] == compared + 1


async def test_a_dead_candidate_trips_its_circuit_breaker(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref = await fake()
    dead = {"name": "c", "url": refused_url(), "breaker_failures": 3, "breaker_open_s": 0.3}
    proxy = await proxy_factory(make_settings(ref.url, redis_url, candidates=[dead]))
    url = f"http://127.0.0.1:{proxy.data_port}/v2/models/m/infer"
    loop = asyncio.get_running_loop()
    for i in range(10):
        if i == 2:
            before_opening = loop.time()  # the third failure, during this request, opens it
        assert (await _post(url, BODY))[0] == 200
        assert await proxy.drained(10)
    tally = proxy.telemetry.tally
    assert tally[("c", "unavailable")] == 3  # three tries, then the circuit opens...
    assert tally[("c", "dropped_circuit_open")] == 7  # ...and copies skip the doomed connect
    # Copies go on being skipped until the open period ends; then one probes the candidate.
    sent = 0

    async def probed() -> bool:
        nonlocal sent
        assert (await _post(url, BODY))[0] == 200
        assert await proxy.drained(10)
        sent += 1
        return bool(tally[("c", "unavailable")] == 4)

    await wait_until(probed, timeout_s=10, interval_s=0.03, what="a probe after the open period")
    assert loop.time() - before_opening >= 0.3  # not before the open period was over
    assert tally[("c", "dropped_circuit_open")] == 7 + sent - 1  # every copy before it skipped
    assert (await _post(url, BODY))[0] == 200
    assert await proxy.drained(10)
    assert tally[("c", "unavailable")] == 4  # the probe failed: open again
    assert tally[("c", "dropped_circuit_open")] == 7 + sent
