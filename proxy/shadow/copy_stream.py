"""``proxy.compare: redis``: the live proxy appends each sampled copy to a Redis stream.

Nothing else of the shadow side runs in the live proxy: no candidate call, no comparison. Each
copy (the request, its headers without credentials or ``redact.headers``, the reference's
answer and timing, the canary tag) becomes one entry of the copies stream once the live answer
is known; ``shadowproxy worker`` processes, on any machine, read the stream in a consumer group,
call the candidates, compare and store (``stream_worker``). Their number is the knob for
coverage, not this host's spare CPU.

Bounded and accounted, per candidate: a copy larger than ``proxy.max_copy_bytes`` is
``dropped_copy_too_large``; while the stream holds more than ``buffer.copies_max_bytes``
(Redis's own ``MEMORY USAGE``, read every second) new copies are ``dropped_stream_full``; while
Redis does not answer they are ``dropped_redis_unreachable``; the stream itself keeps the newest
``buffer.copies_maxlen`` entries. Entries are JSON and bytes only: a worker never unpickles what
anyone with write access to Redis could have put there.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Mapping
from typing import Any

import orjson
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from ..buffer.connect import RedisClient
from ..buffer.keys import KeySchema
from ..redact import strip_headers
from ..settings import Settings
from ..telemetry import Telemetry
from .analysis import Exchange
from .guards import stop_task
from .mirror_api import MirrorRequest, sampled

log = logging.getLogger("shadowproxy.copy_stream")

# Entries appended in one pipeline at most; the first waits this long for company.
_BATCH_MAX = 64
_BATCH_DELAY_S = 0.005
# How often the stream's backlog and memory are read against their bounds.
_MEMORY_CHECK_S = 1.0
# Pipelines to Redis in flight at once: a slow Redis must not gather copies without bound.
_WRITES_MAX = 4
ENTRY_VERSION = b"1"

Fields = dict[FieldT, EncodableT]


def entry_fields(
    req: MirrorRequest, ref: Exchange, candidates: list[str], settings: Settings
) -> Fields:
    """The stream entry of one copy: ``meta`` (JSON), the request body and the answer's body."""
    span = req.live_span
    meta = {
        "route": [req.route.kind.value, req.route.model, req.route.version, req.route.suffix],
        "query": req.query,
        # What rests in Redis carries no credentials (a candidate's own come from its config).
        "headers": strip_headers(req.headers.items(), settings.redact.headers),
        "received_at": req.received_at,
        "candidates": candidates,
        "served_by": req.served_by,
        "canary": list(req.canary) if req.canary is not None else None,
        "span": [span.trace_id, span.span_id, int(span.trace_flags)] if span else None,
        "ref": {
            "upstream": ref.upstream,
            "status": ref.status,
            "headers": strip_headers(ref.headers.items()),
            "latency_s": ref.latency_s,
            "timeline": [list(t) for t in ref.timeline],
            "complete": ref.complete,
        },
    }
    return {"v": ENTRY_VERSION, "meta": orjson.dumps(meta), "body": req.body, "ref_body": ref.body}


