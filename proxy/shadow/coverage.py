"""Coverage: of the copies each candidate asked for, how many were compared, and why not.

Every copy a candidate asked for (its ``sample_rate`` share of mirrorable requests) ends in one
fate, counted where it happens: compared (any comparison outcome), failed at an upstream, or
dropped, by reason. Copies never mirrored for safety (sequence, shared memory...) are skips, not
fates. The share compared is what a QA reviewer gets; below ``TARGET`` over the last minutes,
the report names the setting that would raise it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from ..settings import Settings
from .guards import stop_task

TARGET = 0.95
RECENT_S = 300.0
"""Coverage over this many seconds is the one the warning judges."""
_MIN_RECENT = 20
"""Fewer copies than this in the window: too few to warn about."""

COMPARED = frozenset(
    {"compared", "status_mismatch", "both_failed", "candidate_invalid", "reference_undecodable"}
)
FAILED = frozenset(
    {
        "timeout",
        "unavailable",
        "bad_response",
        "reference_failed",
        "live_failed",
        "reference_timeout",
        "reference_unavailable",
        "reference_bad_response",
        "internal_error",
        "cancelled",
        "compare_lost",
        "reference_incomplete",  # the client left mid-stream: no whole answer to compare
    }
)


def is_fate(outcome: str) -> bool:
    """Whether a tally key is how a copy ended (not a skip, nor a storage count)."""
    return outcome in COMPARED or outcome in FAILED or outcome.startswith("dropped_")


Fates = dict[str, Counter[str]]
"""Candidate -> outcome -> copies."""


def fates_of(rows: Iterable[tuple[str, str, int] | list[Any]]) -> Fates:
    out: Fates = {}
    for candidate, outcome, n in rows:
        if is_fate(outcome):
            out.setdefault(candidate, Counter())[outcome] += n
    return out


def _advice(settings: Settings, lost: Mapping[str, int]) -> str:
    """What would raise coverage, from the commonest reason copies were lost."""
    reason = max(lost, key=lambda k: lost[k])
    proxy = settings.proxy
    if reason in ("dropped_queue_age", "dropped_worker_budget", "dropped_queue_bytes"):
        extra = (
            f"; or proxy.mirror_queue_bytes ({proxy.mirror_queue_bytes // 2**20} MiB) for bursts"
            if reason == "dropped_queue_bytes"
            else ""
        )
        return (
            "comparing cannot keep up: raise proxy.mirror_cpu_budget "
            f"({proxy.mirror_cpu_budget:g} cores) or proxy.mirror_workers "
            f"({proxy.mirror_workers}) if the host has CPU to spare, or lower sample_rate{extra}"
        )
    if reason == "dropped_overload":
        return (
            "the live process is CPU-bound (its event loop ran more than proxy.shed_lag_ms "
            f"= {proxy.shed_lag_ms:g} ms late): give it more cores or `serve --workers`"
        )
    if reason in ("dropped_link_full", "dropped_worker_down"):
        return "the mirror process is down or stuck: see its log"
    if reason in ("dropped_circuit_open", "unavailable", "reference_unavailable"):
        return "the candidate refuses connections (its circuit breaker is open): is it up?"
    if reason.endswith("timeout"):
        return "the candidate answers too slowly: raise its timeout_s, or look at its load"
    return f"most lost copies: {reason}"


def _ratio(compared: int, sampled: int) -> float | None:
    return compared / sampled if sampled else None


class CoverageWindow:
    """Fates per candidate now and a few minutes ago: coverage overall and recently."""

    def __init__(
        self, settings: Settings, span_s: float = RECENT_S, started: float | None = None
    ) -> None:
        self.settings = settings
        self._span = span_s
        # Nothing had happened at the start: until the window is full, "recent" is "since then".
        start = time.monotonic() if started is None else started
        self._history: deque[tuple[float, Fates]] = deque([(start, {})])

    def observe(self, fates: Fates, now: float | None = None) -> None:
        """Remember the totals at this moment (called every few seconds, and on each report)."""
        now = time.monotonic() if now is None else now
        self._history.append((now, {c: Counter(f) for c, f in fates.items()}))
        while len(self._history) > 2 and self._history[1][0] <= now - self._span:
            self._history.popleft()

    def report(self, fates: Fates, now: float | None = None) -> dict[str, dict[str, Any]]:
        """Per candidate: sampled, compared, lost by reason, coverage overall and over the last
        minutes, and advice when that is below ``TARGET``."""
        now = time.monotonic() if now is None else now
        self.observe(fates, now)
        then_at, then = self._history[0]
        out: dict[str, dict[str, Any]] = {}
        for cand in self.settings.candidates:
            total = fates.get(cand.name, Counter())
            before = then.get(cand.name, Counter())
            # A count that went down was reset (a process restarted): all of it is recent.
            reset = any(total[k] < n for k, n in before.items())
            recent = Counter(total) if reset else total - before
            row = _summary(total)
            recent_row = _summary(recent)
            row["recent"] = {
                "window_s": round(now - then_at, 1),
                "sampled": recent_row["sampled"],
                "compared": recent_row["compared"],
                "coverage": recent_row["coverage"],
            }
            low = (
                recent_row["sampled"] >= _MIN_RECENT
                and recent_row["coverage"] is not None
                and recent_row["coverage"] < TARGET
            )
            lost = {**recent_row["dropped"], **recent_row["failed"]}
            span = now - then_at
            ago = f"{span / 60:.0f} min" if span >= 120 else f"{span:.0f} s"
            row["warning"] = (
                f"{cand.name}: {recent_row['coverage']:.0%} of copies compared over the last "
                f"{ago}; {_advice(self.settings, lost)}"
                if low and lost
                else None
            )
            out[cand.name] = row
        return out


def _summary(fates: Mapping[str, int]) -> dict[str, Any]:
    compared = sum(n for k, n in fates.items() if k in COMPARED)
    dropped = {k: n for k, n in fates.items() if k.startswith("dropped_") and n}
    failed = {k: n for k, n in fates.items() if k in FAILED and n}
    sampled = compared + sum(dropped.values()) + sum(failed.values())
    return {
        "sampled": sampled,
        "compared": compared,
        "dropped": dropped,
        "failed": failed,
        "coverage": _ratio(compared, sampled),
    }


class CoverageMonitor:
    """Samples the fates every ``interval_s`` so "the last minutes" exist between reports.

    One owner (the data app's cleanup context); ``gather`` reads the live process's tallies and
    the mirror process's fates (a cheap query that wakes no compare worker).
    """

    def __init__(
        self,
        settings: Settings,
        gather: Callable[[], Awaitable[Fates]],
        interval_s: float = 15.0,
    ) -> None:
        self.window = CoverageWindow(settings)
        self._gather = gather
        self._interval = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.window.observe(await self._gather())

    async def report(self) -> dict[str, dict[str, Any]]:
        return self.window.report(await self._gather())

    def reload(self, settings: Settings) -> None:
        """Report on the candidates of a reloaded config (their history is kept by name)."""
        self.window.settings = settings

    async def close(self) -> None:
        await stop_task(self._task)
