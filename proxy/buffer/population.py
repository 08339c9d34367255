"""Population statistics kept in Redis: per-minute buckets that every process adds to.

Each process gathers its verdicts' counts per (cell, minute) for a moment (``PopulationStats``)
and adds them here with HINCRBY; a bucket is a plain hash of integer counters, so whatever
number of replicas and workers wrote to a minute, reading a window of minutes back and summing
is the statistics of every verdict in it, exactly (histogram bins included). Buckets expire
``buffer.stats_retention_min`` after their minute. Wilcoxon's paired differences cannot be
summed; they go to a bounded list per cell instead (the newest ``POPULATION_PAIRS_MAX``).

A cell's keys share its hash tag (one Redis Cluster slot per cell; cells spread). Keys and
retention are documented in ``keys.py``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from redis.exceptions import RedisError

from comparators.population import Cell, CellStats, summary_rows

from ..errors import StoreError
from .connect import RedisClient
from .keys import POPULATION_PAIRS_MAX, KeySchema
from .store import wait_running

# Commands per pipeline when reading a window back (a day of minutes for many cells).
_READ_CHUNK = 2000


def minute_of(ts: float) -> int:
    return math.floor(ts / 60.0)


class PopulationStore:
    """Reads and adds to the per-minute population buckets; shares its owner's Redis client."""

    def __init__(
        self,
        client: RedisClient,
        keys: KeySchema,
        retention_min: int,
        *,
        clock: Callable[[], float] = time.time,
        timeout_s: float = 5.0,
    ) -> None:
        self._r = client
        self._timeout = timeout_s
        self._keys = keys
        self.retention_min = retention_min
        self._clock = clock
        self._registered: set[str] = set()

    async def add(self, buckets: Mapping[tuple[Cell, int], CellStats]) -> None:
        """Add gathered statistics. Raises ``StoreError`` when Redis is unreachable; then none
        or some of it may have been added (a pipeline is not atomic), which the caller's retry
        could count twice: a short outage skews a minute's counts at worst."""
        if not buckets:
            return
        retention_s = self.retention_min * 60
        pipe = self._r.pipeline(transaction=False)
        new_cells: dict[str, Cell] = {}
        for (cell, minute), stats in buckets.items():
            cid = cell.id
            if cid not in self._registered:
                new_cells[cid] = cell
            key = self._keys.population_bucket(cid, minute)
            for name, n in stats.counters().items():
                pipe.hincrby(key, name, n)
            # A bucket lives for the retention after its own minute ends, whoever writes last.
            pipe.expireat(key, (minute + 1) * 60 + retention_s)
            if stats.diffs:
                pairs = self._keys.population_pairs(cid)
                pipe.lpush(pairs, *(f"{m}:{d!r}" for m, d in stats.diffs))
                pipe.ltrim(pairs, 0, POPULATION_PAIRS_MAX - 1)
                pipe.expire(pairs, retention_s + 60)
        for cid, cell in new_cells.items():
            pipe.hsetnx(self._keys.population_cells, cid, cell.to_json())
        try:
            await self._bounded(pipe.execute())
        except (RedisError, OSError) as exc:
            raise StoreError(f"population statistics not stored: {exc}") from exc
        self._registered.update(new_cells)

    async def _bounded(self, aw: Awaitable[Any]) -> Any:
        """A Redis call within the time limit (counting only time this process could run): a
        Redis that stops answering without closing the connection must not stop statistics, or
        the comparisons waiting on them."""
        try:
            return await wait_running(aw, self._timeout)
        except TimeoutError as exc:
            raise StoreError("redis did not answer in time") from exc

    async def cells(self) -> dict[str, Cell]:
        try:
            raw: dict[Any, Any] = await self._bounded(
                self._r.hgetall(self._keys.population_cells)  # type: ignore[arg-type]
            )
        except (RedisError, OSError) as exc:
            raise StoreError(f"population statistics unreadable: {exc}") from exc
        out = {}
        for cid, value in raw.items():
            try:
                out[_text(cid)] = Cell.from_json(value)
            except (ValueError, KeyError, TypeError):
                continue  # a cell written by a newer version: not ours to read
        return out

    async def read(
        self, window_min: int, *, where: Callable[[Cell], bool] | None = None
    ) -> dict[Cell, CellStats]:
        """Every cell's statistics over the last ``window_min`` minutes (this one included)."""
        window_min = max(1, min(window_min, self.retention_min))
        last = minute_of(self._clock())
        first = last - window_min + 1
        cells = {cid: c for cid, c in (await self.cells()).items() if where is None or where(c)}
        wanted = [(cid, m) for cid in cells for m in range(first, last + 1)]
        replies: list[Any] = []
        try:
            for i in range(0, len(wanted), _READ_CHUNK):
                pipe = self._r.pipeline(transaction=False)
                for cid, m in wanted[i : i + _READ_CHUNK]:
                    pipe.hgetall(self._keys.population_bucket(cid, m))
                replies += await self._bounded(pipe.execute())
            pipe = self._r.pipeline(transaction=False)
            for cid in cells:
                pipe.lrange(self._keys.population_pairs(cid), 0, -1)
            pairs = await self._bounded(pipe.execute())
        except (RedisError, OSError) as exc:
            raise StoreError(f"population statistics unreadable: {exc}") from exc
        # Summing is CPU work proportional to the window: off the event loop.
        return await asyncio.to_thread(_merge, cells, wanted, replies, pairs, first)

    async def summary(self, window_min: int) -> list[dict[str, Any]]:
        cells = await self.read(window_min)
        return await asyncio.to_thread(summary_rows, cells)


def _text(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


def _merge(
    cells: Mapping[str, Cell],
    wanted: Iterable[tuple[str, int]],
    replies: Iterable[Mapping[Any, Any]],
    pairs: Iterable[Iterable[Any]],
    first_minute: int,
) -> dict[Cell, CellStats]:
    out: dict[Cell, CellStats] = {}
    for (cid, _), fields in zip(wanted, replies, strict=True):
        if not fields:
            continue
        stats = out.setdefault(cells[cid], CellStats())
        stats.add_counters({_text(k): int(v) for k, v in fields.items()})
    for cid, entries in zip(cells, pairs, strict=True):
        kept: list[tuple[int, float]] = []
        for entry in entries:
            minute, _, diff = _text(entry).partition(":")
            try:
                if int(minute) >= first_minute:
                    kept.append((int(minute), float(diff)))
            except ValueError:
                continue
        if kept:
            out.setdefault(cells[cid], CellStats()).diffs.extend(reversed(kept))
    return out
