"""CPU per compared copy: what the shadow side costs, apart from the live side.

The proxy's live side is the ``python -m proxy serve`` process itself; its shadow side is every
process below it (the mirror worker, or ``proxy.mirror_workers`` of them, and whatever they
start) except the embedded Redis, which also serves the review pages and is not compare work.

Processes may come and go during a run (a worker restarted, one per compare process), so one
snapshot at each end would miss some: the tree is sampled every ``SAMPLE_S`` and each process,
told apart by (pid, start time), contributes its CPU since the window opened (all of it when it
was born inside the window) up to the last time it was seen. A process that exits loses at most
one sampling interval of CPU; the count of such exits is reported beside the figure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .coverage import SETTLE_S, copies, coverage, settle
from .mirror_overhead import MODEL
from .openloop import open_loop, scenario
from .procs import cpu_and_start, descendants, is_redis

if TYPE_CHECKING:
    from .bench import Bench

SAMPLE_S = 0.5
T = TypeVar("T")


@dataclass
class TreeCpu:
    """CPU seconds the live process and the shadow-side processes used over one window."""

    live_s: float
    shadow_s: float
    shadow_processes: int
    """Distinct shadow-side processes seen in the window."""
    exited: int
    """Shadow-side processes that exited inside the window (their last interval is not counted)."""
    by_name: dict[str, float] = field(default_factory=dict)
    """Shadow-side CPU seconds by what each process runs (``proxy.shadow.mirror_worker``, ...)."""


def process_name(pid: int) -> str:
    """What a process runs: the module of ``python -m MODULE``, else the program's name."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    args = [a.decode(errors="replace") for a in argv if a]
    if "-m" in args[:-1]:
        return args[args.index("-m") + 1]
    if len(args) > 1 and args[1].endswith(".py"):
        return Path(args[1]).name
    return Path(args[0]).name if args else "?"


@dataclass
class ProxyCpu:
    """Samples a proxy's process tree; ``start`` opens the window, ``finish`` closes it."""

    serve_pid: int
    _first: dict[tuple[int, int], float] = field(default_factory=dict)
    _last: dict[tuple[int, int], float] = field(default_factory=dict)
    _redis: set[int] = field(default_factory=set)
    _names: dict[tuple[int, int], str] = field(default_factory=dict)
    _open: bool = False

    def _processes(self) -> list[int]:
        kids = []
        for pid in descendants(self.serve_pid):
            if pid in self._redis:
                continue
            if is_redis(pid):
                self._redis.add(pid)
                continue
            kids.append(pid)
        return [self.serve_pid, *kids]

    def sample(self) -> None:
        for pid in self._processes():
            seen = cpu_and_start(pid)
            if seen is None:
                continue
            key = (pid, seen[1])
            if key not in self._names:
                self._names[key] = process_name(pid)
            if key not in self._first:
                # Present when the window opened: its CPU until then is not ours. Born later:
                # everything it used belongs to the window.
                self._first[key] = seen[0] if not self._open else 0.0
            self._last[key] = seen[0]

    def start(self) -> None:
        self._first.clear()
        self._last.clear()
        self._open = False
        self.sample()
        self._open = True

    def finish(self) -> TreeCpu:
        self.sample()
        live = shadow = 0.0
        shadow_n = exited = 0
        by_name: dict[str, float] = {}
        alive = {(pid, s[1]) for pid in self._processes() if (s := cpu_and_start(pid))}
        for key, last in self._last.items():
            used = last - self._first[key]
            if key[0] == self.serve_pid:
                live += used
                continue
            shadow += used
            shadow_n += 1
            exited += key not in alive
            name = self._names.get(key, "?")
            by_name[name] = by_name.get(name, 0.0) + used
        return TreeCpu(live, shadow, shadow_n, exited, by_name)

    async def during(self, work: Awaitable[T]) -> T:
        """Await ``work`` while sampling the tree (the window must already be open)."""
        task = asyncio.ensure_future(work)
        while not task.done():
            self.sample()
            await asyncio.wait({task}, timeout=SAMPLE_S)
        return task.result()


