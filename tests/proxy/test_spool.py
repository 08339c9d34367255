"""No verdict lost to a Redis outage: the on-disk spool, its replay, exactly once, and its bound.

Each test runs its own Redis server (the embedded one, on a private state directory) so it can
stop and restart it with its data, as an outage does.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from proxy.buffer.embedded import EmbeddedRedis
from proxy.buffer.keys import KeySchema
from proxy.buffer.records import encode
from proxy.buffer.spool import Spool
from proxy.buffer.store import SampleStore, spool_target
from proxy.settings import BufferSettings
from tests.conftest import make_settings, send_infers, wait_until


async def _store_during_outage(
    dedicated_redis: EmbeddedRedis, settings: BufferSettings
) -> tuple[SampleStore, str]:
    """A store whose Redis has just stopped (as a proxy sees an outage begin), and its URL."""
    url = dedicated_redis.url
    await asyncio.to_thread(dedicated_redis.stop)
    return SampleStore.from_url(url, settings), url


async def _counts(url: str) -> dict[str, Any]:
    """What Redis holds, read the way a reviewer's tools would see it."""
    client = aioredis.Redis.from_url(url)
    keys = KeySchema()
    try:
        # One MULTI: read one by one, a replay landing between the reads mixed two moments (the
        # stream from before it, the index from after it).
        async with client.pipeline(transaction=True) as pipe:
            pipe.xrange(keys.verdicts).hgetall(keys.stats).zcard(keys.flagged)
            entries, raw_stats, flagged = await pipe.execute()
        stats = {k.decode(): int(v) for k, v in raw_stats.items()}
        return {
            "flagged": flagged,
            "stream": len(entries),
            "distinct": len({fields[b"sample"] for _, fields in entries}),
            "stats": stats,
        }
    finally:
        await client.aclose()


def _record(candidate: str = "c", flagged: bool = True, body: bytes = b"{}") -> tuple[Any, Any]:
    meta = {
        "id": uuid.uuid4().hex,
        "ts": time.time(),
        "request_id": "r",
        "candidate": candidate,
        "model": "m",
        "outcome": "compared",
        "flagged": flagged,
        "severity": 1.0,
        "reason": "",
        "outputs": [{"output": "y", "flagged": flagged}],
    }
    return meta, ({"request": body} if flagged else None)


async def test_redis_outage_under_traffic_loses_no_verdict(
    fake: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    dedicated_redis: EmbeddedRedis,
    tmp_path: Path,
) -> None:
    """A candidate that diverges on every request; Redis stopped for most of them and restarted
    with its data: every compared copy is a flagged sample in Redis, each exactly once."""
    ref, drifted = await fake(), await fake(drift=1.0)
    settings = make_settings(
        ref.url,
        dedicated_redis.url,
        candidates=[{"name": "int8", "url": drifted.url}],
        buffer={
            "redis_url": dedicated_redis.url,
            "write_timeout_s": 0.5,
            "spool_dir": str(tmp_path / "spool"),
        },
    )
    proxy = await proxy_factory(settings)
    url = dedicated_redis.url
    await send_infers(proxy, [f"before-{i}" for i in range(5)])
    await asyncio.to_thread(dedicated_redis.stop)
    await send_infers(proxy, [f"during-{i}" for i in range(30)], first=5)
    assert proxy.store.outbox is not None
    assert proxy.store.outbox.spooled == 30 and not proxy.store.outbox.lost
    await asyncio.to_thread(dedicated_redis.start)
    await send_infers(proxy, [f"after-{i}" for i in range(5)], first=35)

    async def all_there() -> dict[str, Any]:
        counts = await _counts(url)
        return counts if counts["flagged"] >= 40 else {}

    counts = await wait_until(all_there, timeout_s=30, what="every verdict in Redis")
    tally = dict(proxy.telemetry.tally)
    assert counts["flagged"] == counts["stream"] == counts["distinct"] == 40, counts
    assert tally[("int8", "compared")] == 40, tally
    assert counts["stats"]["int8|compared"] == 40
    assert not list((tmp_path / "spool").glob("*.seg")), "replayed segments are deleted"


