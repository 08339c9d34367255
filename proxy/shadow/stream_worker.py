"""``shadowproxy worker``: compares the copies live proxies append to the Redis stream.

Each worker is one consumer of the ``COPIES_GROUP`` consumer group: it reads new entries
(XREADGROUP), calls each entry's candidates (or, for a canary's answer, the reference), compares,
stores, and acknowledges the entry once its verdicts are written (or spooled). An entry a worker
took and never acknowledged (it died) stays pending; every ``CLAIM_EVERY_S`` each worker claims
entries idle for more than ``buffer.copies_claim_idle_s`` (XAUTOCLAIM) and compares them itself.
So a copy is compared at least once while the stream holds it, and stored at most once: its
sample ids are derived from the entry id and the candidate, and the store's idempotent write
stores a sample id only once. Pending entries trimmed from the stream before a worker compared
them are counted as ``dropped_stream_trimmed`` when a claim finds them gone.

Workers can run anywhere that reaches Redis and the candidates; their count is the knob for
coverage. Each serves ``/healthz``, ``/readyz`` and ``/metrics`` (the admin token) on
``admin.host:admin.port``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import socket
from collections.abc import Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import quote

import orjson
from aiohttp import web
from multidict import CIMultiDict
from opentelemetry.trace import SpanContext, TraceFlags
from redis.exceptions import RedisError, ResponseError

from ..buffer.connect import RedisClient
from ..buffer.keys import COPIES_GROUP
from ..protocols.model_config import ModelConfigs
from ..protocols.v2_rest.routes import MIRRORED, Route, RouteKind, classify
from ..settings import Settings
from ..telemetry import Telemetry
from .analysis import Exchange
from .compare_stage import Comparer
from .copy_checks import CopyChecks, make_pair, refusal
from .copy_stream import ENTRY_VERSION
from .mirror_api import MirrorRequest
from .shadow_calls import ShadowCalls
from .shadow_queue import QueuedCopy

log = logging.getLogger("shadowproxy.worker")

# How often a worker looks for entries another worker left pending for too long.
CLAIM_EVERY_S = 1.0
# Entries compared at once by one worker (each calls its candidates concurrently).
MAX_IN_FLIGHT = 32
_BLOCK_MS = 1000


class BadEntry(ValueError):
    """A stream entry that is not a copy this version can read."""


def _text(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


def copy_of(fields: Mapping[Any, Any], seq: int) -> tuple[MirrorRequest, list[str]]:
    """The copy (with its reference answer already known) and its candidates' names."""
    f = {_text(k): v for k, v in fields.items()}
    if f.get("v") != ENTRY_VERSION:
        raise BadEntry(f"unknown entry version {f.get('v')!r}")
    try:
        meta = orjson.loads(f["meta"])
        route = _route(meta["route"])
        r = meta["ref"]
        ref = Exchange(
            str(r["upstream"]),
            int(r["status"]),
            CIMultiDict((str(k), str(v)) for k, v in r["headers"]),
            bytes(f["ref_body"]),
            float(r["latency_s"]),
            tuple((int(n), float(t)) for n, t in r["timeline"]),
            bool(r["complete"]),
        )
        span = meta["span"]
        future: asyncio.Future[Exchange | None] = asyncio.get_running_loop().create_future()
        future.set_result(ref)
        req = MirrorRequest(
            route=route,
            query=str(meta["query"]),
            headers=CIMultiDict((str(k), str(v)) for k, v in meta["headers"]),
            body=bytes(f["body"]),
            received_at=float(meta["received_at"]),
            live_span=(
                SpanContext(span[0], span[1], is_remote=True, trace_flags=TraceFlags(span[2]))
                if span
                else None
            ),
            reference=future,
            seq=seq,
            served_by=meta["served_by"],
            canary=(str(c[0]), int(c[1]), int(c[2])) if (c := meta["canary"]) else None,
        )
        return req, [str(c) for c in meta["candidates"]]
    except (LookupError, TypeError, ValueError) as exc:
        raise BadEntry(f"malformed copy entry: {type(exc).__name__}: {exc}") from None


