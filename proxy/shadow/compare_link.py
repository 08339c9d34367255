"""The mirror process's side of its compare workers (``proxy.mirror_workers`` processes).

Comparing costs CPU that the live path must never wait for, so it runs in processes at idle CPU
priority (``compare_worker``), while the mirror process that calls candidates and times them
runs at normal priority. Each worker gets at most ``_CREDIT`` pairs at a time; the rest wait
here (counted in ``backlog``, which holds new calls back in the scheduler). All pairs of one live
request go to the same worker, so a candidate's verdicts meet the noise-floor twin's there.
A worker that dies is restarted; the pairs it held are counted as ``compare_lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any

from ..settings import Settings
from ..telemetry import Telemetry, merge_prometheus_text
from ..wire import exchange_to_wire, frame, out_of_band, read_frame, spawn_child, write_frame
from .compare_stage import Pair

log = logging.getLogger("shadowproxy.mirror")

# Pairs a worker holds at once: enough to keep it busy between acks, few enough that a worker
# that dies loses little and pairs wait where the queue's bounds see them.
_CREDIT = 8
# Pairs gather this long before they go to a worker (or until a worker's credit's worth is
# waiting): at a hundred copies a second a worker woken per pair spent more on waking than on
# comparing. 20 ms -> 100 ms took the compare worker from 0.68 to 0.35 ms of CPU per copy at
# 120 copies a second; the shadow side never minds 100 ms.
_GATHER_S = 0.1
_RESTART_DELAY_S = 1.0


def pair_to_wire(p: Pair) -> tuple[Any, ...]:
    return (
        p.seq,
        p.candidate,
        p.model,
        p.request_id,
        p.received_at,
        p.request_headers,
        out_of_band(p.request_body),
        exchange_to_wire(p.ref),
        exchange_to_wire(p.cand),
        p.canary,
        p.live_span,
        p.protocol,
    )


class _Worker:
    """One compare worker process and the pairs it holds or that wait for it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reader_task: asyncio.Task[None] | None = None
        self.held: Counter[str] = Counter()
        """Pairs sent and not yet acknowledged, by candidate."""
        self.waiting: deque[Pair] = deque()
        self.queries: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.unstored = 0
        """Its verdicts not yet written, as of its last word."""
        self.send_scheduled = False

    @property
    def up(self) -> bool:
        return self.writer is not None and not self.writer.is_closing()

    @property
    def outstanding(self) -> int:
        return sum(self.held.values())


