"""The sample buffer: verdicts, flagged samples and their payloads in Redis.

One ``SampleStore`` owns one Redis client (``connect``: one server, Sentinel or Cluster). Writes
come from the compare stage only, never from the live path; each batch is one idempotent script
call (three steps on a cluster) under ``buffer.write_timeout_s`` (``records``).

With a spool (``buffer.spool_path()``, the default for a store built by ``from_url``), what
Redis does not take waits on disk and is replayed when it returns, and on the next start
(``outbox``). Without one, a failed write raises ``StoreError`` for the caller to count.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Mapping
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from ..errors import ConfigError, StoreError
from ..settings import BufferSettings
from .connect import RedisClient, redacted, redis_client
from .keys import FIELD_LABEL, FIELD_META, FIELD_SUMMARY, WORKER_MARKER_TTL_S, KeySchema
from .outbox import Outbox
from .records import Encoded, RecordWriter, encode
from .spool import Spool

LABELS = ("acceptable", "regression", "needs-look")

Records = list[tuple[Mapping[str, Any], Mapping[str, bytes] | None]]


class SampleStore:
    def __init__(
        self,
        client: RedisClient,
        settings: BufferSettings,
        keys: KeySchema,
        *,
        spool: Spool | None = None,
    ) -> None:
        self._r = client
        self._cluster = isinstance(client, RedisCluster)
        self._settings = settings
        self.keys = keys
        self._summaries: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._writer = RecordWriter(client, settings, keys)
        self.outbox = Outbox(spool, self._write, self.ping) if spool is not None else None
        """With a spool: spooled, replayed and lost counts for metrics (``outbox``)."""

    @classmethod
    def from_url(
        cls,
        url: str,
        settings: BufferSettings,
        keys: KeySchema | None = None,
        *,
        starvable: bool = False,
        spool: bool = True,
    ) -> SampleStore:
        """``starvable``: for a process at idle CPU priority. Its socket timeouts (wall clock,
        inside redis-py) would fire whenever the host keeps it off the CPU for a while, so it
        has none, and every call is bounded by ``wait_running`` alone. ``spool``: keep what Redis
        does not take on disk under ``buffer.spool_path()`` (nothing is created there until a
        write fails); off for stores that only read (the CLI). ``url``: any URL ``connect``
        takes (one server, Sentinel, Cluster); a malformed one raises ``ConfigError``."""
        try:
            client = redis_client(
                url,
                decode_responses=False,
                socket_timeout=None if starvable else settings.write_timeout_s * 2,
                socket_connect_timeout=None if starvable else settings.write_timeout_s,
                health_check_interval=30,
            )
        except ConfigError as exc:
            raise ConfigError(f"buffer.redis_url: {exc}") from None
        keys = keys or KeySchema()
        disk = None
        if spool:
            disk = Spool(
                settings.spool_path(),
                settings.spool_max_bytes,
                settings.spool_fsync,
                target=spool_target(url, keys),
            )
        return cls(client, settings, keys, spool=disk)

    @property
    def redis(self) -> RedisClient:
        """The client (one pool, or one per cluster node), for the admin plane's sessions, the
        canary and the population statistics. On a cluster, a transaction or a script must
        keep to one hash tag (``keys``)."""
        return self._r

    async def start(self) -> None:
        """Start replaying what an earlier run (or a dead process) left in the spool."""
        if self.outbox is not None:
            self.outbox.start()

    async def close(self) -> None:
        """Stop replaying and seal this process's segment (the next start replays it)."""
        if self.outbox is not None:
            await self.outbox.close()
        await self._r.aclose()

    async def ping(self) -> bool:
        try:
            pong = self._r.ping()  # typed as sync-or-async by redis-py; it is a coroutine here
            assert not isinstance(pong, bool)
            return bool(await asyncio.wait_for(pong, self._settings.write_timeout_s))
        except (RedisError, OSError, TimeoutError):
            return False

    async def _guard(self, coro: Any) -> Any:
        try:
            return await wait_running(coro, self._settings.write_timeout_s)
        except TimeoutError as exc:
            raise StoreError("redis did not answer in time") from exc
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis failed: {exc}") from exc

    async def record(self, meta: Mapping[str, Any], payloads: Mapping[str, bytes] | None) -> None:
        """Append the verdict to the stream; with payloads, store the whole sample under a TTL."""
        await self.record_many([(meta, payloads)])

    async def record_many(self, records: Records, *, idempotent: bool = False) -> Counter[str]:
        """Several verdicts (and samples) in one script call: at hundreds of verdicts a second,
        a round trip each cost more CPU than the comparisons. What Redis does not take goes to
        the spool; returns how many per candidate were lost (the spool was full). Without a
        spool, a failure raises ``StoreError``."""
        batch = [encode(meta, payloads, self._settings, self.keys) for meta, payloads in records]
        if self.outbox is None:
            await self._write(batch, WORKER_MARKER_TTL_S if idempotent else 0, Counter())
            return Counter()
        return await self.outbox.send(batch, idempotent=idempotent)

    async def _write(self, batch: list[Encoded], replay: int, extra: Counter[str]) -> None:
        await self._guard(self._writer.write(batch, replay=replay, extra=extra))

    async def flush(self) -> bool:
        """Replay what is spooled now (on shutdown); whether nothing is left waiting."""
        return True if self.outbox is None else await self.outbox.flush()

    async def list_samples(
        self,
        *,
        flagged: bool,
        candidate: str | None = None,
        limit: int = 100,
        since: float | None = None,
        until: float | None = None,
    ) -> list[dict[str, Any]]:
        """Newest first. Flagged: from the index (full samples); else from the verdict stream."""
        if flagged:
            return await self._list_flagged(candidate, limit, since, until)
        out: list[dict[str, Any]] = []
        # Stream ids start with the entry's millisecond time: the time window maps onto them.
        last = f"{int(until * 1000)}" if until is not None else "+"
        first = f"{int(since * 1000)}" if since is not None else "-"
        while len(out) < limit:
            batch = await self._guard(self._r.xrevrange(self.keys.verdicts, last, first, count=500))
            if not batch:
                break
            for _entry_id, fields in batch:
                item = json.loads(fields[b"json"])
                if candidate is None or item.get("candidate") == candidate:
                    out.append(item)
            last = "(" + batch[-1][0].decode()
            if len(batch) < 500:
                break
        return out[:limit]

    async def _list_flagged(
        self, candidate: str | None, limit: int, since: float | None, until: float | None
    ) -> list[dict[str, Any]]:
        """Flagged samples newest first, label attached.

        Fast on a large index: summaries never change once written, so each is read from Redis
        once and then served from a bounded in-process cache; labels (which do change) come from
        one HMGET on the labels hash. Ids whose sample expired are pruned from the index (the
        page's ids served from the cache are checked in the same round trip).
        """
        hi = until if until is not None else "+inf"
        lo = since if since is not None else "-inf"
        raw_ids = await self._guard(self._r.zrevrangebyscore(self.keys.flagged, hi, lo))
        ids = [i.decode() for i in raw_ids]
        missing = [sid for sid in ids if sid not in self._summaries]
        expired: list[str] = []
        for chunk in range(0, len(missing), 2000):
            part = missing[chunk : chunk + 2000]
            pipe = self._r.pipeline(transaction=False)
            for sid in part:
                # Samples stored before the compact summary existed have only meta.
                pipe.hmget(self.keys.sample(sid), [FIELD_SUMMARY, FIELD_META])
            for sid, (summary, meta) in zip(part, await self._guard(pipe.execute()), strict=True):
                if summary is None and meta is None:
                    expired.append(sid)
                    continue
                item = json.loads(summary or meta)
                item.pop("previews", None)
                self._remember(sid, item)
        if expired:
            await self._guard(self._r.zrem(self.keys.flagged, *expired))
            await self._guard(self._r.hdel(self.keys.labels, *expired))
        gone, fresh = set(expired), set(missing)
        while True:
            chosen = [
                sid
                for sid in ids
                if sid not in gone
                and (candidate is None or self._summaries[sid].get("candidate") == candidate)
            ][:limit]
            if not chosen:
                return []
            # A summary served from the cache may have outlived its sample: the page's cached
            # ids are checked in the round trip that reads their labels.
            cached = [sid for sid in chosen if sid not in fresh]
            pipe = self._r.pipeline(transaction=False)
            for sid in cached:
                pipe.exists(self.keys.sample(sid))
            pipe.hmget(self.keys.labels, chosen)
            *alive, labels = await self._guard(pipe.execute())
            lapsed = [sid for sid, there in zip(cached, alive, strict=True) if not there]
            if not lapsed:
                break
            await self._guard(self._r.zrem(self.keys.flagged, *lapsed))
            await self._guard(self._r.hdel(self.keys.labels, *lapsed))
            gone.update(lapsed)
            for sid in lapsed:
                self._summaries.pop(sid, None)
        return [
            {**self._summaries[sid], "label": json.loads(label) if label else None}
            for sid, label in zip(chosen, labels, strict=True)
        ]

    def _remember(self, sid: str, summary: dict[str, Any]) -> None:
        self._summaries[sid] = summary
        while len(self._summaries) > self._settings.flagged_index_max:
            self._summaries.popitem(last=False)

    async def get_sample(self, sample_id: str) -> dict[str, Any] | None:
        raw = await self._guard(self._r.hgetall(self.keys.sample(sample_id)))
        if not raw:
            return None
        fields = {k.decode(): v for k, v in raw.items()}
        fields.pop(FIELD_SUMMARY, None)
        sample: dict[str, Any] = json.loads(fields.pop(FIELD_META))
        label = fields.pop(FIELD_LABEL, None)
        sample["label"] = json.loads(label) if label else None
        sample["payloads"] = fields
        return sample

    async def label(self, sample_id: str, verdict: str, note: str, who: str) -> dict[str, Any]:
        """Label a stored sample; it then lives ``buffer.labelled_ttl_s`` from now (golden-set
        material, kept past ``sample_ttl_s``, but not forever)."""
        if verdict not in LABELS:
            raise ValueError(f"verdict must be one of {', '.join(LABELS)}, got {verdict!r}")
        key = self.keys.sample(sample_id)
        label = {"verdict": verdict, "note": note, "by": who, "at": time.time()}
        if not await self._guard(self._r.exists(key)):
            raise KeyError(sample_id)
        if self._cluster:
            # The sample and the labels hash are in different slots: the labels hash first, so
            # that a failure between the two leaves a sample that lists as labelled and is
            # spared by trimming (its own hash gets the label when the caller retries).
            await self._guard(self._r.hset(self.keys.labels, sample_id, json.dumps(label)))
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(key, FIELD_LABEL, json.dumps(label))
        if not self._cluster:
            pipe.hset(self.keys.labels, sample_id, json.dumps(label))
        pipe.expire(key, self._settings.labelled_ttl_s)
        await self._guard(pipe.execute())
        return label

    async def delete(self, sample_id: str) -> bool:
        """Remove a sample, its label and its index entry; whether it existed. Its verdict (the
        scores, no payloads) stays in the stream until the stream is trimmed."""
        key = self.keys.sample(sample_id)
        # On a cluster the sample's hash goes first, by itself (its own slot), then the index's
        # keys (theirs): a failure between the two leaves an id whose hash is gone, which
        # listing prunes.
        existed = await self._guard(self._r.delete(key)) if self._cluster else None
        pipe = self._r.pipeline(transaction=True)
        if not self._cluster:
            pipe.delete(key)
        pipe.hdel(self.keys.labels, sample_id)
        pipe.zrem(self.keys.flagged, sample_id)
        pipe.zrem(self.keys.kept, sample_id)
        replies = await self._guard(pipe.execute())
        self._summaries.pop(sample_id, None)
        return bool(replies[0] if existed is None else existed)

    async def mark_exported(self, sample_ids: list[str]) -> None:
        """Exported labelled samples live in the golden set now: give them their TTL back."""
        pipe = self._r.pipeline(transaction=False)
        for sid in sample_ids:
            pipe.expire(self.keys.sample(sid), self._settings.sample_ttl_s)
        await self._guard(pipe.execute())

    async def stats(self) -> dict[str, int]:
        raw = await self._guard(self._r.hgetall(self.keys.stats))
        return {k.decode(): int(v) for k, v in raw.items()}

    async def recent_verdicts(self, count: int) -> list[dict[str, Any]]:
        batch = await self._guard(self._r.xrevrange(self.keys.verdicts, "+", "-", count=count))
        return [json.loads(fields[b"json"]) for _, fields in batch]


