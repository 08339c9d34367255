"""The judge: turns raw comparator verdicts into noise-aware ones and keeps population statistics.

Verdicts from a ``noise_floor`` candidate (a second reference instance) feed the A/A noise floor;
every other candidate's verdicts are re-decided against it (``noise`` settings) before they are
counted, stored and shown. The same request's candidate and twin verdicts are paired for the
population's paired tests. The statistics go to Redis every second (``PopulationStore``), and the
noise floor that judges is the one every process wrote there, over ``noise.window_min`` minutes.
One owner (the app); called only from the event loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation

from comparators import OutputVerdict, Validity
from comparators.noise import NoiseFloor, NoisePolicy
from comparators.population import (
    COPY_METRIC,
    COPY_OUTPUT,
    Cell,
    LogHistogram,
    PairBuffer,
    PopulationStats,
)

from ..buffer.population import PopulationStore, minute_of
from ..errors import StoreError
from ..settings import CandidateSettings, Settings

log = logging.getLogger("shadowproxy.judge")

Pair = tuple[str, OutputVerdict, OutputVerdict]

# How often gathered statistics go to Redis, and how often the merged noise floor is read back
# (a window of buckets per twin cell: not every second).
FLUSH_INTERVAL_S = 1.0
NOISE_REFRESH_S = 5.0
# Requests whose candidates' builds are remembered until their twin's verdict pairs them.
PAIR_BUILDS_MAX = 8192


class Judge:
    def __init__(
        self,
        settings: Settings,
        store: PopulationStore | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        noise = settings.noise
        self.noise = NoiseFloor(
            NoisePolicy(
                mode=noise.mode,
                quantile=noise.quantile,
                margin=noise.margin,
                min_samples=noise.min_samples,
            )
        )
        self._window_min = noise.window_min
        self._twins = {c.name for c in settings.candidates if c.noise_floor}
        self.population = PopulationStats()
        """Gathered here, not yet in Redis (all of it, while Redis is away)."""
        self._store = store
        self._clock = clock
        self._pairs = PairBuffer()
        self._cells: dict[tuple[str, str, str, str, str, str], Cell] = {}
        # (request, candidate) -> the candidate's build on it, for pairs the twin completes later.
        self._builds: OrderedDict[tuple[Hashable, str], str] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._noise_read_at = -NOISE_REFRESH_S
        self.dropped = 0
        """Verdicts whose statistics were kept past the retention because Redis was away, and
        forgotten."""

    def _cell(self, model: str, candidate: str, v: OutputVerdict, build: str) -> Cell:
        key = (model, candidate, v.output, v.metric, v.headline, build)
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = Cell(model, candidate, v.output, v.metric, v.headline, build)
        return cell

    def judge(
        self,
        cand: CandidateSettings,
        model: str,
        request_seq: Hashable,
        verdicts: Sequence[OutputVerdict],
        build: str = "",
    ) -> tuple[list[OutputVerdict], list[Pair]]:
        """The verdicts to act on (twin verdicts unchanged, candidate verdicts noise-judged), and
        the (candidate, candidate verdict, twin verdict) pairs this request completed. ``build``:
        the candidate's build (the statistics are kept per build); a pair is counted under the
        candidate's build of the same request."""
        if cand.noise_floor:
            for v in verdicts:
                self.noise.observe((model, v.output), v)
            pairs = self._pairs.add_twin(request_seq, verdicts)
            judged = list(verdicts)
        else:
            judged = [self.noise.judge((model, v.output), v)[0] for v in verdicts]
            pairs = self._pairs.add_candidate(request_seq, cand.name, verdicts)
        minute = minute_of(self._clock())
        for v in judged:
            self.population.record(self._cell(model, cand.name, v, build), minute, v)
        if judged:
            # The whole copy as one verdict (flagged if any output is, its worst severity): the
            # per-copy rates and the rank test of the builds ledger.
            copy = OutputVerdict(
                COPY_OUTPUT,
                COPY_METRIC,
                next((v.validity for v in judged if not v.valid), Validity.OK),
                severity=max(v.severity for v in judged),
                flagged=any(v.flagged for v in judged),
            )
            self.population.record(self._cell(model, cand.name, copy, build), minute, copy)
        if not cand.noise_floor:
            self._builds[(request_seq, cand.name)] = build
            while len(self._builds) > PAIR_BUILDS_MAX:
                self._builds.popitem(last=False)
        for candidate, ab, aa in pairs:
            pair_build = self._builds.get((request_seq, candidate), "")
            cell = self._cell(model, candidate, ab, pair_build)
            self.population.record_pair(cell, minute, ab, aa)
        return judged, pairs

    def start(self) -> None:
        if self._store is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            try:
                await self.flush()
            except StoreError as exc:
                log.debug("population statistics wait for Redis: %s", exc)
            except Exception:
                log.exception("storing population statistics failed")

    async def flush(self) -> None:
        """Add what was gathered to Redis, then read the merged noise floor back. Raises
        ``StoreError`` when Redis is away; what was gathered is kept for the next try."""
        if self._store is None:
            return
        minute = minute_of(self._clock())
        lost = self.population.drop_before(minute - self._store.retention_min)
        if lost:
            self.dropped += lost
            log.warning("%d verdicts left out of population statistics (Redis away)", lost)
        taken = self.population.take()
        local = self.noise.take_local()
        try:
            # Shielded: a shutdown that cancels the periodic flush mid-write must not lose what
            # was taken (the write completes; close() then flushes what came after).
            await asyncio.shield(self._store.add(taken))
        except StoreError:
            self.population.put_back(taken)
            self.noise.put_back_local(local)
            raise
        now = time.monotonic()
        if self._twins and now - self._noise_read_at >= NOISE_REFRESH_S:
            self._noise_read_at = now
            twins = await self._store.read(self._window_min, where=self._is_twin)
            merged: dict[Hashable, LogHistogram] = {}
            for cell, stats in twins.items():
                merged.setdefault((cell.model, cell.output), LogHistogram()).merge(stats.severity)
            self.noise.set_merged(merged)

    def _is_twin(self, cell: Cell) -> bool:
        return cell.candidate in self._twins

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop the periodic flush and store what is left (bounded: Redis may be away)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        with contextlib.suppress(StoreError, TimeoutError):
            await asyncio.wait_for(self.flush(), timeout_s)
        if len(self.population):
            log.warning("population statistics not stored at shutdown (Redis unreachable)")


