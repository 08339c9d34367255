"""Mirroring in other processes: the live process only ships copies over a socket.

Shadow work (candidate calls, decoding, comparison, storage, telemetry for all of it) costs
several times the CPU of forwarding. In the live process it would share the event loop, the GIL
and the garbage collector with live requests. With ``proxy.mirror_process`` (the default for
``serve``) it runs in the mirror process (``proxy.mirror_worker``: queue, candidate calls and
their timing, at normal priority) and its compare workers (idle priority); ``MirrorLink`` is the
live side's end. It never awaits on the live path: a copy is one framed write, and the
reference's answer follows in a second frame when the live call ends. Frames are batched: those
of the next ``FLUSH_DELAY_S`` go out in one write, so the live process makes one system call (and
wakes the mirror process once) per batch rather than two per request.

Copies are dropped here, counted per candidate, only when the live process itself is overloaded
(its event loop runs ``proxy.shed_lag_ms`` late), when the mirror process is down or its socket
is full, or beyond the pace the mirror process sends while its queue's bounds drop copies
(``guards.Pacer``): those copies it would certainly have dropped, and refusing them here costs
neither process anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from ..canary.evidence import CanaryTag, EvidenceBuffer
from ..canary.gates import UNCOMPARED
from ..redact import strip_headers
from ..settings import Settings
from ..telemetry import Telemetry
from ..wire import (
    exchange_to_wire,
    frame,
    frame_size,
    out_of_band,
    read_frame,
    route_to_wire,
    spawn_child,
    write_frame,
)
from .analysis import Exchange
from .coverage import is_fate
from .guards import LoopLag, TokenBucket
from .mirror_api import MirrorRequest, sampled

log = logging.getLogger("shadowproxy.mirror")

# Copies waiting in the socket buffer beyond this are dropped (the mirror process is stuck).
MAX_BUFFERED_BYTES = 128 * 1024 * 1024
# Copies wait this long for company before they are written (or until FLUSH_BYTES of them wait):
# at a hundred copies a second one write per copy cost the mirror process a third of its CPU,
# and 20 ms -> 100 ms took it from 0.48 to 0.22 ms per copy (the live process from 0.58 to 0.48
# ms per request). A copy reaches its candidate up to this much later than the live call: the
# candidate's latency is timed from its own call, and comparisons do not mind.
FLUSH_DELAY_S = 0.1
FLUSH_BYTES = 256 * 1024
_RESTART_DELAY_S = 1.0


class MirrorLink:
    """The live process's side of the mirror worker; same interface as ``MirrorScheduler``."""

    def __init__(
        self, settings: Settings, telemetry: Telemetry, evidence: EvidenceBuffer | None = None
    ) -> None:
        self._settings = settings
        self._tel = telemetry
        self._evidence = evidence
        """The canary's evidence: a canary answer whose copy is dropped here goes unchecked."""
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._silent = False
        """A query went unanswered and the process has said nothing since (stopped, hung): the
        next ones wait briefly, so a summary does not take 5 s per question."""
        self._queries: dict[int, asyncio.Future[dict[str, Any] | None]] = {}
        """Snapshots asked of the running mirror process; None answers one that died first."""
        self._qid = itertools.count(1)
        self._seq = itertools.count(1)
        self._sent = 0
        self._closing = False
        self._restart_task: asyncio.Task[None] | None = None
        self._outbox: list[bytes | memoryview] = []
        """Frames (length prefix, pickle, ...) waiting for the next batched write."""
        self._outbox_bytes = 0
        self._flush_handle: asyncio.TimerHandle | None = None
        self._pace = TokenBucket()
        """The mirror process's pace (``guards.Pacer``): copies beyond it are dropped here."""
        self._rng = random.Random()
        self._base: Counter[tuple[str, str]] = Counter()
        """Fates from mirror processes that died: their counts live on here."""
        self._last: dict[str, Any] = {}
        """The last progress the running mirror process reported (its fates, its in-flight)."""
        self._shed_ms = settings.proxy.shed_lag_ms
        self._forwards = _forwards_credentials(settings)
        self._gen = 0
        """Which mirror process copies go to: a reload starts a new one and retires the old."""
        self._awaiting: Counter[int] = Counter()
        """Per process: copies whose reference answer it has not been sent yet."""
        self._retired: dict[int, _Retired] = {}
        # The live loop's lag: the one overload signal (the mirror processes' copies queue).
        self._lag = LoopLag(self._shed_ms) if self._shed_ms else None

    async def start(self) -> None:
        """Start the mirror process and wait until it is ready (its start-up errors surface
        here, its compare workers' too)."""
        if self._lag is not None and self._proc is None:
            self._lag.start()
        self._adopt(*await self._spawn(self._settings))

    async def _spawn(
        self, settings: Settings
    ) -> tuple[asyncio.subprocess.Process, asyncio.StreamReader, asyncio.StreamWriter]:
        proc, reader, writer = await spawn_child("proxy.shadow.mirror_worker")
        write_frame(writer, settings)
        try:
            ready = await asyncio.wait_for(read_frame(reader), timeout=60)
        except (asyncio.IncompleteReadError, TimeoutError) as exc:
            proc.kill()
            raise RuntimeError("the mirror worker did not start; see its log above") from exc
        if ready != ("ready",):
            proc.kill()
            raise RuntimeError(f"the mirror worker failed to start: {ready!r}")
        return proc, reader, writer

    def _adopt(
        self,
        proc: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """From now on copies go to this (ready) process."""
        self._proc, self._writer = proc, writer
        self._gen += 1
        self._sent = 0
        self._pace.set_rate(None)  # a new worker has spent nothing yet
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader, self._gen))
        log.info("mirror worker started (pid %s)", proc.pid)

    async def reload(self, settings: Settings) -> None:
        """Mirror with new settings (candidates, sampling, comparisons) without losing a copy.

        A new mirror process starts with them; once it is ready it takes every copy, and the
        old one is sent the reference answers still owed to its copies, then drains and exits.
        The fates it reports last are kept (coverage counts every copy once).
        """
        self._settings = settings
        self._forwards = _forwards_credentials(settings)
        if self._proc is None or self._writer is None or self._closing:
            return
        proc, reader, writer = await self._spawn(settings)
        if self._closing:
            proc.kill()
            await proc.wait()
            return
        # No await from here on: a copy is either the old process's (batched until now, with
        # its reference owed to it) or the new one's.
        self._flush()
        gen = self._gen
        self._retired[gen] = _Retired(self._proc, self._writer, self._reader_task, self._last)
        self._last = {}
        self._adopt(proc, reader, writer)
        if not self._awaiting[gen]:
            self._retire(gen)

    def _up(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    def admit(self, model: str, headers: Mapping[str, str]) -> bool:
        if self._lag is not None and self._lag.overloaded():
            # The live loop is late: this process is CPU-bound, and building the copy would
            # come out of live latency. Dropped (and counted) until the loop catches up.
            self._dropped("overload", model, headers)
            return False
        if self._pace.take():
            return True
        self._dropped("worker_budget", model, headers)
        return False

    def _dropped(
        self,
        reason: str,
        model: str,
        headers: Mapping[str, str],
        served_by: str | None = None,
        canary: CanaryTag | None = None,
    ) -> None:
        """Count a copy dropped here against each candidate that asked for it (a canary answer's
        copy: against the canary only, whose answer then goes unchecked: its step's evidence
        counts it as uncompared)."""
        if served_by is not None:
            self._tel.link_dropped(reason, served_by)
            if canary is not None and self._evidence is not None:
                self._evidence.add(canary, {UNCOMPARED: 1})
            return
        for cand in self._settings.candidates:
            if cand.shadows(model) and sampled(cand, headers, self._rng):
                self._tel.link_dropped(reason, cand.name)

    def offer(self, req: MirrorRequest) -> None:
        writer = self._writer
        if writer is None or writer.is_closing() or self._closing:
            self._dropped(
                "worker_down", req.route.model or "", req.headers, req.served_by, req.canary
            )
            return
        if writer.transport.get_write_buffer_size() + self._outbox_bytes > MAX_BUFFERED_BYTES:
            self._dropped(
                "link_full", req.route.model or "", req.headers, req.served_by, req.canary
            )
            return
        seq = next(self._seq)
        span = req.live_span
        wire_span = (span.trace_id, span.span_id, int(span.trace_flags)) if span else None
        self._queue(
            (
                "req",
                seq,
                route_to_wire(req.route),
                req.query,
                # Credentials cross to the mirror process only for a candidate that gets them.
                list(req.headers.items()) if self._forwards else strip_headers(req.headers.items()),
                out_of_band(req.body),
                req.received_at,
                wire_span,
                req.served_by,
                req.canary,
            ),
        )
        self._sent += 1
        self._awaiting[self._gen] += 1
        req.reference.add_done_callback(partial(self._send_reference, seq, self._gen))

    def _send_reference(self, seq: int, gen: int, future: asyncio.Future[Exchange | None]) -> None:
        self._awaiting[gen] -= 1
        if gen == self._gen:
            if not self._awaiting[gen]:
                del self._awaiting[gen]
            if self._up():
                self._queue(("ref", seq, exchange_to_wire(future.result())))
            return
        retired = self._retired.get(gen)
        if retired is not None and not retired.writer.is_closing():
            write_frame(retired.writer, ("ref", seq, exchange_to_wire(future.result())))
        if not self._awaiting[gen]:
            self._retire(gen)

    def _retire(self, gen: int) -> None:
        """Every reference answer the retired process waits for is sent: let it drain and go."""
        self._awaiting.pop(gen, None)
        retired = self._retired.get(gen)
        if retired is not None and not retired.writer.is_closing():
            write_frame(retired.writer, ("close",))

    def note_skip(self, reason: str) -> None:
        if self._up():
            self._queue(("skip", reason))

    def _queue(self, message: Any) -> None:
        chunks = frame(message)
        self._outbox += chunks
        self._outbox_bytes += frame_size(chunks)
        if self._outbox_bytes >= FLUSH_BYTES:
            self._flush()  # large copies go at once: bytes held here count against the link
        elif self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(FLUSH_DELAY_S, self._flush)

    def _flush(self) -> None:
        """Write the batched frames in one call (before any control frame, to keep the order)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._outbox and self._up() and self._writer is not None:
            self._writer.writelines(self._outbox)
        self._outbox.clear()
        self._outbox_bytes = 0

    async def progress(self) -> dict[str, Any]:
        return await self._ask("progress")

    async def snapshot(self) -> dict[str, Any]:
        """The worker's tallies, in-flight counts and metrics text."""
        return await self._ask("snap")

    async def _ask(self, what: str) -> dict[str, Any]:
        empty: dict[str, Any] = {
            "tally": [],
            "in_flight": {},
            "prometheus": "",
            "worker": "down",
            "pending": 0,
        }
        if not self._up() or self._writer is None:
            # Down (or restarting): what it held was counted when it died; copies meanwhile
            # are dropped and counted here, so nothing is pending.
            return empty
        qid = next(self._qid)
        future: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._queries[qid] = future
        self._flush()
        write_frame(self._writer, (what, qid))
        try:
            snap = await asyncio.wait_for(future, timeout=0.2 if self._silent else 5)
        except TimeoutError:
            self._silent = True
            # Not "nothing pending": whatever it holds is still there (``drained`` waits on).
            return {**empty, "worker": "not answering", "pending": None}
        finally:
            self._queries.pop(qid, None)
        if snap is None:
            return empty  # it died meanwhile: what it held is counted as lost, none pending
        snap["pending"] = self._sent - snap.pop("received", 0)
        rows = snap.get("fates") if what == "progress" else snap.get("tally")
        if rows is not None:
            self._last = {"fates": rows, "in_flight": snap.get("in_flight", {})}
        key = "fates" if what == "progress" else "tally"
        snap[key] = list(snap.get(key, [])) + [[c, w, n] for (c, w), n in self._base.items()]
        return snap

    async def _read(self, reader: asyncio.StreamReader, gen: int) -> None:
        final: dict[str, Any] | None = None
        try:
            while True:
                kind, qid, payload = await read_frame(reader)
                if gen == self._gen:
                    self._silent = False
                if kind == "snap" and qid in self._queries and gen == self._gen:
                    self._queries[qid].set_result(payload)
                elif kind == "pace" and gen == self._gen:
                    self._pace.set_rate(qid)
                elif kind == "final":
                    final = payload
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        retired = self._retired.pop(gen, None)
        if retired is not None:
            # A process retired by a reload: its last word is the fate of all its copies.
            retired.writer.close()
            self._bury(retired.last if final is None else final)
            status = await retired.proc.wait()
            log.info("mirror worker %s retired by a reload exited (%s)", retired.proc.pid, status)
            return
        if self._writer is not None:
            self._writer.close()
        for future in self._queries.values():
            if not future.done():
                future.set_result(None)  # no answer is coming: do not make them wait 5 s
        if not self._closing:
            code = await self._proc.wait() if self._proc else None
            self._bury(self._last)
            self._last = {}
            self._outbox.clear()  # frames for a worker that died go with it, as written ones did
            self._outbox_bytes = 0
            log.error("mirror worker exited (%s); copies are dropped until it restarts", code)
            asyncio.get_running_loop().call_later(_RESTART_DELAY_S, self._restart)

    def _bury(self, last: Mapping[str, Any]) -> None:
        """A mirror process ended: keep the counts it reported last, and count what it held
        then (its copies in flight, unless it said so itself as it left)."""
        for c, w, n in last.get("fates", []):
            if is_fate(w):
                self._base[(c, w)] += n
        for candidate, n in last.get("in_flight", {}).items():
            if n and not candidate.startswith("*"):
                self._tel.link_dropped("worker_lost", candidate, n)

    def _restart(self) -> None:
        if self._closing or self._up():
            return  # stopping, or a reload already started another

        async def again() -> None:
            try:
                await self.start()
            except Exception:
                log.exception("mirror worker restart failed; trying again")
                asyncio.get_running_loop().call_later(_RESTART_DELAY_S * 5, self._restart)

        self._restart_task = asyncio.get_running_loop().create_task(again())

    async def close(self) -> None:
        """Tell the worker to drain and exit; kill it if it outlives the drain timeout."""
        self._closing = True
        if self._lag is not None:
            await self._lag.stop()
        if self._restart_task is not None:
            self._restart_task.cancel()
            await asyncio.gather(self._restart_task, return_exceptions=True)
        # It drains its queue, then its compare workers, each up to the drain timeout; a process
        # that does not read its socket (stopped, hung) must not hold shutdown past that either.
        limit = 2 * self._settings.proxy.drain_timeout_s + 10
        deadline = asyncio.get_running_loop().time() + limit
        if self._writer is not None and not self._writer.is_closing():
            self._flush()
            write_frame(self._writer, ("close",))
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(self._writer.drain(), limit)
        # Processes a reload retired: the live requests have ended, so none is owed an answer.
        retired = list(self._retired.values())
        for gen in list(self._retired):
            self._retire(gen)
        for proc in [r.proc for r in retired] + ([self._proc] if self._proc else []):
            try:
                remaining = max(0.0, deadline - asyncio.get_running_loop().time())
                await asyncio.wait_for(proc.wait(), remaining)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        tasks = [r.reader_task for r in retired] + [self._reader_task]
        await asyncio.gather(*(t for t in tasks if t is not None), return_exceptions=True)
        if self._writer is not None:
            self._writer.close()


def _forwards_credentials(settings: Settings) -> bool:
    return any(c.forward_credentials for c in settings.candidates)


@dataclass(slots=True)
class _Retired:
    """A mirror process a reload replaced, until it has drained and exited."""

    proc: asyncio.subprocess.Process
    writer: asyncio.StreamWriter
    reader_task: asyncio.Task[None] | None
    last: dict[str, Any]


def merge_tally(
    *tallies: Mapping[tuple[str, str], int] | list[list[Any]],
) -> dict[str, dict[str, int]]:
    """Candidate -> outcome -> count, from in-process counters and worker snapshots."""
    out: dict[str, dict[str, int]] = {}
    for tally in tallies:
        rows = tally.items() if isinstance(tally, Mapping) else (((c, w), n) for c, w, n in tally)
        for (candidate, what), n in rows:
            out.setdefault(candidate, {})[what] = out.get(candidate, {}).get(what, 0) + n
    return out