def spool_target(url: str, keys: KeySchema) -> str:
    """A short name for the Redis and namespace a spool's records are for (the URL without its
    credentials, hashed): it goes into segment file names, and a new password must not orphan
    what waits there."""
    where = re.sub(r"//[^@/]*@", "//", url)
    if "sentinel_password=" in where:
        where = redacted(where)
    return hashlib.sha256(f"{where}|{keys.namespace}".encode()).hexdigest()[:12]


# A timeout that fires this late found the process starved rather than Redis slow.
_LATE_S = 0.05
# However starved, a call ends after this many timeouts.
_MAX_ROUNDS = 10


async def wait_running(aw: Awaitable[Any], timeout_s: float) -> Any:
    """``asyncio.wait_for`` that counts only time this process could run.

    The compare workers run at idle CPU priority: on a busy host they may not run for seconds,
    and then every timer is overdue when they wake, before the event loop has read the answers
    that arrived meanwhile (or even sent the request). A timeout that fires late starts the
    wait again, up to ``_MAX_ROUNDS`` times: a starved worker does not count a write as failed
    that Redis could not have answered in time, and a dead Redis still fails it.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(aw)
    deadline = loop.time() + timeout_s
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    rounds = 1
    while not done and loop.time() - deadline > _LATE_S and rounds < _MAX_ROUNDS:
        rounds += 1
        deadline = loop.time() + timeout_s
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise TimeoutError
    return task.result()