class LatestPopulation:
    """The population statistics last read from Redis (every process's, merged), served as
    gauges; refreshed by its owner (``refresh``)."""

    def __init__(self, store: PopulationStore | None = None, window_min: int = 60) -> None:
        self._store = store
        self._window_min = window_min
        self.rows: list[dict[str, Any]] = []

    async def refresh(self) -> None:
        self.rows = await self.summary(self._window_min)

    async def summary(self, window_min: int) -> list[dict[str, Any]]:
        return await self._store.summary(window_min) if self._store is not None else []

    def observe_gauges(self, options: CallbackOptions) -> Iterator[Observation]:
        return population_gauges(self.rows)


def population_gauges(rows: Sequence[dict[str, Any]]) -> Iterator[Observation]:
    """The population's rates and quantiles as gauge observations."""
    for row in rows:
        attrs: dict[str, Any] = {
            "model": row["model"],
            "candidate": row["candidate"],
            "output": row["output"],
            "metric": row["metric"],
        }
        yield Observation(row["flagged_rate_ci95"][1], {**attrs, "stat": "flagged_rate_upper95"})
        if row["flagged_rate"] is not None:
            yield Observation(row["flagged_rate"], {**attrs, "stat": "flagged_rate"})
        for q in ("p50", "p99"):
            value = row["severity"][q]
            if value is not None:
                yield Observation(value, {**attrs, "stat": f"severity_{q}"})
        paired = row["paired_vs_noise_floor"]
        if paired["pairs"]:
            yield Observation(
                paired["wilcoxon_greater"]["p"], {**attrs, "stat": "paired_wilcoxon_p"}
            )
            yield Observation(paired["mcnemar"]["p"], {**attrs, "stat": "paired_mcnemar_p"})
