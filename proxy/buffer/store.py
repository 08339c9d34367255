"""The sample buffer: verdicts, flagged samples and their payloads in Redis.

One ``SampleStore`` owns one ``redis.asyncio`` client (its connection pool). Writes come from the
mirror tasks only, never from the live path, and each is one pipelined round trip under
``buffer.write_timeout_s``; a failure raises ``StoreError`` for the caller to count.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Mapping
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..errors import StoreError
from ..settings import BufferSettings
from .keys import (
    FIELD_LABEL,
    FIELD_META,
    FIELD_SUMMARY,
    PAYLOAD_FIELDS,
    KeySchema,
    flagged_stat,
    outcome_stat,
)

LABELS = ("acceptable", "regression", "needs-look")


class SampleStore:
    def __init__(self, client: aioredis.Redis, settings: BufferSettings, keys: KeySchema) -> None:
        self._r = client
        self._settings = settings
        self.keys = keys
        self._summaries: OrderedDict[str, dict[str, Any]] = OrderedDict()

    @classmethod
    def from_url(
        cls,
        url: str,
        settings: BufferSettings,
        keys: KeySchema | None = None,
        *,
        starvable: bool = False,
    ) -> SampleStore:
        """``starvable``: for a process at idle CPU priority. Its socket timeouts (wall clock,
        inside redis-py) would fire whenever the host keeps it off the CPU for a while, so it
        has none, and every call is bounded by ``wait_running`` alone."""
        client = aioredis.Redis.from_url(
            url,
            decode_responses=False,
            socket_timeout=None if starvable else settings.write_timeout_s * 2,
            socket_connect_timeout=None if starvable else settings.write_timeout_s,
            health_check_interval=30,
        )
        return cls(client, settings, keys or KeySchema())

    @property
    def redis(self) -> aioredis.Redis:
        """The client (one pool), for the admin plane's sessions."""
        return self._r

    async def close(self) -> None:
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

    async def record_many(
        self, records: list[tuple[Mapping[str, Any], Mapping[str, bytes] | None]]
    ) -> None:
        """Several verdicts (and samples) in one pipelined round trip: at hundreds of verdicts
        a second, one round trip each cost more CPU than the comparisons. The counters for
        ``/api/summary`` are summed over the batch: one HINCRBY per counter, not per verdict."""
        pipe = self._r.pipeline(transaction=False)
        flagged: dict[str, float] = {}
        stats: Counter[str] = Counter()
        for meta, payloads in records:
            self._add_record(pipe, meta, payloads)
            stats[outcome_stat(meta["candidate"], meta["outcome"])] += 1
            for out in meta.get("outputs", ()):
                if out.get("flagged"):
                    stats[flagged_stat(meta["candidate"], meta["model"], out["output"])] += 1
            if meta.get("flagged"):
                flagged[str(meta["id"])] = float(meta["ts"])
        for stat, n in stats.items():
            pipe.hincrby(self.keys.stats, stat, n)
        if flagged:
            pipe.zadd(self.keys.flagged, flagged)
            pipe.zremrangebyrank(self.keys.flagged, 0, -self._settings.flagged_index_max - 1)
        await self._guard(pipe.execute())

    def _add_record(
        self, pipe: Any, meta: Mapping[str, Any], payloads: Mapping[str, bytes] | None
    ) -> None:
        sid = str(meta["id"])
        summary = {k: meta[k] for k in _SUMMARY_KEYS if k in meta}
        # orjson: the C encoder, a tenth of json's time on these records (non-finite scores are
        # made finite before they get here, so both write the same JSON).
        summary_json = _dumps(summary)
        pipe.xadd(
            self.keys.verdicts,
            {"sample": sid, "json": summary_json},
            maxlen=self._settings.stream_maxlen,
            approximate=True,
        )
        if payloads is not None:
            key = self.keys.sample(sid)
            fields: dict[str, bytes | str] = {
                FIELD_META: _dumps(meta),
                FIELD_SUMMARY: summary_json,
            }
            fields.update({k: self._clip(v) for k, v in payloads.items() if k in PAYLOAD_FIELDS})
            pipe.hset(key, mapping=fields)
            pipe.expire(key, self._settings.sample_ttl_s)

    def _clip(self, value: bytes) -> bytes:
        limit = self._settings.max_payload_bytes
        return value if len(value) <= limit else value[:limit]

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
        """Label a stored sample; labelled samples no longer expire (golden-set material)."""
        if verdict not in LABELS:
            raise ValueError(f"verdict must be one of {', '.join(LABELS)}, got {verdict!r}")
        key = self.keys.sample(sample_id)
        label = {"verdict": verdict, "note": note, "by": who, "at": time.time()}
        if not await self._guard(self._r.exists(key)):
            raise KeyError(sample_id)
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(key, FIELD_LABEL, json.dumps(label))
        pipe.hset(self.keys.labels, sample_id, json.dumps(label))
        pipe.persist(key)
        await self._guard(pipe.execute())
        return label

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


def _dumps(record: Mapping[str, Any]) -> bytes:
    """JSON by orjson (numpy scalars as numbers); anything it refuses, by the json module."""
    try:
        return orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError:
        return json.dumps(record).encode()


# What goes into the stream entry: enough for reports and lists, no payloads.
_SUMMARY_KEYS = (
    "id",
    "ts",
    "request_id",
    "candidate",
    "noise_floor",
    "model",
    "outcome",
    "flagged",
    "severity",
    "reason",
    "reference",
    "candidate_side",
    "outputs",
    "stored",
)
