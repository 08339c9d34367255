"""What the live path and the shadow stages agree on: the copy, and the two interfaces.

``Mirror`` is what the live path hands copies to (the scheduler in the same process, or the link
to the mirror process); ``CompareSink`` is where the scheduler hands pairs (the comparer in the
same process, or the link to the compare workers). ``sampled`` decides a candidate's share, the
same way wherever a copy is counted.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from multidict import CIMultiDict
from opentelemetry.trace import SpanContext

from ..canary.evidence import CanaryTag
from ..protocols.v2_rest.routes import Route
from ..settings import CandidateSettings
from .analysis import Exchange
from .compare_stage import Pair


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

    def admit(self, model: str, headers: Mapping[str, str]) -> bool:
        """Whether to make a copy at all (False: dropped, and counted, before it costs anything).
        Not asked for canary copies: they are evidence and always made."""
        ...

    def offer(self, req: MirrorRequest) -> None: ...

    def note_skip(self, reason: str) -> None: ...

    async def snapshot(self) -> dict[str, Any]: ...

    async def progress(self) -> dict[str, Any]:
        """``in_flight``, ``pending`` and ``fates`` (rows of candidate, outcome, count): cheap
        enough to poll (it asks no compare worker, whose CPU budget a poll would eat)."""
        ...

    async def close(self) -> None: ...


class CompareSink(Protocol):
    """Where pairs go to be compared: in this process or in compare worker processes."""

    backlog: int
    """Pairs submitted and not yet compared."""

    @property
    def unstored(self) -> int:
        """Verdicts compared and not yet written (or counted as failed)."""
        ...

    completed: int
    """Pairs compared so far, and ``dropped``: pairs that waited too long for CPU."""
    dropped: int
    outcomes: Counter[tuple[str, str]]
    """(candidate, outcome) of the pairs compared in other processes."""
    on_done: list[Callable[[], None]]
    """Called whenever a pair has been compared (room for more)."""
    workers: int

    def submit(self, pair: Pair) -> None: ...

    def comparing(self) -> Counter[str]:
        """Pairs not yet compared, per candidate."""
        ...

    def sweep(self, max_age_s: float) -> None:
        """Drop (and count as ``dropped_queue_age``) pairs that waited too long for CPU."""
        ...

    async def snapshot(self) -> Mapping[str, Any]:
        """``tally`` rows and ``prometheus`` text."""
        ...

    async def close(self) -> None: ...


def sampled(cand: CandidateSettings, headers: Mapping[str, str], rng: random.Random) -> bool:
    """Whether this request is one of the share ``cand`` asked for."""
    if cand.sample_rate >= 1.0:
        return True
    key = headers.get(cand.sample_key_header) if cand.sample_key_header else None
    if key is not None:
        # A stable hash: the same key is always in or always out, across replicas and restarts.
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2.0**64 < cand.sample_rate
    return rng.random() < cand.sample_rate
