"""The sample store at its edges: clipped payloads as the review API shows them, paging past the
store's 500-entry read batches, a Redis that accepts connections but never answers, and expired
samples pruned from the flagged index and the labels."""

from __future__ import annotations

import base64
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.buffer.store import Records, SampleStore
from proxy.settings import BufferSettings
from tests.conftest import ADMIN_TOKEN, make_settings, send_infers, wait_until
from tests.fakes import refused_url, start_silent_redis, v2_answer

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def _get(proxy: Any, path: str) -> tuple[int, Any, Any]:
    """GET on the admin plane: (status, JSON body, headers)."""
    async with (
        aiohttp.ClientSession(headers=AUTH) as s,
        s.get(f"http://127.0.0.1:{proxy.admin_port}{path}") as r,
    ):
        return r.status, await r.json(content_type=None), r.headers


async def _one_flagged_sample(proxy: Any) -> tuple[int, Any]:
    """The only flagged sample, as ``GET /api/samples/{id}`` answers it: (status, body)."""
    status, listed, _ = await _get(proxy, "/api/samples?flagged=1")
    assert status == 200 and len(listed) == 1, listed
    status, sample, _ = await _get(proxy, f"/api/samples/{listed[0]['id']}")
    return status, sample


async def _clipping_proxy(
    fake: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    limit: int,
) -> Any:
    """A proxy storing payloads up to ``limit`` bytes; its candidate diverges on every request
    and answers 256 values (a JSON body of several KiB, over the limit)."""
    ref, cand = await fake(size=256), await fake(size=256, drift=1.0)
    buffer = {"redis_url": redis_url, "max_payload_bytes": limit, "spool_dir": tempfile.mkdtemp()}
    settings = make_settings(
        ref.url, redis_url, candidates=[{"name": "int8", "url": cand.url}], buffer=buffer
    )
    proxy = await proxy_factory(settings)
    await send_infers(proxy, ["clip-0"])
    return proxy


async def test_a_body_over_max_payload_bytes_is_stored_as_its_first_bytes(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    limit = 1024
    proxy = await _clipping_proxy(fake, proxy_factory, redis_url, limit)
    status, sample = await _one_flagged_sample(proxy)
    assert status == 200, sample
    payloads = sample["payloads"]
    # The request (under the limit) is whole, as JSON.
    assert payloads["request"] == {
        "json": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [0]}]}
    }
    # Each answer (over it) is its first `limit` bytes, byte for byte what the server sent.
    request = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[0]}]}'
    whole = v2_answer(request, "m", 0.0, size=256)
    assert len(whole) > limit
    ref_body = payloads["reference_body"]
    assert ref_body["bytes"] == limit
    assert base64.b64decode(ref_body["base64"]) == whole[:limit]
    assert payloads["candidate_body"]["bytes"] == limit
    # The verdict itself is whole: every score is there whatever the payload limit.
    assert sample["flagged"] and sample["outputs"][0]["output"] == "scores"


