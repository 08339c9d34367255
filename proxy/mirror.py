"""The mirror scheduler: sampled, bounded, tracked shadow calls that never touch the live path.

``offer()`` is synchronous and never awaits: per candidate it decides sampling, checks the
in-flight bound (a full candidate drops the copy and counts it), and starts a tracked task. The
task does everything else off the live path: it parses the request copy (unsafe requests are
skipped and counted by reason), calls the candidate under its own timeout, waits for the reference
answer the live handler publishes, decodes and compares in a worker thread, and stores the verdict.
On shutdown the scheduler stops taking copies, lets in-flight ones finish for
``proxy.drain_timeout_s``, then cancels the rest; the app closes the sessions only after that.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import random
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from multidict import CIMultiDict
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, SpanKind

from .analysis import Analysis, Exchange, analyze
from .buffer.store import SampleStore
from .canary.evidence import CanaryTag, EvidenceBuffer, comparison_counters, pair_counters
from .canary.gates import CAND_CALLS, CAND_ERRORS, REF_CALLS, REF_ERRORS, UNCOMPARED
from .codec import MalformedMessage, parse_request_header, unsafe_to_mirror
from .errors import (
    StoreError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    translate_upstream_error,
)
from .guards import Breaker, CpuBudget, LoopLag
from .judge import Judge
from .model_config import ModelConfigs
from .routes import Route, candidate_path
from .samples import headers_json, sample_meta
from .settings import CandidateSettings, Settings, UpstreamSettings
from .telemetry import Telemetry

log = logging.getLogger("shadowproxy.mirror")

CREDENTIAL_HEADERS = ("Authorization", "Cookie", "Proxy-Authorization")
# Request headers below this size are parsed inline in the task; larger JSON goes to a thread.
_INLINE_PARSE_BYTES = 64 * 1024


@dataclass(slots=True)
class MirrorRequest:
    """A copy of one live infer request; ``reference`` resolves when the live answer is known."""

    route: Route
    query: str
    headers: CIMultiDict[str]
    body: bytes
    received_at: float
    live_span: SpanContext | None
    reference: asyncio.Future[Exchange | None]
    seq: int = 0
    """Set by the scheduler: pairs the candidates' and the twin's verdicts on this request."""
    served_by: str | None = None
    """The canary candidate that answered this request live: the copy goes to the reference."""
    canary: CanaryTag | None = None
    """The canary step whose evidence this request feeds."""


class Mirror(Protocol):
    """What the live path needs from mirroring, in-process (``MirrorScheduler``) or in a worker
    process (``mirror_link.MirrorLink``)."""

    def admit(self) -> bool:
        """Whether to make a copy at all (False: dropped, and counted, before it costs anything).
        Not asked for canary copies: they are evidence and always made."""
        ...

    def offer(self, req: MirrorRequest) -> None: ...

    def note_skip(self, reason: str) -> None: ...

    async def snapshot(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class MirrorScheduler:
    def __init__(
        self,
        settings: Settings,
        session: aiohttp.ClientSession,
        store: SampleStore | None,
        executor: Executor,
        telemetry: Telemetry,
        judge: Judge,
        evidence: EvidenceBuffer | None = None,
    ) -> None:
        self._settings = settings
        self._evidence = evidence
        self._canary_name = settings.canary.candidate if settings.canary else None
        self._session = session
        self._store = store
        self._executor = executor
        self._tel = telemetry
        self._judge = judge
        self._seq = itertools.count(1)
        self._in_flight = {c.name: 0 for c in settings.candidates}
        self._breakers = {
            c.name: Breaker(c.breaker_failures, c.breaker_open_s) for c in settings.candidates
        }
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._rng = random.Random()
        self._models = ModelConfigs(session, settings.reference.url)
        self._lag = LoopLag()
        self._cpu: CpuBudget | None = None  # set in the mirror worker only
        self.taken = 0
        """Copies that started at least one shadow call, and ``shed``: drops for CPU budget or
        loop lag (the worker paces the live side by them; ``guards.Pacer``)."""
        self.shed = 0

    def _sampled(self, cand: CandidateSettings, headers: Mapping[str, str]) -> bool:
        if cand.sample_rate >= 1.0:
            return True
        key = headers.get(cand.sample_key_header) if cand.sample_key_header else None
        if key is not None:
            # A stable hash: the same key is always in or always out, across replicas and restarts.
            digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
            return int.from_bytes(digest, "big") / 2.0**64 < cand.sample_rate
        return self._rng.random() < cand.sample_rate

    def admit(self) -> bool:
        return True  # in this process every copy meets the guards in offer()

    def offer(self, req: MirrorRequest) -> None:
        """Start a shadow call per sampled candidate. Never blocks, never raises into the caller."""
        model = req.route.model or ""
        req.seq = next(self._seq)
        shed_ms = self._settings.proxy.shed_lag_ms
        started = False
        for cand in self._settings.candidates:
            if not cand.shadows(model):
                continue
            reverse = req.served_by == cand.name
            if req.served_by is not None and not reverse:
                # The canary answered: there is no reference answer to compare this one with.
                self._tel.skipped("served_by_canary", cand.name)
                continue
            if not reverse and not self._sampled(cand, req.headers):
                # (A canary answer is always compared: its copy goes to the reference.)
                self._tel.skipped("not_sampled", cand.name)
                continue
            dropped = self._drop_reason(cand, reverse, shed_ms)
            if dropped is not None:
                self._tel.mirror(cand.name, dropped)
                self.shed += dropped in ("dropped_cpu_budget", "dropped_overload")
                if reverse and self._evidence is not None and req.canary is not None:
                    self._evidence.add(req.canary, {UNCOMPARED: 1})  # a canary answer unchecked
                continue
            self._in_flight[cand.name] += 1
            task = asyncio.get_running_loop().create_task(self._run(cand, req))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            started = True
        self.taken += started

    def _drop_reason(self, cand: CandidateSettings, reverse: bool, shed_ms: float) -> str | None:
        """Why a copy cannot be taken now (each reason counted), or None."""
        if self._closing:
            return "dropped_shutdown"
        if self._cpu is not None and self._cpu.over():
            return "dropped_cpu_budget"
        if shed_ms and self._lag.ms > shed_ms:
            # The loop is late: this process is CPU-bound. Shadow work would come out of live
            # latency, so the copy is dropped (and counted) until the loop catches up.
            return "dropped_overload"
        if not reverse and self._breakers[cand.name].is_open():
            # (The candidate's breaker guards calls to the candidate, not reverse copies.)
            return "dropped_circuit_open"
        if self._in_flight[cand.name] >= cand.max_in_flight:
            return "dropped_queue_full"
        return None

    def start(self) -> None:
        self._lag.start()

    def limit_cpu(self, cores: float) -> None:
        """In a process of its own, hold shadow work to this many cores of CPU."""
        self._cpu = CpuBudget(cores)

    def note_skip(self, reason: str) -> None:
        self._tel.skipped(reason)

    async def snapshot(self, *, include_tally: bool = False) -> dict[str, Any]:
        """In-flight counts and population statistics. In the live process the tallies are
        already in its own telemetry (the same object), so they are left out unless asked."""
        tally = [[c, w, n] for (c, w), n in self._tel.tally.items()] if include_tally else []
        return {
            "tally": tally,
            "in_flight": dict(self._in_flight),
            "population": self._judge.population.summary(),
            "prometheus": "",
            "worker": "in-process",
            "pending": 0,
        }

    async def close(self) -> None:
        """Stop taking copies, let in-flight ones finish for the drain timeout, cancel the rest."""
        self._closing = True
        await self._lag.stop()
        if self._tasks:
            _, pending = await asyncio.wait(
                set(self._tasks), timeout=self._settings.proxy.drain_timeout_s
            )
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _run(self, cand: CandidateSettings, req: MirrorRequest) -> None:
        try:
            await self._mirror_one(cand, req)
        except asyncio.CancelledError:
            self._tel.mirror(cand.name, "cancelled")
            raise
        except Exception:
            log.exception("mirror to %s failed unexpectedly", cand.name)
            self._tel.mirror(cand.name, "internal_error")
        finally:
            self._in_flight[cand.name] -= 1

    async def _parse(self, req: MirrorRequest) -> dict[str, Any] | None:
        if len(req.body) <= _INLINE_PARSE_BYTES:
            return parse_request_header(req.body, req.headers)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, parse_request_header, req.body, req.headers
        )

    async def _mirror_one(self, cand: CandidateSettings, req: MirrorRequest) -> None:
        try:
            header = await self._parse(req)
        except MalformedMessage:
            self._tel.skipped("unparseable_request", cand.name)
            return
        reason = unsafe_to_mirror(header)
        if reason is None and await self._models.is_stateful(req.route.model or ""):
            reason = "sequence_model"
        if reason is not None:
            self._tel.skipped(reason, cand.name)
            return
        request_id = (
            req.headers.get(self._settings.proxy.request_id_header)
            or (str(header["id"]) if header and header.get("id") else None)
            or uuid.uuid4().hex
        )
        links = [Link(req.live_span)] if req.live_span is not None else []
        span = self._tel.tracer.start_span(
            f"shadow {cand.name}",
            kind=SpanKind.CLIENT,
            links=links,
            attributes={"shadowproxy.candidate": cand.name, "shadowproxy.request_id": request_id},
        )
        with trace.use_span(span, end_on_exit=True):
            pair = await self._both_answers(cand, req, span)
            if pair is None:
                return
            ref, exchange = pair
            with self._tel.tracer.start_as_current_span("compare") as cspan:
                loop = asyncio.get_running_loop()
                analysis = await loop.run_in_executor(
                    self._executor,
                    analyze,
                    ref,
                    exchange,
                    req.route.model or "",
                    self._settings.comparisons,
                )
                if analysis.verdicts:
                    self._apply_judgement(cand, req, analysis)
                cspan.set_attribute("shadowproxy.outcome", analysis.outcome)
                cspan.set_attribute("shadowproxy.flagged", analysis.flagged)
                cspan.set_attribute("shadowproxy.severity", analysis.severity)
            self._record_metrics(cand, req, analysis)
            if self._evidence is not None and req.canary is not None and self._is_canary(cand):
                self._evidence.add(req.canary, comparison_counters(analysis, ref, exchange))
            self._tel.mirror(cand.name, analysis.outcome)
            await self._store_sample(cand, req, request_id, ref, exchange, analysis)

    async def _both_answers(
        self, cand: CandidateSettings, req: MirrorRequest, span: trace.Span
    ) -> tuple[Exchange, Exchange] | None:
        """(the reference's answer, the candidate's) to one copy, or None with the outcome counted.

        Normally the live answer is the reference's and the copy goes to the candidate; for a
        request the canary answered it is the other way round."""
        reverse = req.served_by == cand.name
        live: Exchange | None = None
        if reverse:
            # The canary's own answer first: if it failed (or fell back to the reference, which
            # then answered live) there is nothing to compare and no second reference call.
            live = await self._await_reference(req)
            if live is None:
                self._tel.mirror(cand.name, "live_failed")
                return None
            shadow = await self._call_reference(req)
        else:
            shadow = await self._call_candidate(cand, req)
            self._breakers[cand.name].record(ok=not isinstance(shadow, UpstreamUnavailable))
        self._count_call(cand, req, reverse, shadow)
        if isinstance(shadow, UpstreamError):
            outcome = "timeout" if isinstance(shadow, UpstreamTimeout) else "unavailable"
            if shadow.status == 502:
                outcome = "bad_response"
            outcome = f"reference_{outcome}" if reverse else outcome
            span.set_attribute("shadowproxy.outcome", outcome)
            self._tel.mirror(cand.name, outcome)
            return None
        if live is None:
            live = await self._await_reference(req)
            if live is None:
                self._tel.mirror(cand.name, "reference_failed")
                return None
        return (shadow, live) if reverse else (live, shadow)

    async def _call_candidate(
        self, cand: CandidateSettings, req: MirrorRequest
    ) -> Exchange | UpstreamError:
        model = req.route.model or ""
        headers = CIMultiDict(req.headers)
        if not cand.forward_credentials:
            for name in CREDENTIAL_HEADERS:
                headers.popall(name, None)
        path = candidate_path(req.route, cand.served_name(model))
        upstream: UpstreamSettings = cand
        if req.canary is not None and self._is_canary(cand):
            # Evidence for the canary's error rate: the limits its live answers get, or an
            # answer slower than the shadow timeout would count as an error it is not.
            ref = self._settings.reference
            upstream = cand.model_copy(
                update={"timeout_s": ref.timeout_s, "connect_timeout_s": ref.connect_timeout_s}
            )
        return await self._post(upstream, path, req, headers, "candidate")

    async def _call_reference(self, req: MirrorRequest) -> Exchange | UpstreamError:
        """The reverse copy of a request the canary answered: the reference, with the client's
        own headers (it is the upstream they were meant for)."""
        path = candidate_path(req.route, req.route.model or "")
        headers = CIMultiDict(req.headers)
        return await self._post(self._settings.reference, path, req, headers, "reference_shadow")

    async def _post(
        self,
        upstream: UpstreamSettings,
        path: str,
        req: MirrorRequest,
        headers: CIMultiDict[str],
        side: str,
    ) -> Exchange | UpstreamError:
        """Send the copy to one upstream under its own timeout; failures come back as values."""
        url = f"{upstream.url}{path}" + (f"?{req.query}" if req.query else "")
        self._tel.propagator.inject(headers)
        timeout = aiohttp.ClientTimeout(
            total=upstream.timeout_s, sock_connect=upstream.connect_timeout_s
        )
        started = time.perf_counter()
        try:
            async with self._session.post(
                url, data=req.body, headers=headers, timeout=timeout, allow_redirects=False
            ) as resp:
                body = await resp.read()
                latency = time.perf_counter() - started
                self._tel.latency(side, upstream.name, latency)
                return Exchange(
                    upstream.name, resp.status, CIMultiDict(resp.headers), body, latency
                )
        except Exception as exc:
            return translate_upstream_error(exc, upstream.name, upstream.url)

    def _is_canary(self, cand: CandidateSettings) -> bool:
        return cand.name == self._canary_name

    def _count_call(
        self,
        cand: CandidateSettings,
        req: MirrorRequest,
        reverse: bool,
        shadow: Exchange | UpstreamError,
    ) -> None:
        """A shadow call to the canary candidate (or, reversed, to the reference) is evidence of
        its error rate; live calls are counted by the live process."""
        if self._evidence is None or req.canary is None or not self._is_canary(cand):
            return
        failed = isinstance(shadow, UpstreamError) or shadow.status >= 500
        calls, errors = (REF_CALLS, REF_ERRORS) if reverse else (CAND_CALLS, CAND_ERRORS)
        self._evidence.add(req.canary, {calls: 1, errors: int(failed)})

    async def _await_reference(self, req: MirrorRequest) -> Exchange | None:
        timeout = self._settings.reference.timeout_s + 1.0
        try:
            return await asyncio.wait_for(asyncio.shield(req.reference), timeout)
        except TimeoutError:
            return None

    def _apply_judgement(self, cand: CandidateSettings, req: MirrorRequest, a: Analysis) -> None:
        judged, pairs = self._judge.judge(cand, req.route.model or "", req.seq, a.verdicts)
        if self._evidence is not None and req.canary is not None:
            mine = [(ab, aa) for name, ab, aa in pairs if name == self._canary_name]
            if mine:
                self._evidence.add(req.canary, pair_counters(mine))
        flagged = [v for v in judged if v.flagged]
        a.verdicts = judged
        a.flagged = bool(flagged)
        a.reason = "; ".join(f"{v.output}: {v.reason}" for v in flagged)

    def _record_metrics(self, cand: CandidateSettings, req: MirrorRequest, a: Analysis) -> None:
        for v in a.verdicts:
            attrs = {
                "candidate": cand.name,
                "model": req.route.model or "",
                "output": v.output,
                "metric": v.metric,
                "noise_floor": str(cand.noise_floor).lower(),
            }
            self._tel.divergence(attrs, v.severity, v.flagged)

    async def _store_sample(
        self,
        cand: CandidateSettings,
        req: MirrorRequest,
        request_id: str,
        ref: Exchange,
        exchange: Exchange,
        a: Analysis,
    ) -> None:
        if self._store is None:
            return
        keep = a.flagged or self._rng.random() < self._settings.buffer.store_unflagged_rate
        meta = sample_meta(cand, req, request_id, ref, exchange, a, stored=keep)
        payloads = None
        if keep:
            payloads = {
                "request": req.body,
                "request_headers": headers_json(req.headers),
                "reference_body": ref.body,
                "reference_headers": headers_json(ref.headers),
                "candidate_body": exchange.body,
                "candidate_headers": headers_json(exchange.headers),
            }
        try:
            await self._store.record(meta, payloads)
        except StoreError as exc:
            log.warning("sample %s for %s not stored: %s", meta["id"], cand.name, exc)
            self._tel.stored(cand.name, ok=False)
        else:
            self._tel.stored(cand.name, ok=True)
