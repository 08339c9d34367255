"""The sample buffer: verdicts, flagged samples and their payloads in Redis.

One ``SampleStore`` owns one ``redis.asyncio`` client (its connection pool). Writes come from the
compare stage only, never from the live path; each batch is one idempotent script call under
``buffer.write_timeout_s`` (``records``).

With a spool (``buffer.spool_path()``, the default for a store built by ``from_url``), a batch
Redis does not take goes to disk instead, and so does every batch after it until a background
task finds Redis answering again: it then replays the spool's segments oldest first (this
process's and any another process left behind), while new verdicts go straight to Redis again.
A restart replays what is still spooled (``start``). Only what the spool cannot hold is lost,
counted per candidate (``lost`` and the ``{candidate}|spool_full`` counter in Redis). Without a
spool a failed write raises ``StoreError`` for the caller to count.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..errors import StoreError
from ..settings import BufferSettings
from .keys import FIELD_LABEL, FIELD_META, FIELD_SUMMARY, KeySchema, spool_full_stat
from .records import Encoded, RecordWriter, encode
from .spool import Spool

LABELS = ("acceptable", "regression", "needs-look")
log = logging.getLogger("shadowproxy.store")
T = TypeVar("T")

Records = list[tuple[Mapping[str, Any], Mapping[str, bytes] | None]]
# Records replayed per script call, and how often the replay task looks: soon while verdicts
# wait on disk, rarely otherwise (for segments another process left behind).
_REPLAY_BATCH = 128
_REPLAY_BUSY_S = 0.5
_REPLAY_IDLE_S = 5.0


class SampleStore:
    def __init__(
        self,
        client: aioredis.Redis,
        settings: BufferSettings,
        keys: KeySchema,
        *,
        spool: Spool | None = None,
    ) -> None:
        self._r = client
        self._settings = settings
        self.keys = keys
        self._summaries: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._writer = RecordWriter(client, settings, keys)
        self.spool = spool
        # One thread for the spool's file I/O: appends, seals and replays stay in order.
        self._disk = ThreadPoolExecutor(1, thread_name_prefix="spool") if spool else None
        self._down = False
        """Redis failed a write: batches go to the spool until the replay task drained it."""
        self._replayer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._replaying = asyncio.Lock()  # the replay task and ``flush`` take turns
        self._unflushed_full: Counter[str] = Counter()
        self.spooled = 0
        self.replayed = 0
        self.lost: Counter[str] = Counter()
        """Per candidate: verdicts refused by a full spool (lost)."""

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
        write fails); off for stores that only read (the CLI)."""
        client = aioredis.Redis.from_url(
            url,
            decode_responses=False,
            socket_timeout=None if starvable else settings.write_timeout_s * 2,
            socket_connect_timeout=None if starvable else settings.write_timeout_s,
            health_check_interval=30,
        )
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
    def redis(self) -> aioredis.Redis:
        """The client (one pool), for the admin plane's sessions."""
        return self._r

    async def start(self) -> None:
        """Start replaying what an earlier run (or a dead process) left in the spool."""
        if self.spool is not None and self._replayer is None:
            self._replayer = asyncio.get_running_loop().create_task(self._replay_loop())

    async def close(self) -> None:
        """Stop replaying and seal this process's segment (the next start replays it)."""
        if self._replayer is not None:
            self._replayer.cancel()
            await asyncio.gather(self._replayer, return_exceptions=True)
            self._replayer = None
        if self.spool is not None and self._disk is not None:
            await self._on_disk(self.spool.close)
            self._disk.shutdown(wait=True)
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

    async def record_many(self, records: Records) -> Counter[str]:
        """Several verdicts (and samples) in one script call: at hundreds of verdicts a second,
        a round trip each cost more CPU than the comparisons. What Redis does not take goes to
        the spool; returns how many per candidate were lost (the spool was full). Without a
        spool, a failure raises ``StoreError``."""
        batch = [encode(meta, payloads, self._settings, self.keys) for meta, payloads in records]
        if self.spool is None:
            await self._write(batch, replay=False)
            return Counter()
        await self.start()
        if not self._down:
            try:
                await self._write(batch, replay=False)
                return Counter()
            except StoreError as exc:
                log.warning("redis refused %d verdicts (%s): spooling to disk", len(batch), exc)
                self._down = True
                self._wake.set()
        return await self._spool_batch(batch)

    async def _write(self, batch: list[Encoded], *, replay: bool) -> None:
        full = +self._unflushed_full
        extra = Counter({spool_full_stat(c): n for c, n in full.items()})
        await self._guard(self._writer.call(self._writer.args(batch, replay=replay, extra=extra)))
        self._unflushed_full -= full

    async def _spool_batch(self, batch: list[Encoded]) -> Counter[str]:
        assert self.spool is not None
        refused = await self._on_disk(self.spool.append, [r.to_bytes() for r in batch])
        lost = Counter(batch[i].candidate for i in refused)
        if lost:
            log.warning("spool full: %d verdicts lost", len(refused))
        self.spooled += len(batch) - len(refused)
        self.lost += lost
        self._unflushed_full += lost
        return lost

    async def _on_disk(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._disk, fn, *args)

    async def _replay_loop(self) -> None:
        while True:
            try:
                await self._replay_all()
            except StoreError as exc:
                log.info("redis failed again while the spool was replayed: %s", exc)
            except Exception:
                log.exception("replaying the spool failed; trying again")
            delay = _REPLAY_BUSY_S if self._down else _REPLAY_IDLE_S
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _replay_all(self) -> None:
        """Replay every segment nobody holds, oldest first, once Redis answers; then let new
        batches go to Redis again."""
        async with self._replaying:
            await self._replay_segments()

    async def _replay_segments(self) -> None:
        spool = self.spool
        assert spool is not None
        if not (self._down or await self._on_disk(spool.pending)) or not await self.ping():
            return
        await self._on_disk(spool.seal)
        while (claimed := await self._on_disk(spool.claim_oldest)) is not None:
            try:
                records = [Encoded.from_bytes(b) for b in await self._on_disk(spool.read, claimed)]
                for i in range(0, len(records), _REPLAY_BATCH):
                    await self._write(records[i : i + _REPLAY_BATCH], replay=True)
            except BaseException:
                await self._on_disk(spool.release, claimed)
                raise
            await self._on_disk(spool.done, claimed)
            self.replayed += len(records)
        # No await between the check and the switch: a batch spooled meanwhile is seen here.
        if spool.open_records == 0:
            if self._down:
                log.info("redis is back; the spool is replayed")
            self._down = False

    async def flush(self) -> bool:
        """Replay what is spooled now (on shutdown); whether nothing is left waiting."""
        if self.spool is None:
            return True
        with contextlib.suppress(StoreError):
            await self._replay_all()
        return not self._down and not await self._on_disk(self.spool.pending)

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
        one HMGET on the labels hash. Ids whose sample expired are pruned from the index.
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
        gone = set(expired)
        chosen = [
            sid
            for sid in ids
            if sid not in gone
            and (candidate is None or self._summaries[sid].get("candidate") == candidate)
        ][:limit]
        labels = await self._guard(self._r.hmget(self.keys.labels, chosen)) if chosen else []
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
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(key, FIELD_LABEL, json.dumps(label))
        pipe.hset(self.keys.labels, sample_id, json.dumps(label))
        pipe.expire(key, self._settings.labelled_ttl_s)
        await self._guard(pipe.execute())
        return label

    async def delete(self, sample_id: str) -> bool:
        """Remove a sample, its label and its index entry; whether it existed. Its verdict (the
        scores, no payloads) stays in the stream until the stream is trimmed."""
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(self.keys.sample(sample_id))
        pipe.hdel(self.keys.labels, sample_id)
        pipe.zrem(self.keys.flagged, sample_id)
        pipe.zrem(self.keys.kept, sample_id)
        existed, *_ = await self._guard(pipe.execute())
        self._summaries.pop(sample_id, None)
        return bool(existed)

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
    credentials, hashed): it goes into segment file names."""
    where = re.sub(r"//[^@/]*@", "//", url)
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
