"""Counters for canary steps, gathered in memory and added to Redis in one batch per interval.

The live path and the mirror tasks only bump a dict (no await, no I/O). A task owned by the app
flushes the batch to each step's evidence hash; a failed flush keeps the counters for the next
try (bounded: steps are few), counts the failure, and loses nothing unless the process dies.
Each rollout's steps go in one transaction (its keys share a hash tag: one Redis Cluster slot);
a process has one rollout, so that is one transaction per flush.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

from comparators import OutputVerdict

from ..buffer.connect import RedisClient
from ..buffer.keys import KeySchema
from ..errors import StoreError
from ..settings import CanaryGates
from ..shadow.analysis import Analysis, Exchange
from ..shadow.guards import stop_task
from ..telemetry import Telemetry
from . import gates as g
from .state import EvidenceLost, add_evidence

log = logging.getLogger("shadowproxy.canary")

CanaryTag = tuple[str, int, int]
"""(rollout, attempt, step): which step's evidence a request belongs to."""


# Comparisons that say something about the candidate's answers (an error on both sides, or an
# undecodable reference, says nothing about the candidate).
_COMPARED_OUTCOMES = frozenset({"compared", "status_mismatch", "candidate_invalid"})


def comparison_counters(
    analysis: Analysis, ref: Exchange, cand: Exchange, gates: CanaryGates | None = None
) -> dict[str, int]:
    """What one comparison of the canary candidate adds to its step's evidence. With ``gates``:
    whether the candidate was slower than the latency gate allows on this very request
    (``ratio x the reference + slack``), for the paired latency test."""
    if analysis.outcome not in _COMPARED_OUTCOMES:
        return {}
    counters = {g.COMPARED: 1, g.FLAGGED: int(analysis.flagged)}
    if ref.status == 200 and cand.status == 200:
        counters[g.latency_field(g.LAT_REF, ref.latency_s)] = 1
        counters[g.latency_field(g.LAT_CAND, cand.latency_s)] = 1
        if gates is not None:
            allowed_ms = gates.max_latency_p99_ratio * ref.latency_s * 1000 + gates.latency_slack_ms
            counters[g.LAT_PAIRS] = 1
            counters[g.LAT_EXCEED] = int(cand.latency_s * 1000 > allowed_ms)
    first_ref = analysis.reference.texts.get("") if analysis.reference else None
    first_cand = analysis.candidate.texts.get("") if analysis.candidate else None
    if first_ref is not None and first_cand is not None:
        # LLM calls: time to first token of both sides, and how alike the answers mean.
        if first_ref.ttft_s is not None and first_cand.ttft_s is not None:
            counters[g.latency_field(g.TTFT_REF, first_ref.ttft_s)] = 1
            counters[g.latency_field(g.TTFT_CAND, first_cand.ttft_s)] = 1
        semantic = next((v for v in analysis.verdicts if v.output == "semantic"), None)
        if semantic is not None and semantic.valid:
            counters[g.semantic_field(semantic.scores["cosine"])] = 1
    return counters


def pair_counters(pairs: Iterable[tuple[OutputVerdict, OutputVerdict]]) -> dict[str, int]:
    """McNemar's discordant counts from (candidate, twin) verdicts on the same outputs."""
    counters: Counter[str] = Counter()
    for ab, aa in pairs:
        counters[g.PAIRS] += 1
        counters[g.PAIRS_CAND_ONLY] += int(ab.flagged and not aa.flagged)
        counters[g.PAIRS_TWIN_ONLY] += int(aa.flagged and not ab.flagged)
    return dict(counters)


class EvidenceBuffer:
    def __init__(
        self,
        client: RedisClient,
        keys: KeySchema,
        telemetry: Telemetry,
        *,
        interval_s: float = 0.5,
        timeout_s: float = 2.0,
    ) -> None:
        self._r = client
        self._keys = keys
        self._tel = telemetry
        self._interval = interval_s
        self._timeout = timeout_s
        self._pending: defaultdict[CanaryTag, Counter[str]] = defaultdict(Counter)
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def add(self, tag: CanaryTag, counters: Mapping[str, int]) -> None:
        self._pending[tag].update(counters)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        # The flag as well as the cancel: a cancel swallowed by wait_for (3.11) must not leave
        # close() waiting on this loop.
        while not self._closing:
            await asyncio.sleep(self._interval)
            await self.flush()

    async def flush(self) -> bool:
        """Write what is pending; on failure keep it for the next flush. True when written."""
        if not self._pending:
            return True
        batch, self._pending = self._pending, defaultdict(Counter)
        rollouts: defaultdict[str, dict[CanaryTag, Counter[str]]] = defaultdict(dict)
        for tag, counters in batch.items():
            rollouts[tag[0]][tag] = counters
        parts = list(rollouts.values())
        for n, part in enumerate(parts):
            try:
                await add_evidence(self._r, self._keys, part, self._timeout)
            except EvidenceLost as exc:
                lost = _total(part)
                self._tel.canary_evidence_unflushed(lost + self._keep(parts[n + 1 :]))
                log.warning("canary evidence dropped, %d counts (not retried): %s", lost, exc)
                return False
            except StoreError as exc:
                self._tel.canary_evidence_unflushed(self._keep(parts[n:]))
                log.warning("canary evidence not written yet (kept for the next try): %s", exc)
                return False
        return True

    def _keep(self, parts: list[dict[CanaryTag, Counter[str]]]) -> int:
        """Put unwritten parts back for the next flush; how many counts they hold."""
        for part in parts:
            for tag, counters in part.items():
                self._pending[tag].update(counters)
        return sum(_total(part) for part in parts)

    async def close(self) -> None:
        self._closing = True
        await stop_task(self._task)
        if not await self.flush():
            lost = _total(self._pending)
            log.error("canary evidence lost on shutdown: %d counts could not be written", lost)


def _total(part: Mapping[CanaryTag, Counter[str]]) -> int:
    return sum(sum(c.values()) for c in part.values())