@dataclass
class CpuRun:
    """One fixed-rate run: the proxy's CPU over it, and what happened to the copies."""

    target: str
    rate: float
    duration_s: float
    sent: int
    compared: int
    not_compared: int
    """Copies with another outcome (dropped, failed): the run is meant to drop none."""
    cpu: TreeCpu
    backend: str = ""
    idle_shadow_share: float | None = None
    """Cores the shadow side used with no traffic, measured just before the run."""

    @property
    def shadow_ms_per_copy(self) -> float | None:
        return 1000.0 * self.cpu.shadow_s / self.compared if self.compared else None

    @property
    def live_ms_per_request(self) -> float | None:
        return 1000.0 * self.cpu.live_s / self.sent if self.sent else None


SHADOW_MS_GOAL = 0.5
WARMUP_S = 2.0
IDLE_S = 3.0


async def run_cpu(bench: Bench, target: str) -> None:
    """CPU per compared copy over a fixed-rate run (small JSON, static NGINX reference and
    candidate) slow enough that the shadow side compares every copy."""
    rate, secs = bench.args.cpu_rate, bench.args.cpu_duration
    bench.say(f"[{time.strftime('%H:%M:%S')}] CPU per copy: {target}, {rate:g} req/s, {secs:g} s")
    infer, small = f"/v2/models/{MODEL}/infer", scenario("small")
    async with bench.server(target, "static-cand", "static") as (url, pid, admin):
        assert admin is not None
        # Warm up first: first-use costs (imports, connections, caches) are not per-copy costs.
        start = await copies(bench.control, *admin)
        warm = await open_loop(url + infer, small, rate, WARMUP_S, warmup_s=0.0)
        await settle(bench.control, *admin, start, warm.sent, SETTLE_S)
        tracker = ProxyCpu(pid)
        # What the shadow side burns with no traffic at all (timers, polling): were it most of
        # the per-copy figure, the fix would be in idling, not in comparing.
        tracker.start()
        await tracker.during(asyncio.sleep(IDLE_S))
        idle = tracker.finish()
        start = await copies(bench.control, *admin)
        tracker.start()
        run = await tracker.during(open_loop(url + infer, small, rate, secs, warmup_s=0.0))
        # The window closes once the last copy has its outcome: its compare CPU is in it.
        end = await tracker.during(settle(bench.control, *admin, start, run.sent, SETTLE_S))
        cpu = tracker.finish()
    got = coverage(start, end, "static-cand", run.sent)
    others = sum(v for k, v in got.outcomes.items() if k != "compared")
    result = CpuRun(target, rate, secs, run.sent, got.compared, others, cpu)
    result.backend = bench.backend_of["static"]
    result.idle_shadow_share = idle.shadow_s / IDLE_S
    bench.results.cpu.append(result)
    bench.say(
        f"  {target}: {_ms(result.shadow_ms_per_copy)} ms shadow CPU per compared copy, "
        f"{_ms(result.live_ms_per_request)} ms live CPU per request"
    )


def cpu_goals(runs: list[CpuRun]) -> list[str]:
    lines = []
    for run in runs:
        per_copy, live = run.shadow_ms_per_copy, run.live_ms_per_request
        ok = per_copy is not None and per_copy <= SHADOW_MS_GOAL
        dropped = (
            f"; {run.not_compared} copies not compared (the figure counts compared ones only)"
            if run.not_compared
            else ""
        )
        exited = f"; {run.cpu.exited} shadow processes exited" if run.cpu.exited else ""
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(run.cpu.by_name.items()))
        idle = run.idle_shadow_share
        idle_text = f"; idle: {idle:.1%} of a core" if idle is not None else ""
        lines.append(
            f"{'PASS' if ok else 'FAIL'} {run.target}: shadow-side CPU per compared small copy "
            f"{_ms(per_copy)} ms (goal <= {SHADOW_MS_GOAL}) over {run.compared} of {run.sent} "
            f"copies at {run.rate:g} req/s for {run.duration_s:g} s, {run.backend}, "
            f"{run.cpu.shadow_processes} shadow processes (Redis excluded; CPU s: {parts}"
            f"{idle_text}); "
            f"live process {_ms(live)} ms CPU per request{dropped}{exited}"
        )
    return lines


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"