class CompareLink:
    """A ``CompareSink`` whose compare stage runs in worker processes."""

    def __init__(self, settings: Settings, telemetry: Telemetry) -> None:
        self._settings = settings
        self._tel = telemetry
        self.workers = settings.proxy.mirror_workers
        # A candidate's verdict and the noise-floor twin's on the same request must meet in one
        # worker (paired tests): then all pairs of a request go to the same worker.
        self._affinity = any(c.noise_floor for c in settings.candidates)
        self._workers = [_Worker(i) for i in range(self.workers)]
        self.backlog = 0
        self.completed = 0
        self.dropped = 0
        self.outcomes: Counter[tuple[str, str]] = Counter()
        """(candidate, outcome) of every pair compared: coverage, without asking the workers."""
        self.on_done: list[Callable[[], None]] = []
        self._closing = False
        self._qid = itertools.count(1)
        self._restarts: set[asyncio.Task[None]] = set()
        self._notifying = False
        self._idle = asyncio.Event()
        """Set when no pair is left to compare."""

    async def start(self) -> None:
        await asyncio.gather(*(self._spawn(w) for w in self._workers))

    async def _spawn(self, w: _Worker) -> None:
        w.proc, reader, writer = await spawn_child("proxy.shadow.compare_worker")
        # The CPU budget is shared: each worker keeps to its part of it.
        budget = self._settings.proxy.mirror_cpu_budget / self.workers
        write_frame(writer, (self._settings, budget))
        try:
            ready = await asyncio.wait_for(read_frame(reader), timeout=60)
        except (asyncio.IncompleteReadError, TimeoutError) as exc:
            raise RuntimeError("a compare worker did not start; see its log above") from exc
        if ready != ("ready",):
            raise RuntimeError(f"a compare worker failed to start: {ready!r}")
        w.writer = writer  # only now: pairs must not reach it before its settings
        w.reader_task = asyncio.get_running_loop().create_task(self._read(w, reader))
        self._send_waiting(w)

    @property
    def unstored(self) -> int:
        return sum(w.unstored for w in self._workers)

    def comparing(self) -> Counter[str]:
        """Pairs not yet compared, per candidate."""
        out: Counter[str] = Counter()
        for w in self._workers:
            out.update(w.held)
            out.update(p.candidate for p in w.waiting)
        return +out

    def submit(self, pair: Pair) -> None:
        if self._affinity:
            w = self._workers[pair.seq % self.workers]
        else:
            # The least loaded worker that is up: a slow or restarting one holds up nobody.
            w = min(self._workers, key=lambda x: (not x.up, x.outstanding + len(x.waiting)))
        self.backlog += 1
        w.waiting.append(pair)
        # Sent at the end of this turn of the loop, with every other pair made meanwhile: one
        # write for all of them (a write each cost a tenth of this process's CPU).
        if len(w.waiting) + w.outstanding >= _CREDIT:
            self._send_waiting(w)  # a full batch: nothing to wait for
        elif not w.send_scheduled:
            w.send_scheduled = True
            asyncio.get_running_loop().call_later(_GATHER_S, self._send_scheduled, w)

    def _send_scheduled(self, w: _Worker) -> None:
        w.send_scheduled = False
        self._send_waiting(w)

    def sweep(self, max_age_s: float) -> None:
        now = time.monotonic()
        for w in self._workers:
            while w.waiting and now - w.waiting[0].queued_at > max_age_s:
                self._drop_stale(w.waiting.popleft())

    def _drop_stale(self, pair: Pair) -> None:
        self._tel.mirror(pair.candidate, "dropped_queue_age")
        self.dropped += 1
        self._finished(pair.candidate)

    def _send_waiting(self, w: _Worker) -> None:
        if not w.up or w.writer is None:
            return
        chunks: list[bytes | memoryview] = []
        max_age = self._settings.proxy.mirror_queue_age_s
        now = time.monotonic()
        while w.waiting and w.outstanding < _CREDIT:
            pair = w.waiting.popleft()
            if now - pair.queued_at > max_age:
                self._drop_stale(pair)
                continue
            w.held[pair.candidate] += 1
            chunks += frame(("pair", pair_to_wire(pair)))
        if chunks:
            w.writer.writelines(chunks)

    def _finished(self, candidate: str, n: int = 1) -> None:
        self.backlog -= n
        if not self.backlog:
            self._idle.set()
        # Told once the current step is over: a callback that submits more pairs must not run
        # while a worker's queue is being walked.
        if not self._notifying:
            self._notifying = True
            asyncio.get_running_loop().call_soon(self._notify)

    def _notify(self) -> None:
        self._notifying = False
        for callback in self.on_done:
            callback()

    async def _read(self, w: _Worker, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                kind, key, payload = await read_frame(reader)
                if kind == "done":
                    w.unstored = payload
                    for candidate, outcome in key:
                        w.held[candidate] -= 1
                        self.outcomes[(candidate, outcome)] += 1
                        self._finished(candidate)
                    self.completed += len(key)
                    self._send_waiting(w)
                elif kind == "stored":
                    w.unstored = payload
                elif kind == "snap" and key in w.queries:
                    w.queries[key].set_result(payload)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        if w.writer is not None:
            w.writer.close()
        for candidate, n in w.held.items():
            if n:
                self._tel.mirror(candidate, "compare_lost", n)
                self._finished(candidate, n)
        w.held.clear()
        w.unstored = 0
        if self._closing:
            return
        code = await w.proc.wait() if w.proc else None
        log.error("compare worker %d exited (%s); restarting it", w.index, code)
        await asyncio.sleep(_RESTART_DELAY_S)
        task = asyncio.get_running_loop().create_task(self._restart(w))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, w: _Worker) -> None:
        while not self._closing:
            try:
                await self._spawn(w)
                return
            except Exception:
                log.exception("compare worker %d restart failed; trying again", w.index)
                await asyncio.sleep(_RESTART_DELAY_S * 5)

    async def snapshot(self) -> Mapping[str, Any]:
        """Every worker's tallies and metrics text."""
        snaps = await asyncio.gather(*(self._query(w) for w in self._workers))
        tally: list[list[Any]] = []
        texts: list[str] = []
        for snap in snaps:
            if snap is None:
                continue
            tally += snap["tally"]
            texts.append(snap["prometheus"])
        return {
            "tally": tally,
            "prometheus": merge_prometheus_text(texts),
        }

    async def _query(self, w: _Worker) -> dict[str, Any] | None:
        if not w.up or w.writer is None:
            return None
        qid = next(self._qid)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        w.queries[qid] = future
        write_frame(w.writer, ("snap", qid))
        try:
            # Shorter than the live side's wait for the whole answer, so one worker that does
            # not answer (starved, stopped) leaves the others' figures in it.
            return await asyncio.wait_for(future, timeout=3)
        except TimeoutError:
            return None
        finally:
            w.queries.pop(qid, None)

    async def close(self) -> None:
        """Let the workers compare what they were given (for the drain timeout), then stop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.proxy.drain_timeout_s
        while self.backlog and any(w.up for w in self._workers):
            self._idle.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), min(remaining, 0.5))
        self._closing = True
        for task in list(self._restarts):
            task.cancel()
        for w in self._workers:
            for pair in w.waiting:
                self._tel.mirror(pair.candidate, "dropped_shutdown")
            w.waiting.clear()
            if w.up and w.writer is not None:
                write_frame(w.writer, ("close", None))
            elif w.proc is not None and w.proc.returncode is None:
                # Not up: still starting (its restart was just cancelled) or its link is gone.
                # It holds nothing and would never hear "close": stop it now.
                w.proc.kill()
        for w in self._workers:
            if w.proc is not None:
                try:
                    await asyncio.wait_for(w.proc.wait(), self._settings.proxy.drain_timeout_s + 10)
                except TimeoutError:
                    w.proc.kill()
                    await w.proc.wait()
            if w.reader_task is not None:
                await asyncio.gather(w.reader_task, return_exceptions=True)
