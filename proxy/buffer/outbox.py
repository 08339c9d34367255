"""Between the store and Redis: what Redis does not take waits in the spool, and comes back.

An ``Outbox`` belongs to one ``SampleStore``. A batch goes to Redis directly while Redis takes
writes; the first failure sends it, and every batch after it, to the spool (``spool.Spool``)
without trying Redis again, until a background task finds Redis answering: it then replays
the spool's segments oldest first (this process's, and any another process left behind) and
lets batches go to Redis directly again. New verdicts may thus interleave with a replay that
another process runs, never with this process's own backlog. A restart replays what is still
spooled (``start``); ``flush`` does it once more at shutdown. Only what the spool cannot hold is
lost: counted per candidate (``lost``), and told to Redis with the next write that gets through
(the ``{candidate}|spool_full`` counter).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from opentelemetry.metrics import CallbackOptions, Observation

from ..errors import StoreError
from .keys import REPLAY_MARKER_TTL_S, WORKER_MARKER_TTL_S, spool_full_stat
from .records import Encoded
from .spool import Spool

log = logging.getLogger("shadowproxy.store")
T = TypeVar("T")

Write = Callable[[list[Encoded], int, Counter[str]], Awaitable[None]]
"""Writes a batch to Redis (with the replay marks' TTL, 0 for none, and extra counters); raises
``StoreError``."""

# Records replayed per script call, and how often the replay task looks: soon while verdicts
# wait on disk, rarely otherwise (for segments another process left behind).
_REPLAY_BATCH = 128
_REPLAY_BUSY_S = 0.5
_REPLAY_IDLE_S = 5.0


class Outbox:
    def __init__(self, spool: Spool, write: Write, ping: Callable[[], Awaitable[bool]]) -> None:
        self.spool = spool
        self._write_redis = write
        self._ping = ping
        # One thread for the spool's file I/O: appends, seals and replays stay in order.
        self._disk = ThreadPoolExecutor(1, thread_name_prefix="spool")
        self.down = False
        """Redis failed a write: batches go to the spool until the replay task drained it."""
        self._replayer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._replaying = asyncio.Lock()  # the replay task and ``flush`` take turns
        self._unflushed_full: Counter[str] = Counter()
        self.spooled = 0
        self.replayed = 0
        self.lost: Counter[str] = Counter()
        """Per candidate: verdicts refused by a full spool (lost)."""

    def observe_gauges(self, options: CallbackOptions) -> Iterator[Observation]:
        """OpenTelemetry callback: records spooled, replayed, lost to a full spool or torn."""
        yield Observation(self.spooled, {"state": "spooled"})
        yield Observation(self.replayed, {"state": "replayed"})
        yield Observation(sum(self.lost.values()), {"state": "lost_full"})
        yield Observation(self.spool.torn, {"state": "lost_torn"})

    def start(self) -> None:
        if self._replayer is None:
            self._replayer = asyncio.get_running_loop().create_task(self._replay_loop())

    async def close(self) -> None:
        """Stop replaying and seal this process's segment (the next start replays it)."""
        if self._replayer is not None:
            self._replayer.cancel()
            await asyncio.gather(self._replayer, return_exceptions=True)
            self._replayer = None
        await self._on_disk(self.spool.close)
        self._disk.shutdown(wait=True)

    async def send(self, batch: list[Encoded], *, idempotent: bool = False) -> Counter[str]:
        """To Redis, or to the spool; how many per candidate were lost (the spool was full).
        ``idempotent``: written as a replay is (a record already stored is not added again)."""
        self.start()
        if not self.down:
            try:
                await self._write(batch, replay=WORKER_MARKER_TTL_S if idempotent else 0)
                return Counter()
            except StoreError as exc:
                log.warning("redis refused %d verdicts (%s): spooling to disk", len(batch), exc)
                self.down = True
                self._wake.set()
        refused = await self._on_disk(self.spool.append, [r.to_bytes() for r in batch])
        lost = Counter(batch[i].candidate for i in refused)
        if lost:
            log.warning("spool full: %d verdicts lost", len(refused))
        self.spooled += len(batch) - len(refused)
        self.lost += lost
        self._unflushed_full += lost
        return lost

    async def flush(self) -> bool:
        """Replay what is spooled now (on shutdown); whether nothing is left waiting."""
        with contextlib.suppress(StoreError):
            await self._replay_all()
        return not self.down and not await self._on_disk(self.spool.pending)

    async def _write(self, batch: list[Encoded], *, replay: int) -> None:
        full = +self._unflushed_full
        await self._write_redis(
            batch, replay, Counter({spool_full_stat(c): n for c, n in full.items()})
        )
        self._unflushed_full -= full

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
            delay = _REPLAY_BUSY_S if self.down else _REPLAY_IDLE_S
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
        if not (self.down or await self._on_disk(spool.pending)) or not await self._ping():
            return
        await self._on_disk(spool.seal)
        while (claimed := await self._on_disk(spool.claim_oldest)) is not None:
            try:
                records = [Encoded.from_bytes(b) for b in await self._on_disk(spool.read, claimed)]
                for i in range(0, len(records), _REPLAY_BATCH):
                    await self._write(records[i : i + _REPLAY_BATCH], replay=REPLAY_MARKER_TTL_S)
            except BaseException:
                await self._on_disk(spool.release, claimed)
                raise
            await self._on_disk(spool.done, claimed)
            self.replayed += len(records)
        # No await between the check and the switch: a batch spooled meanwhile is seen here.
        if spool.open_records == 0:
            if self.down:
                log.info("redis is back; the spool is replayed")
            self.down = False