async def test_a_restart_replays_what_is_still_spooled(
    dedicated_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    settings = BufferSettings(spool_dir=tmp_path / "spool")
    first, url = await _store_during_outage(dedicated_redis, settings)
    lost = await first.record_many([_record() for _ in range(7)])
    assert first.outbox is not None and not lost and first.outbox.spooled == 7
    await first.close()  # the proxy stops while Redis is still down
    assert len(list((tmp_path / "spool").glob("*.seg"))) == 1
    await asyncio.to_thread(dedicated_redis.start)
    second = SampleStore.from_url(url, settings)
    try:
        await second.start()

        async def replayed() -> int:
            return int((await _counts(url))["flagged"] == 7)

        await wait_until(replayed, timeout_s=20, what="the spooled samples replayed")
        assert second.outbox is not None and second.outbox.replayed == 7
    finally:
        await second.close()
    assert not list((tmp_path / "spool").iterdir())


async def test_a_segment_replayed_twice_is_written_once(
    dedicated_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    """A crash between writing a segment to Redis and deleting it replays it again: the write is
    idempotent (samples and verdicts alike), so nothing is counted twice."""
    settings = BufferSettings(spool_dir=tmp_path / "spool")
    url = dedicated_redis.url
    records = [_record() for _ in range(3)] + [_record(flagged=False) for _ in range(2)]
    keys = KeySchema()
    spool = Spool(tmp_path / "spool", settings.spool_max_bytes, target=spool_target(url, keys))
    spool.append([encode(m, p, settings, keys).to_bytes() for m, p in records])
    spool.seal()
    store = SampleStore.from_url(url, settings)
    outbox = store.outbox
    assert outbox is not None
    try:
        await store.start()
        await wait_until(lambda: outbox.replayed == 5, timeout_s=20, what="first replay")
        # The same segment again, as if the process had died before deleting it.
        spool.append([encode(m, p, settings, keys).to_bytes() for m, p in records])
        spool.seal()
        await wait_until(lambda: outbox.replayed == 10, timeout_s=20, what="second replay")
    finally:
        await store.close()
    counts = await _counts(url)
    assert counts["flagged"] == 3 and counts["stream"] == 5
    assert counts["stats"]["c|compared"] == 5 and counts["stats"]["c|m|y|flagged"] == 3


async def test_what_the_spool_cannot_hold_is_counted(
    dedicated_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    settings = BufferSettings(spool_dir=tmp_path / "spool", spool_max_bytes=1024 * 1024)
    store, url = await _store_during_outage(dedicated_redis, settings)
    try:
        big = b"x" * (400 * 1024)
        lost = await store.record_many([_record("c", body=big) for _ in range(4)])
        assert store.outbox is not None and lost == {"c": 2} and store.outbox.spooled == 2
        assert store.outbox.spool.usage() <= settings.spool_max_bytes
        await asyncio.to_thread(dedicated_redis.start)

        async def counted() -> dict[str, Any]:
            counts = await _counts(url)
            return counts if counts["flagged"] == 2 else {}

        # The loss is told to Redis with the next write that gets through.
        await wait_until(counted, timeout_s=20, what="the spooled two replayed")
        await store.record_many([_record("c")])
        assert (await _counts(url))["stats"]["c|spool_full"] == 2
    finally:
        await store.close()


_DIE_MID_SEGMENT = """
import os, sys
from pathlib import Path
from proxy.buffer.spool import Spool
spool = Spool(Path(sys.argv[1]), 1 << 20)
spool.append([b"one", b"two"])
os._exit(0)  # dies holding an open segment: no seal
"""


def test_segments_are_taken_whole_by_one_replayer_and_a_dead_writer_is_not_waited_for(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "spool"
    writer = Spool(directory, 1 << 20)
    writer.append([b"a", b"b"])
    other = Spool(directory, 1 << 20)
    assert other.claim_oldest() is None, "a live writer's open segment is never taken"
    writer.seal()
    subprocess.run([sys.executable, "-c", _DIE_MID_SEGMENT, str(directory)], check=True)
    first = other.claim_oldest()
    assert first is not None and other.read(first) == [b"a", b"b"]
    second = Spool(directory, 1 << 20).claim_oldest()
    assert second is not None and second.path != first.path  # the dead writer's segment
    assert other.claim_oldest() is None, "both taken: nothing is handed out twice"
    other.done(first)
    assert (directory.stat().st_mode & 0o777) == 0o700


def test_a_torn_tail_ends_the_segment_and_is_counted(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    writer = Spool(directory, 1 << 20)
    writer.append([b"whole", b"torn record"])
    writer.seal()
    (segment,) = directory.glob("*.seg")
    with segment.open("r+b") as f:
        f.truncate(segment.stat().st_size - 3)  # a crash in the middle of the last write
    assert (segment.stat().st_mode & 0o777) == 0o600
    reader = Spool(directory, 1 << 20)
    claimed = reader.claim_oldest()
    assert claimed is not None and reader.read(claimed) == [b"whole"] and reader.torn == 1


async def test_flush_on_shutdown_writes_what_is_spooled_once_redis_answers(
    dedicated_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    settings = BufferSettings(spool_dir=tmp_path / "spool")
    store, url = await _store_during_outage(dedicated_redis, settings)
    try:
        await store.record_many([_record() for _ in range(3)])
        assert not await store.flush()  # Redis is still down: it stays on disk
        await asyncio.to_thread(dedicated_redis.start)
        assert await store.flush()
        assert (await _counts(url))["flagged"] == 3
        assert store.outbox is not None and store.outbox.replayed == 3
    finally:
        await store.close()
