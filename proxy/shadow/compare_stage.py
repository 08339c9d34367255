"""The compare stage: both answers to one copy -> decode, compare, judge, count, store.

It runs in the compare worker processes (idle CPU priority; ``compare_worker``), or in the live
process when ``proxy.mirror_process`` is off. Its input is a ``Pair``: what the shadow I/O stage
(``mirror.MirrorScheduler``) collected for one copy and one candidate, both answers timed where
they were received. Small pairs are decoded and compared inline: the hop to a thread cost more
than the work; large ones go to the compare threads so one 1 MiB tensor never holds the loop.
Verdicts are written to Redis in batches (``StoreBatcher``), one round trip for many.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import Link, SpanContext, TraceFlags

from comparators import compare_semantic, resolve_spec
from comparators.normalize import with_normalized

from ..buffer.store import SampleStore
from ..builds.tracker import BuildTracker
from ..canary.evidence import CanaryTag, EvidenceBuffer, comparison_counters, pair_counters
from ..errors import StoreError
from ..redact import Redactor
from ..settings import CandidateSettings, Settings
from ..telemetry import Telemetry
from .analysis import Analysis, Exchange, analyze
from .judge import Judge
from .samples import sample_meta, sample_payloads
from .semantic import Embedder, EmbeddingFailed

log = logging.getLogger("shadowproxy.compare")

# Pairs whose bodies together are below this are decoded and compared on the loop itself.
_INLINE_BYTES = 64 * 1024
# Verdicts written in one pipeline at most, and how long the first of a batch may wait.
_BATCH_MAX = 128
_BATCH_DELAY_S = 0.02


@dataclass(slots=True)
class Pair:
    """Both answers to one copy for one candidate, ready to compare."""

    seq: int
    """The live request's sequence number: pairs a candidate's verdicts with the twin's."""
    candidate: str
    model: str
    request_id: str
    received_at: float
    request_headers: list[tuple[str, str]]
    request_body: bytes
    ref: Exchange
    cand: Exchange
    canary: CanaryTag | None = None
    live_span: tuple[int, int, int] | None = None
    """(trace id, span id, flags) of the live call, when it was traced."""
    queued_at: float = 0.0
    """When its copy entered the mirror queue (monotonic, in the mirror process): a pair that
    waits for CPU is bounded by the queue's age too."""
    protocol: str = ""
    """The adapter of an LLM route (``triton_generate``, ``openai``); empty for V2 infer calls,
    whose adapter the answer's headers say."""
    sample_id: str | None = None
    """The sample's id when it must be stable (a Redis-stream copy compared again after its
    worker died is then stored once); None: a new one."""

    @property
    def size(self) -> int:
        return len(self.request_body) + len(self.ref.body) + len(self.cand.body)