def _route(raw: Any) -> Route:
    """The route an entry names, only if it is one a live proxy mirrors, re-derived from its
    path: an entry cannot make a worker send a candidate anything else (an admin route, with
    the candidate's own credentials)."""
    kind, model, version, suffix = raw
    if not isinstance(suffix, str) or not all(isinstance(x, str | None) for x in (model, version)):
        raise ValueError("the route's parts are not strings")
    claimed = Route(RouteKind(kind), model, version, suffix)
    if claimed.kind is RouteKind.OPENAI:
        path = suffix
    else:
        at = f"/versions/{version}" if version else ""
        path = f"/v2/models/{quote(model or '', safe='')}{at}{suffix}"
    if claimed.kind not in MIRRORED or classify("POST", path) != claimed:
        raise ValueError(f"not a mirrored route: {kind} {path[:200]!r}")
    return claimed


def sample_id(entry_id: str, candidate: str) -> str:
    """The same copy and candidate always make the same sample id (stored once)."""
    return hashlib.blake2b(f"{entry_id}|{candidate}".encode(), digest_size=16).hexdigest()


class StreamWorker:
    def __init__(
        self,
        settings: Settings,
        client: RedisClient,
        stream: str,
        comparer: Comparer,
        calls: ShadowCalls,
        models: ModelConfigs,
        telemetry: Telemetry,
    ) -> None:
        self._settings = settings
        self._r = client
        self._stream = stream
        self._comparer = comparer
        self._calls = calls
        self._checks = CopyChecks(settings, models)
        self._tel = telemetry
        self._cands = {c.name: c for c in settings.candidates}
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._tasks: set[asyncio.Task[None]] = set()
        self._seq = 0
        self._in_hand: set[str] = set()
        self.claimed = 0
        """Entries this worker took over from another (dead) worker."""
        self.compared = 0

    async def ensure_group(self) -> None:
        try:
            await self._r.xgroup_create(self._stream, COPIES_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self) -> None:
        """Read, compare and acknowledge until cancelled; Redis outages are waited out."""
        claim_at = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                if loop.time() >= claim_at:
                    claim_at = loop.time() + CLAIM_EVERY_S
                    await self._keep_mine()
                    await self._claim()
                await self._read()
            except (RedisError, OSError) as exc:
                log.warning("copies stream unreachable: %s", exc)
                await asyncio.sleep(1.0)

    async def _read(self) -> None:
        await self._slots.acquire()  # at least one free slot before asking for entries
        self._slots.release()
        free = MAX_IN_FLIGHT - len(self._tasks)
        reply = await self._r.xreadgroup(
            COPIES_GROUP, self.consumer, {self._stream: ">"}, count=max(1, free), block=_BLOCK_MS
        )
        for _, entries in reply or []:
            for entry_id, fields in entries:
                await self._start(_text(entry_id), fields)

    async def _keep_mine(self) -> None:
        """Reset the idle time of the entries still in hand (a slow LLM candidate can take
        longer than the claim idle time): otherwise this or another worker would claim and
        compare them again while they are being compared."""
        if self._in_hand:
            await self._r.xclaim(
                self._stream, COPIES_GROUP, self.consumer, 0, list(self._in_hand), justid=True
            )

    async def _claim(self) -> None:
        start = "0-0"
        idle_ms = int(self._settings.buffer.copies_claim_idle_s * 1000)
        while True:
            reply = await self._r.xautoclaim(
                self._stream, COPIES_GROUP, self.consumer, idle_ms, start_id=start, count=100
            )
            start, entries = _text(reply[0]), reply[1]
            # Trimmed from the stream while pending: Redis 7 lists them apart, Redis 6.2 returns
            # them without fields. Nothing is left to compare; acknowledged and counted.
            gone = [_text(i) for i in (reply[2] if len(reply) > 2 else [])]
            gone += [_text(i) for i, fields in entries if fields is None]
            if gone:
                log.warning("%d pending copies were trimmed before they were compared", len(gone))
                self._tel.mirror("*", "dropped_stream_trimmed", len(gone))
                await self._forget(*gone)
            for entry_id, fields in entries:
                eid = _text(entry_id)
                if fields is None or eid in self._in_hand:
                    continue
                self.claimed += 1
                await self._start(eid, fields)
            if start == "0-0":
                return

    async def _forget(self, *entry_ids: str) -> None:
        """Acknowledge and delete: the stream then holds only what no worker finished, so its
        length is the backlog the producers bound (``copy_stream``)."""
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.xack(self._stream, COPIES_GROUP, *entry_ids)
            pipe.xdel(self._stream, *entry_ids)
            await pipe.execute()

    async def _start(self, entry_id: str, fields: Mapping[Any, Any]) -> None:
        await self._slots.acquire()
        self._in_hand.add(entry_id)
        task = asyncio.get_running_loop().create_task(self._handle(entry_id, fields))
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, entry_id))

    def _done(self, task: asyncio.Task[None], entry_id: str) -> None:
        self._tasks.discard(task)
        self._in_hand.discard(entry_id)
        self._slots.release()

    async def _handle(self, entry_id: str, fields: Mapping[Any, Any]) -> None:
        self._seq += 1
        try:
            req, names = copy_of(fields, self._seq)
        except BadEntry as exc:
            log.warning("copies stream entry %s skipped: %s", entry_id, exc)
            self._tel.skipped("bad_stream_entry")
            await self._forget(entry_id)
            return
        try:
            copy = QueuedCopy(req, len(req.body))
            if req.route.kind is RouteKind.OPENAI and req.route.model is None:
                # The model is in the body: read it here, as the mirror scheduler does, so the
                # candidates' models and model_map apply (and the checks are made once).
                facts = self._checks.inspect(copy)
                req.route = replace(req.route, model=(facts.model if facts else None) or "")
            await asyncio.gather(*(self._one(entry_id, copy, name) for name in names))
            # Acknowledged once its verdicts are written or spooled: a worker that dies before
            # leaves the entry pending, for another to claim.
            await self._comparer.written()
        except (RedisError, OSError):
            raise  # Redis away: the entry stays pending, for this or another worker
        except Exception:
            # A copy no comparison can make sense of must not come back every claim period.
            log.exception("copies stream entry %s could not be compared", entry_id)
            self._tel.skipped("bad_stream_entry")
        await self._forget(entry_id)

    async def _one(self, entry_id: str, copy: QueuedCopy, name: str) -> None:
        cand = self._cands.get(name)
        if cand is None:
            self._tel.skipped("unknown_candidate", name)  # the proxy's config names another
            return
        req: MirrorRequest = copy.request
        if not copy.checked:
            await self._checks.check(copy)
        if req.route.model is not None and not cand.shadows(req.route.model):
            return
        unsafe = refusal(copy, cand)
        if unsafe is not None:
            self._tel.skipped(unsafe, cand.name)
            return
        reverse = req.served_by == cand.name
        answers = await self._calls.both_answers(cand, req, reverse)
        if answers is None:
            return
        pair = make_pair(
            self._settings, copy, cand, *answers, sample_id=sample_id(entry_id, cand.name)
        )
        await self._comparer.compare(pair)
        self.compared += 1

    async def close(self, timeout_s: float) -> None:
        """Finish the entries in hand (bounded); what is left stays pending for others."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def run_worker(settings: Settings) -> int:
    """``shadowproxy worker --config FILE``: until SIGTERM or SIGINT."""
    from ..app import build_worker_app

    if settings.buffer.redis_url is None:
        print(
            "shadowproxy: error: worker: buffer.redis_url is required (the workers and the live "
            "proxies must share one Redis)",
        )
        return 2
    app = build_worker_app(settings)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.admin.host, settings.admin.port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("worker %s comparing copies", app[WORKER].consumer)
    await stop.wait()
    with contextlib.suppress(Exception):
        await runner.cleanup()
    return 0


WORKER = web.AppKey("stream_worker", StreamWorker)
