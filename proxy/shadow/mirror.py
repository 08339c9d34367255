"""The mirror scheduler: the shadow side's I/O stage (sample, queue, call, time, pair).

``offer()`` is synchronous and never awaits: per candidate it decides sampling, and queues the
copy (``shadow_queue.CopyQueue``). Copies leave the queue as call slots (``max_in_flight`` per
candidate) and the compare stage allow: a copy beyond either waits rather than being dropped;
only the queue's own bounds (bytes, age), an open circuit breaker or shutdown drop one, each
counted by reason. A started copy is checked once (unsafe requests are skipped and counted by
reason), sent to the candidate under its own timeout, timed here, paired with the reference's
answer (which the live path publishes), and handed to the compare stage (``CompareSink``): in
this process, or in compare worker processes at idle CPU priority.

In ``serve``'s default setup this runs in the mirror process at the live path's own CPU priority
(``mirror_worker``), so a busy host delays a candidate's answer no more than the reference's
and latency gates compare like with like; only comparing runs at idle priority.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind

from ..canary.evidence import EvidenceBuffer
from ..canary.gates import UNCOMPARED
from ..protocols.model_config import ModelConfigs
from ..protocols.v2_rest.routes import RouteKind
from ..settings import CandidateSettings, Settings
from ..telemetry import Telemetry
from .analysis import Exchange
from .copy_checks import CopyChecks, make_pair, refusal
from .coverage import is_fate
from .guards import CpuBudget, LoopLag, stop_task
from .mirror_api import CompareSink, MirrorRequest, sampled
from .shadow_calls import ShadowCalls
from .shadow_client import ShadowClient
from .shadow_queue import CopyQueue, Job, QueuedCopy

log = logging.getLogger("shadowproxy.mirror")

# Pairs handed to the compare stage and not yet compared, per compare worker, beyond which no
# new call starts (copies wait in the queue, where their age and bytes are bounded).
COMPARE_WINDOW = 32
# The mirror process's CPU, as a share of ``proxy.mirror_cpu_budget`` (the compare workers share
# all of it): it starts no new call beyond that, so at normal priority it cannot crowd the live
# path either.
MIRROR_SHARE = 0.5
# How often waiting copies are checked for age (and the queue pumped).
_SWEEP_S = 0.25


class MirrorScheduler:
    def __init__(
        self,
        settings: Settings,
        client: ShadowClient,
        telemetry: Telemetry,
        sink: CompareSink,
        evidence: EvidenceBuffer | None = None,
        *,
        live_process: bool = True,
    ) -> None:
        self._settings = settings
        self._evidence = evidence
        self._canary_name = settings.canary.candidate if settings.canary else None
        self._client = client
        self._tel = telemetry
        self._sink = sink
        sink.on_done.append(self._pump)
        self._window = COMPARE_WINDOW * sink.workers
        self._cands = {c.name: c for c in settings.candidates}
        self._seq = itertools.count(1)
        self._calling = {c.name: 0 for c in settings.candidates}
        self._calls = ShadowCalls(settings, client, telemetry, evidence)
        proxy = settings.proxy
        self._queue = CopyQueue(proxy.mirror_queue_bytes, proxy.mirror_queue_age_s)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._pumping = False
        self._rng = random.Random()
        self._models = ModelConfigs(client.session(), settings.reference.url)
        self._checks = CopyChecks(settings, self._models)
        # Only the live process's lag says the host is overloaded: in the mirror process a late
        # loop means only that it was made to wait, and its copies wait in the queue.
        self._lag = LoopLag(proxy.shed_lag_ms) if live_process and proxy.shed_lag_ms else None
        self._sweeper: asyncio.Task[None] | None = None
        # In the mirror process, which runs at the live path's priority: its share of the CPU
        # budget (``MIRROR_SHARE`` of it; a call and its timing cost about half a comparison).
        self._cpu = (
            None
            if live_process or not proxy.mirror_cpu_budget
            else CpuBudget(proxy.mirror_cpu_budget * MIRROR_SHARE)
        )
        self._resume: asyncio.TimerHandle | None = None
        self._owed = False
        self._live = 0
        """Live calls in flight whose copies are here (their reference answer not yet known)."""
        self._live_peak = [0, 0]
        """The most of them at once in the previous and the current sweep period."""
        self._ended = 0
        """Jobs that ended without a pair to compare (failed calls, unsafe copies)."""
        self._shed = 0

    def admit(self, model: str, headers: Mapping[str, str]) -> bool:
        return True  # in this process every copy meets the guards in offer()

    def offer(self, req: MirrorRequest) -> None:
        """Queue a job per sampled candidate. Never blocks, never raises into the caller."""
        copy = QueuedCopy(req, len(req.body) + 64 * len(req.headers))
        if req.route.model is None and req.route.kind is RouteKind.OPENAI:
            # Its model is in the body: read here, off the live path, to choose candidates (the
            # one parse of the copy, which its jobs then need not repeat).
            facts = self._checks.inspect(copy)
            req.route = replace(req.route, model=(facts.model if facts else None) or "")
        model = req.route.model or ""
        req.seq = next(self._seq)
        jobs: list[Job] = []
        for cand in self._settings.candidates:
            if not cand.shadows(model):
                continue
            reverse = req.served_by == cand.name
            if req.served_by is not None and not reverse:
                # The canary answered: there is no reference answer to compare this one with.
                self._tel.skipped("served_by_canary", cand.name)
                continue
            if not reverse and not sampled(cand, req.headers, self._rng):
                # (A canary answer is always compared: its copy goes to the reference.)
                self._tel.skipped("not_sampled", cand.name)
                continue
            dropped = self._drop_reason(copy.size)
            if dropped is not None:
                self._drop(Job(copy, cand, reverse), dropped)
                continue
            jobs.append(Job(copy, cand, reverse))
        if jobs:
            self._live += 1
            self._live_peak[1] = max(self._live_peak[1], self._live)
            req.reference.add_done_callback(self._live_done)
            self._queue.put(copy, jobs)
            self._pump()

    def _live_done(self, _: asyncio.Future[Exchange | None]) -> None:
        self._live -= 1

    def _drop_reason(self, size: int) -> str | None:
        """Why a new copy cannot even wait (each reason counted), or None."""
        if self._closing:
            return "dropped_shutdown"
        if self._lag is not None and self._lag.overloaded():
            # The live loop is late: this process is CPU-bound. Shadow work would come out of
            # live latency, so the copy is dropped (and counted) until the loop catches up.
            return "dropped_overload"
        if not self._queue.fits(size):
            return "dropped_queue_bytes"
        return None

    def _drop(self, job: Job, reason: str) -> None:
        self._tel.mirror(job.cand.name, reason)
        self._shed += reason in ("dropped_queue_bytes", "dropped_queue_age")
        req: MirrorRequest = job.copy.request
        if job.reverse and self._evidence is not None and req.canary is not None:
            self._evidence.add(req.canary, {UNCOMPARED: 1})  # a canary answer unchecked

    def _pump(self) -> None:
        """Start waiting jobs while their candidates have call slots and the compare stage has
        room, one per candidate in turn (a slow candidate never holds up another's copies)."""
        if self._pumping or self._resume is not None:
            return
        if self._cpu is not None and not self._owed:
            pause = self._cpu.pause_s()
            if pause:
                # Over its share of the CPU budget: new calls wait (calls in flight are still
                # answered and timed at once), and copies wait in the queue meanwhile.
                self._resume = asyncio.get_running_loop().call_later(pause, self._resumed)
                return
        self._owed = False
        self._pumping = True
        try:
            progress = True
            while progress and self._sink.backlog < self._window:
                progress = False
                for name in self._queue.candidates():
                    if self._calling[name] >= self._call_limit(self._cands[name]):
                        continue
                    job = self._queue.pop(name)
                    if job is None:
                        continue
                    progress = True
                    if self._queue.stale(job):
                        self._drop(job, "dropped_queue_age")
                    elif not job.reverse and self._calls.breakers[name].is_open():
                        # The candidate is down: the copy would only wait for it to fail.
                        # (Asked once per copy, as it starts: asking lets one probe through.)
                        self._drop(job, "dropped_circuit_open")
                    else:
                        self._start(job)
        finally:
            self._pumping = False

    @property
    def taken(self) -> int:
        """Copies the shadow side got through (compared, or ended at the candidate), and
        ``shed``: copies the queue's bounds dropped. The mirror process paces the live side by
        them (``guards.Pacer``)."""
        return self._sink.completed + self._ended

    @property
    def shed(self) -> int:
        return self._shed + self._sink.dropped

    def _start(self, job: Job) -> None:
        self._calling[job.cand.name] += 1
        task = asyncio.get_running_loop().create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _call_limit(self, cand: CandidateSettings) -> int:
        """Calls in flight allowed to ``cand`` now.

        The canary candidate's shadow calls time it against the reference's live calls, so they
        go out at no more than the live path's own recent concurrency: copies that waited (for
        CPU, say) would otherwise start in a burst, queue up inside the candidate's server, and
        make it look slower than it is.
        """
        if cand.name != self._canary_name:
            return cand.max_in_flight
        return min(cand.max_in_flight, max(1, *self._live_peak))

    def _resumed(self) -> None:
        # After a pause the queue moves, whatever the budget says: when this process's own
        # fixed costs (reading copies) exceed its share, it must still make progress.
        self._resume = None
        self._owed = True
        self._pump()

    def start(self) -> None:
        if self._cpu is not None:
            self._cpu.reset()
        if self._lag is not None:
            self._lag.start()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_S)
            self._queue.sweep(lambda job: self._drop(job, "dropped_queue_age"))
            self._sink.sweep(self._queue.max_age_s)
            self._live_peak = [self._live_peak[1], self._live]
            self._pump()

    def note_skip(self, reason: str) -> None:
        self._tel.skipped(reason)

    def in_flight(self) -> dict[str, int]:
        """Per candidate: copies waiting, being called or being compared; ``*compare``: pairs not
        yet compared; ``*store``: verdicts not yet written."""
        comparing = self._sink.comparing()
        out = {
            name: self._queue.waiting(name) + n + comparing[name]
            for name, n in self._calling.items()
        }
        out["*compare"] = self._sink.backlog
        out["*store"] = self._sink.unstored
        return out

    async def progress(self, *, include_tally: bool = False) -> dict[str, Any]:
        """In-flight counts and the fate of every copy so far (``coverage``); this process's
        own tallies only if asked (in the live process they are the caller's already)."""
        fates = [[c, w, n] for (c, w), n in self._sink.outcomes.items()]
        if include_tally:
            fates += [[c, w, n] for (c, w), n in self._tel.tally.items() if is_fate(w)]
        return {"in_flight": self.in_flight(), "pending": 0, "fates": fates}

    async def snapshot(self, *, include_tally: bool = False) -> dict[str, Any]:
        """In-flight counts and tallies. In the live process the tallies are already in its own
        telemetry (the same object), so they are left out unless asked."""
        tally = [[c, w, n] for (c, w), n in self._tel.tally.items()] if include_tally else []
        sink = await self._sink.snapshot()
        return {
            "tally": tally + list(sink["tally"]),
            "in_flight": self.in_flight(),
            "prometheus": sink["prometheus"],
            "worker": "in-process",
            "pending": 0,
            "queue_bytes": self._queue.bytes,
        }

    async def close(self) -> None:
        """Stop taking copies; let queued and in-flight ones finish for the drain timeout, drop
        (and count) the rest, then let the compare stage finish what it was given."""
        self._closing = True
        if self._lag is not None:
            await self._lag.stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.proxy.drain_timeout_s
        while (self._tasks or len(self._queue)) and loop.time() < deadline:
            self._pump()
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=min(0.1, deadline - loop.time()))
            else:
                await asyncio.sleep(0.02)
        await stop_task(self._sweeper)
        if self._resume is not None:
            self._resume.cancel()
        for job in self._queue.drain():
            self._drop(job, "dropped_shutdown")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._models.close()
        await self._sink.close()

    async def _run(self, job: Job) -> None:
        name = job.cand.name
        try:
            if self._tel.exporting:
                await self._traced(job)
            else:
                await self._mirror_one(job)
        except asyncio.CancelledError:
            self._tel.mirror(name, "cancelled")
            raise
        except Exception:
            log.exception("mirror to %s failed unexpectedly", name)
            self._tel.mirror(name, "internal_error")
        finally:
            self._calling[name] -= 1
            self._pump()

    async def _traced(self, job: Job) -> None:
        req: MirrorRequest = job.copy.request
        links = [Link(req.live_span)] if req.live_span is not None else []
        span = self._tel.tracer.start_span(
            f"shadow {job.cand.name}",
            kind=SpanKind.CLIENT,
            links=links,
            attributes={"shadowproxy.candidate": job.cand.name},
        )
        with trace.use_span(span, end_on_exit=True):
            await self._mirror_one(job)

    async def _mirror_one(self, job: Job) -> None:
        copy, cand = job.copy, job.cand
        req: MirrorRequest = copy.request
        if not copy.checked:
            await self._checks.check(copy)
        unsafe = refusal(copy, cand)
        if unsafe is not None:
            self._tel.skipped(unsafe, cand.name)
            self._ended += 1
            return
        answers = await self._calls.both_answers(cand, req, job.reverse)
        if answers is None:
            self._ended += 1
            return
        pair = make_pair(self._settings, copy, cand, *answers)
        pair.queued_at = job.enqueued
        self._sink.submit(pair)