class StoreBatcher:
    """Verdicts and samples gathered for a moment, then written in one pipeline."""

    def __init__(
        self, store: SampleStore | None, telemetry: Telemetry, *, idempotent: bool = False
    ) -> None:
        self._store = store
        self._tel = telemetry
        self._idempotent = idempotent
        self._batch: list[tuple[str, dict[str, Any], dict[str, bytes] | None]] = []
        self._batch_done: asyncio.Future[None] | None = None
        self._flushing: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self.unstored = 0
        """Verdicts gathered or being written, not yet stored (or counted as failed)."""
        self.on_written: Callable[[int], None] | None = None
        """Told the new ``unstored`` after each write."""

    def add(self, candidate: str, meta: dict[str, Any], payloads: dict[str, bytes] | None) -> None:
        if self._store is None:
            return
        self._batch.append((candidate, meta, payloads))
        if self._batch_done is None:
            self._batch_done = asyncio.get_running_loop().create_future()
        self.unstored += 1
        if len(self._batch) >= _BATCH_MAX:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(_BATCH_DELAY_S, self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        done, self._batch_done = self._batch_done, None
        task = asyncio.get_running_loop().create_task(self._write(batch, done))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _write(
        self,
        batch: list[tuple[str, dict[str, Any], dict[str, bytes] | None]],
        done: asyncio.Future[None] | None,
    ) -> None:
        assert self._store is not None
        lost: Counter[str] = Counter(candidate for candidate, _, _ in batch)
        try:
            # With a spool, only what it could not hold is lost; without, the whole batch.
            lost = await self._store.record_many(
                [(meta, payloads) for _, meta, payloads in batch], idempotent=self._idempotent
            )
        except StoreError as exc:
            log.warning("%d verdicts not stored: %s", len(batch), exc)
        finally:
            for candidate, n in Counter(candidate for candidate, _, _ in batch).items():
                if n - lost[candidate]:
                    self._tel.stored(candidate, ok=True, n=n - lost[candidate])
                if lost[candidate]:
                    self._tel.stored(candidate, ok=False, n=lost[candidate])
            self.unstored -= len(batch)
            if done is not None and not done.done():
                done.set_result(None)
            if self.on_written is not None:
                self.on_written(self.unstored)

    async def written(self) -> None:
        """Wait until everything added so far is written, spooled or counted as lost (the
        batch it is in goes out on its own schedule, with whatever else joins it)."""
        waits: list[asyncio.Future[None]] = list(self._flushing)
        if self._batch_done is not None:
            waits.append(self._batch_done)
        if waits:
            await asyncio.gather(*(asyncio.shield(w) for w in waits), return_exceptions=True)

    async def close(self) -> None:
        """Write what is gathered and wait for every write in progress."""
        self._flush()
        if self._flushing:
            await asyncio.gather(*self._flushing, return_exceptions=True)


class Comparer:
    """Compares pairs; owns the judge (noise floor, population) of its process."""

    def __init__(
        self,
        settings: Settings,
        store: SampleStore | None,
        executor: Executor,
        telemetry: Telemetry,
        judge: Judge,
        evidence: EvidenceBuffer | None = None,
        *,
        idempotent: bool = False,
        builds: BuildTracker | None = None,
    ) -> None:
        self._settings = settings
        self._builds = builds
        self._candidates = {c.name: c for c in settings.candidates}
        self._canary_name = settings.canary.candidate if settings.canary else None
        self._executor = executor
        self._tel = telemetry
        self.judge = judge
        self._evidence = evidence
        # Idempotent: a pair compared again under the same sample id is stored once.
        self._batcher = StoreBatcher(store, telemetry, idempotent=idempotent)
        self._redactor = Redactor(settings.redact, settings.proxy)
        self._rng = random.Random()
        self._embedder = Embedder(settings.semantic) if settings.semantic else None

    @property
    def unstored(self) -> int:
        return self._batcher.unstored

    def on_written(self, callback: Callable[[int], None]) -> None:
        self._batcher.on_written = callback

    async def written(self) -> None:
        """Until every verdict compared so far is written (or spooled, or counted lost)."""
        await self._batcher.written()

    async def compare(self, pair: Pair) -> str:
        """Compare one pair and account for it; its outcome. Never raises (an error is counted,
        as the outcome ``internal_error``)."""
        try:
            if self._tel.exporting and pair.live_span is not None:
                return await self._compare_traced(pair)
            return (await self._compare(pair)).outcome
        except Exception:
            log.exception("comparing a copy for %s failed unexpectedly", pair.candidate)
            self._tel.mirror(pair.candidate, "internal_error")
            return "internal_error"

    async def _compare_traced(self, pair: Pair) -> str:
        assert pair.live_span is not None
        trace_id, span_id, flags = pair.live_span
        live = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))
        with self._tel.tracer.start_as_current_span(
            f"compare {pair.candidate}",
            links=[Link(live)],
            attributes={
                "shadowproxy.candidate": pair.candidate,
                "shadowproxy.request_id": pair.request_id[: self._settings.proxy.max_id_chars],
            },
        ) as span:
            analysis = await self._compare(pair)
            span.set_attribute("shadowproxy.outcome", analysis.outcome)
            span.set_attribute("shadowproxy.flagged", analysis.flagged)
            span.set_attribute("shadowproxy.severity", analysis.severity)
        return analysis.outcome

    async def _compare(self, pair: Pair) -> Analysis:
        cand = self._candidates[pair.candidate]
        run = functools.partial(
            analyze,
            pair.ref,
            pair.cand,
            pair.model,
            self._settings.comparisons,
            protocol=pair.protocol,
            # An LLM answer is read with its request beside it (JSON mode, chat or not).
            request=pair.request_body if pair.protocol else b"",
            request_headers=dict(pair.request_headers) if pair.protocol else None,
            max_inflated_bytes=self._settings.proxy.max_inflated_bytes,
        )
        if pair.size <= _INLINE_BYTES:
            analysis = run()
        else:
            analysis = await asyncio.get_running_loop().run_in_executor(self._executor, run)
        if self._embedder is not None and analysis.outcome == "compared":
            await self._semantic(self._embedder, cand, pair, analysis)
        ref_build, cand_build = await self._build_ids(cand, pair, analysis)
        if analysis.verdicts:
            self._apply_judgement(cand, pair, analysis, cand_build)
        noise_floor = "true" if cand.noise_floor else "false"
        for v in analysis.verdicts:
            attrs = (cand.name, pair.model, v.output, v.metric, noise_floor)
            self._tel.divergence(attrs, v.severity, v.flagged)
        if self._evidence is not None and pair.canary is not None and self._is_canary(cand):
            gates = self._settings.canary.gates if self._settings.canary else None
            counters = comparison_counters(analysis, pair.ref, pair.cand, gates)
            self._evidence.add(pair.canary, counters)
        self._store(cand, pair, analysis, ref_build, cand_build)
        self._tel.mirror(cand.name, analysis.outcome)  # after: one fate, even if storing broke
        return analysis

    async def _semantic(
        self, embedder: Embedder, cand: CandidateSettings, pair: Pair, a: Analysis
    ) -> None:
        """The first choice's two texts, embedded and scored: one more verdict."""
        ref = a.reference.texts.get("") if a.reference else None
        answer = a.candidate.texts.get("") if a.candidate else None
        if ref is None or answer is None or ref.incomplete or answer.incomplete:
            return
        try:
            vectors = await embedder.embed([ref.text, answer.text])
        except EmbeddingFailed as exc:
            log.warning("no semantic similarity for a copy to %s: %s", cand.name, exc)
            self._tel.skipped("semantic_failed", cand.name)
            return
        spec = resolve_spec(self._settings.comparisons, pair.model, "semantic")
        verdict = with_normalized(compare_semantic(vectors[0], vectors[1], spec), spec.params)
        a.verdicts.append(verdict)
        a.severity = max(a.severity, verdict.severity)
        a.severity_norm = max(a.severity_norm or 0.0, verdict.severity_norm)
        if verdict.flagged:
            a.flagged = True
            a.reason = "; ".join(x for x in (a.reason, f"semantic: {verdict.reason}") if x)

    async def _build_ids(self, cand: CandidateSettings, pair: Pair, a: Analysis) -> tuple[str, str]:
        """The builds that answered (reference, candidate); empty when unknown."""
        if self._builds is None:
            return "", ""
        openai = pair.protocol == "openai"
        ref_v = a.reference.model_version if a.reference else None
        cand_v = a.candidate.model_version if a.candidate else None
        try:
            ref, answer = await asyncio.gather(
                self._builds.build_of(
                    self._settings.reference, "reference", pair.model, ref_v, openai=openai
                ),
                self._builds.build_of(cand, "candidate", pair.model, cand_v, openai=openai),
            )
        except Exception:
            log.exception("the builds of a copy to %s are unknown", cand.name)
            return "", ""
        return ref, answer

    def _is_canary(self, cand: CandidateSettings) -> bool:
        return cand.name == self._canary_name

    def _apply_judgement(
        self, cand: CandidateSettings, pair: Pair, a: Analysis, build: str
    ) -> None:
        judged, pairs = self.judge.judge(cand, pair.model, pair.seq, a.verdicts, build)
        if self._evidence is not None and pair.canary is not None:
            mine = [(ab, aa) for name, ab, aa in pairs if name == self._canary_name]
            if mine:
                self._evidence.add(pair.canary, pair_counters(mine))
        flagged = [v for v in judged if v.flagged]
        a.verdicts = judged
        a.flagged = bool(flagged)
        a.reason = "; ".join(f"{v.output}: {v.reason}" for v in flagged)

    def _store(
        self, cand: CandidateSettings, pair: Pair, a: Analysis, ref_build: str, cand_build: str
    ) -> None:
        keep = a.flagged or self._rng.random() < self._settings.buffer.store_unflagged_rate
        meta = sample_meta(
            self._redactor,
            self._settings.proxy,
            cand,
            request_id=pair.request_id,
            model=pair.model,
            received_at=pair.received_at,
            ref=pair.ref,
            answer=pair.cand,
            a=a,
            stored=keep,
            protocol=pair.protocol,
            sample_id=pair.sample_id,
        )
        if cand_build:
            meta["build"] = cand_build
            meta["reference"]["build"] = ref_build
            meta["candidate_side"]["build"] = cand_build
        payloads = None
        if keep:
            payloads = sample_payloads(
                self._redactor, pair.request_body, pair.request_headers, pair.ref, pair.cand
            )
        self._batcher.add(cand.name, meta, payloads)

    async def close(self) -> None:
        await self._batcher.close()
        if self._embedder is not None:
            await self._embedder.close()


class LocalCompareSink:
    """The compare stage in the same process as the I/O stage (``proxy.mirror_process: false``)."""

    def __init__(self, comparer: Comparer) -> None:
        self.comparer = comparer
        self.workers = 1
        self.backlog = 0
        self.completed = 0
        self.dropped = 0  # nothing waits here to grow old
        self.outcomes: Counter[tuple[str, str]] = Counter()  # in this process's tally already
        self._comparing: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_done: list[Callable[[], None]] = []

    def sweep(self, max_age_s: float) -> None:
        """Nothing waits here: every pair submitted is being compared."""

    def comparing(self) -> Counter[str]:
        return +self._comparing

    def submit(self, pair: Pair) -> None:
        self.backlog += 1
        self._comparing[pair.candidate] += 1
        task = asyncio.get_running_loop().create_task(self._run(pair))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, pair: Pair) -> None:
        try:
            await self.comparer.compare(pair)
        finally:
            self.backlog -= 1
            self._comparing[pair.candidate] -= 1
            self.completed += 1
            for callback in self.on_done:
                callback()

    async def snapshot(self) -> Mapping[str, Any]:
        return {"tally": [], "prometheus": ""}

    @property
    def unstored(self) -> int:
        return self.comparer.unstored

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.comparer.close()