async def test_a_clipped_body_is_marked_truncated_in_the_sample(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    proxy = await _clipping_proxy(fake, proxy_factory, redis_url, 1024)
    status, sample = await _one_flagged_sample(proxy)
    assert status == 200, sample
    ref_body = sample["payloads"]["reference_body"]
    assert ref_body.get("truncated") is True, ref_body.keys()
    assert ref_body["original_bytes"] > ref_body["bytes"] == 1024
    assert "truncated" not in sample["payloads"]["request"]  # under the limit: whole


async def test_a_sample_with_headers_over_the_payload_limit_shows_them_whole(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    proxy = await _clipping_proxy(fake, proxy_factory, redis_url, 64)
    status, sample = await _one_flagged_sample(proxy)
    assert status == 200, sample
    assert ["X-Request-Id", "clip-0"] in sample["payloads"]["request_headers"]  # whole, parsed


def _verdict(i: int, candidate: str, now: float) -> tuple[dict[str, Any], None]:
    meta = {
        "id": f"v{i:05d}-{uuid.uuid4().hex[:6]}",
        "ts": now + i * 0.001,
        "request_id": f"r{i}",
        "candidate": candidate,
        "model": "m",
        "outcome": "compared",
        "flagged": False,
        "severity": 0.0,
        "reason": "",
        "outputs": [{"output": "y", "flagged": False}],
    }
    return meta, None


async def test_paging_past_500_entries_returns_each_verdict_once_newest_first(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    """The store reads the verdict stream 500 entries at a time (proxy/buffer/store.py): 1,203
    verdicts of two candidates, paged 250 at a time through the admin API."""
    now = time.time()
    records: Records = [_verdict(i, "a" if i % 3 else "b", now) for i in range(1203)]
    writer = SampleStore.from_url(redis_url, BufferSettings(), spool=False)
    try:
        assert not await writer.record_many(records)
    finally:
        await writer.close()
    proxy = await proxy_factory(make_settings((await fake()).url, redis_url))

    async def all_pages(query: str) -> tuple[list[str], set[str]]:
        ids: list[str] = []
        totals = set()
        offset = 0
        while True:
            status, page, headers = await _get(
                proxy, f"/api/samples?limit=250&offset={offset}{query}"
            )
            assert status == 200, page
            totals.add(headers["X-Total-Count"])
            if not page:
                return ids, totals
            ids += [item["id"] for item in page]
            offset += len(page)

    ids, totals = await all_pages("")
    assert totals == {"1203"}
    expected = [str(m["id"]) for m, _ in reversed(records)]
    assert ids == expected  # newest first, none twice, none missing across the 500s
    ids, totals = await all_pages("&candidate=b")
    assert totals == {"401"}
    assert ids == [i for i in expected if int(i[1:6]) % 3 == 0]
    status, page, headers = await _get(proxy, "/api/samples?limit=10&offset=1200")
    assert status == 200 and [p["id"] for p in page] == expected[1200:]
    assert headers["X-Total-Count"] == "1203"


@pytest.mark.parametrize("redis_fault", ["silent", "refused"])
async def test_a_redis_that_never_answers_spools_the_verdicts_as_a_refused_one_does(
    fake: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    tmp_path: Path,
    redis_fault: str,
) -> None:
    """A Redis that takes connections and never answers (a hung server, a black-holed network)
    is not a refused one: every call waits for its timeout. The live path answers all the same,
    every verdict waits in the spool, and once that Redis answers again (the silent server turns
    into a relay to the real one) each is written exactly once."""
    silent = await start_silent_redis(redis_url) if redis_fault == "silent" else None
    url = silent.url if silent is not None else refused_url().replace("http", "redis") + "/0"
    ref, cand = await fake(), await fake(drift=1.0)
    settings = make_settings(
        ref.url,
        url,
        candidates=[{"name": "int8", "url": cand.url}],
        buffer={"redis_url": url, "write_timeout_s": 0.3, "spool_dir": str(tmp_path / "spool")},
    )
    try:
        proxy = await proxy_factory(settings)
        await send_infers(proxy, [f"hung-{i}" for i in range(12)])  # every answer a 200
        outbox = proxy.store.outbox
        assert outbox is not None
        await wait_until(lambda: outbox.spooled == 12, what="12 verdicts spooled")
        assert not outbox.lost and proxy.telemetry.tally[("int8", "compared")] == 12
        # The admin plane still answers, and says the store is unavailable rather than hang.
        status, body, _ = await _get(proxy, "/api/samples?flagged=1")
        assert status == 503 and "unavailable" in body["error"], body
        if silent is None:
            return
        assert silent.connections >= 1, "a connection was accepted, never answered"
        silent.relay = True  # Redis answers again

        async def all_in_redis() -> int:
            status, listed, _ = await _get(proxy, "/api/samples?flagged=1&limit=100")
            return len(listed) if status == 200 and len(listed) >= 12 else 0

        await wait_until(all_in_redis, timeout_s=30, what="the spooled verdicts in Redis")
        status, listed, _ = await _get(proxy, "/api/samples?flagged=1&limit=100")
        assert sorted(s["request_id"] for s in listed) == sorted(f"hung-{i}" for i in range(12))
        status, summary, _ = await _get(proxy, "/api/summary")
        assert status == 200 and outbox.replayed == 12
        assert summary["stored_counters"]["int8|compared"] == 12  # counted once each
    finally:
        if silent is not None:
            silent.close()


def _flagged_sample(i: int, now: float) -> tuple[dict[str, Any], dict[str, bytes]]:
    meta = {
        "id": f"s{i}-{uuid.uuid4().hex[:6]}",
        "ts": now + i * 0.001,
        "request_id": f"r{i}",
        "candidate": "c",
        "model": "m",
        "outcome": "compared",
        "flagged": True,
        "severity": 1.0,
        "reason": "scores diverged",
        "outputs": [{"output": "scores", "flagged": True}],
    }
    return meta, {"request": b"{}", "reference_body": b"{}", "candidate_body": b"{}"}


@pytest.mark.parametrize("listed_before", [False, True])
async def test_an_expired_sample_is_pruned_from_the_listing_the_index_and_the_labels(
    redis_url: str, listed_before: bool
) -> None:
    """A flagged sample's hash expires on its own (``sample_ttl_s``, or ``labelled_ttl_s``
    once labelled) while the flagged index and the labels hash still name it: the next
    listing leaves it out and prunes both (proxy/buffer/store.py ``_list_flagged``), and the
    others stay listed with their labels. ``listed_before``: the reader had listed it while
    it was there (its summary cached)."""
    now = time.time()
    records = [_flagged_sample(i, now) for i in range(3)]
    store = SampleStore.from_url(redis_url, BufferSettings(), spool=False)
    try:
        assert not await store.record_many(list(records))
        gone, kept, other = (str(m["id"]) for m, _ in records)
        await store.label(gone, "regression", "", "rita")
        await store.label(kept, "acceptable", "", "rita")
        if listed_before:
            listed = await store.list_samples(flagged=True)
            assert {item["id"] for item in listed} == {gone, kept, other}
        redis, keys = store.redis, store.keys
        assert await redis.delete(keys.sample(gone)) == 1  # as its TTL would
        listed = await store.list_samples(flagged=True)
        assert [item["id"] for item in listed] == [other, kept]  # newest first, without it
        assert [item["label"] and item["label"]["verdict"] for item in listed] == [
            None,
            "acceptable",
        ]
        assert await redis.zscore(keys.flagged, gone) is None
        assert not await redis.hexists(keys.labels, gone)
        assert await redis.hexists(keys.labels, kept)
        assert await redis.zcard(keys.flagged) == 2
    finally:
        await store.close()