class CopyStream:
    """The live side of ``proxy.compare: redis`` (a ``Mirror``); owns no Redis client (it
    shares the store's)."""

    def __init__(
        self, settings: Settings, client: RedisClient, keys: KeySchema, telemetry: Telemetry
    ) -> None:
        self._settings = settings
        self._r = client
        self._key = keys.copies
        self._tel = telemetry
        self._rng = random.Random()
        self._batch: list[tuple[list[str], Fields]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._full = False
        self._writing = 0
        self._watch: asyncio.Task[None] | None = None
        self._waiting = 0

    def start(self) -> None:
        self._watch = asyncio.get_running_loop().create_task(self._watch_memory())

    def admit(self, model: str, headers: Mapping[str, str]) -> bool:
        return True

    def note_skip(self, reason: str) -> None:
        self._tel.skipped(reason)

    def offer(self, req: MirrorRequest) -> None:
        model = req.route.model
        names = []
        for cand in self._settings.candidates:
            # An OpenAI call names its model in the body: the worker reads it and asks again.
            if model is not None and not cand.shadows(model):
                continue
            reverse = req.served_by == cand.name
            if req.served_by is not None and not reverse:
                self._tel.skipped("served_by_canary", cand.name)
            elif not reverse and not sampled(cand, req.headers, self._rng):
                self._tel.skipped("not_sampled", cand.name)
            else:
                names.append(cand.name)
        if names:
            # No task per copy: the live answer's own future says when to append.
            self._waiting += 1
            req.reference.add_done_callback(functools.partial(self._answered, req, names))

    def _answered(
        self, req: MirrorRequest, names: list[str], done: asyncio.Future[Exchange | None]
    ) -> None:
        self._waiting -= 1
        ref = None if done.cancelled() or done.exception() is not None else done.result()
        if ref is None:
            self._count(names, "live_failed")
            return
        if len(req.body) + len(ref.body) > self._settings.proxy.max_copy_bytes:
            self._count(names, "dropped_copy_too_large")
            return
        if self._full or self._writing >= _WRITES_MAX:
            # Workers behind (or Redis slow): dropped here and counted, never trimmed unseen.
            self._count(names, "dropped_stream_full")
            return
        try:
            fields = entry_fields(req, ref, names, self._settings)
        except (TypeError, ValueError):
            # A header that is not text (bytes aiohttp kept as surrogates): orjson refuses it.
            self._count(names, "dropped_unencodable")
            return
        self._batch.append((names, fields))
        if len(self._batch) >= _BATCH_MAX:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(_BATCH_DELAY_S, self._flush)

    def _count(self, names: list[str], outcome: str) -> None:
        for name in names:
            self._tel.mirror(name, outcome)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._batch:
            batch, self._batch = self._batch, []
            task = asyncio.get_running_loop().create_task(self._write(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _write(self, batch: list[tuple[list[str], Fields]]) -> None:
        maxlen = self._settings.buffer.copies_maxlen
        self._writing += 1
        try:
            async with self._r.pipeline(transaction=False) as pipe:
                for _, fields in batch:
                    pipe.xadd(self._key, fields, maxlen=maxlen, approximate=True)
                await asyncio.wait_for(pipe.execute(), self._settings.buffer.write_timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("%d copies not streamed: %s", len(batch), exc)
            for names, _ in batch:
                self._count(names, "dropped_redis_unreachable")
            return
        finally:
            self._writing -= 1
        for names, _ in batch:
            self._count(names, "streamed")

    async def _watch_memory(self) -> None:
        limit = self._settings.buffer.copies_max_bytes
        maxlen = self._settings.buffer.copies_maxlen
        while True:
            try:
                # Workers delete what they finished, so the stream's length is the backlog: at
                # copies_maxlen new copies are dropped here (counted) before MAXLEN would trim
                # copies no worker has read yet (lost unseen).
                backlog = await self._r.xlen(self._key)
                used = await self._r.memory_usage(self._key) or 0
                self._full = used > limit or backlog >= maxlen
            except (RedisError, OSError) as exc:
                log.debug("copies stream memory not read: %s", exc)
            await asyncio.sleep(_MEMORY_CHECK_S)

    async def progress(self) -> dict[str, Any]:
        # Copies end in the workers: this process's fates (drops) are in its own tally.
        return {
            "in_flight": {"*stream": self._waiting + len(self._batch)},
            "pending": 0,
            "fates": [],
        }

    async def snapshot(self) -> dict[str, Any]:
        return {
            "tally": [],
            "in_flight": (await self.progress())["in_flight"],
            "prometheus": "",
            "worker": "redis stream",
            "pending": 0,
        }

    async def close(self) -> None:
        """Append what the live calls still in flight will answer (bounded by the drain time)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.proxy.drain_timeout_s
        while (self._waiting or self._batch or self._tasks) and loop.time() < deadline:
            self._flush()
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=max(0.01, deadline - loop.time()))
            else:
                await asyncio.sleep(0.01)
        self._flush()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await stop_task(self._watch)
