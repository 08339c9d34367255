"""The mirror queue: copies wait here for a call slot or for CPU, within a bound in bytes and age.

A copy that was asked for is compared unless the host is truly out of room. So a copy that
cannot start now (its candidate has ``max_in_flight`` calls out, or the compare stage is behind)
is not dropped: it waits, first in, first out, per candidate. Only two bounds drop it, each
counted by reason: the bytes all waiting copies hold (``proxy.mirror_queue_bytes``:
``dropped_queue_bytes`` when a new copy would not fit) and the age of the oldest
(``proxy.mirror_queue_age_s``: ``dropped_queue_age``, checked when a copy reaches the head and
by a sweep, so stale copies never pile up behind a stalled stage).

A copy for several candidates is one ``QueuedCopy`` shared by its jobs (one per candidate): its
bytes are held once, until its last job has left the queue.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..settings import CandidateSettings


@dataclass(slots=True, eq=False)
class QueuedCopy:
    """One live request's copy, shared by the jobs (candidates) that still need it."""

    request: Any
    """The ``MirrorRequest``."""
    size: int
    """Bytes held while any of its jobs waits (body and headers)."""
    waiting: int = 0
    """Jobs of this copy still in the queue."""
    request_id: str | None = None
    """The id the request carries in its message (found by the first job that starts)."""
    checked: bool = False
    unsafe: str | None = None
    """Why it must not be mirrored (found by the first job that starts), or None."""
    needs: frozenset[str] = frozenset()
    """LLM request features each candidate must allow by name (``mirror_llm.allow``)."""


@dataclass(slots=True, eq=False)
class Job:
    """One copy for one candidate (or, for a canary answer, for the reference)."""

    copy: QueuedCopy
    cand: CandidateSettings
    reverse: bool
    enqueued: float = field(default_factory=time.monotonic)


class CopyQueue:
    """Per-candidate FIFO queues with one shared bound in bytes and one in age."""

    def __init__(self, max_bytes: int, max_age_s: float) -> None:
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.bytes = 0
        self._queues: dict[str, deque[Job]] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def waiting(self, candidate: str) -> int:
        q = self._queues.get(candidate)
        return len(q) if q else 0

    def fits(self, size: int) -> bool:
        # An empty queue takes any one copy: a body larger than the bound would otherwise never
        # be compared, and it is already in memory anyway.
        return self.bytes == 0 or self.bytes + size <= self.max_bytes

    def put(self, copy: QueuedCopy, jobs: list[Job]) -> None:
        """Queue every job of one copy (the caller checked ``fits``)."""
        self.bytes += copy.size
        copy.waiting += len(jobs)
        for job in jobs:
            self._queues.setdefault(job.cand.name, deque()).append(job)

    def candidates(self) -> list[str]:
        return [name for name, q in self._queues.items() if q]

    def pop(self, candidate: str) -> Job | None:
        """The next job of this candidate, or None when its queue is empty."""
        q = self._queues.get(candidate)
        if not q:
            return None
        job = q.popleft()
        self._release(job)
        return job

    def stale(self, job: Job, now: float | None = None) -> bool:
        return (now if now is not None else time.monotonic()) - job.enqueued > self.max_age_s

    def sweep(self, drop: Callable[[Job], None]) -> int:
        """Drop every job older than the age bound (oldest are at the heads); how many."""
        now = time.monotonic()
        dropped = 0
        for q in self._queues.values():
            while q and self.stale(q[0], now):
                job = q.popleft()
                self._release(job)
                drop(job)
                dropped += 1
        return dropped

    def drain(self) -> Iterator[Job]:
        """Take every waiting job out (shutdown)."""
        for q in self._queues.values():
            while q:
                job = q.popleft()
                self._release(job)
                yield job

    def _release(self, job: Job) -> None:
        copy = job.copy
        copy.waiting -= 1
        if copy.waiting == 0:
            self.bytes -= copy.size
