"""The live overload signal: a loop busy on the CPU counts; one kept off the CPU does not."""

from __future__ import annotations

import asyncio
import time

from proxy.shadow.guards import LoopLag
from tests.conftest import wait_until


async def _hold(seconds: float, *, on_cpu: bool) -> None:
    """Keep the loop occupied for ``seconds`` in 20 ms slices, busy or blocked off the CPU."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        if on_cpu:
            stop = time.perf_counter() + 0.02
            while time.perf_counter() < stop:
                pass
        else:
            time.sleep(0.02)  # noqa: ASYNC251 (blocking the loop off the CPU is the point)
        await asyncio.sleep(0)


def test_busy_on_the_cpu_counts_and_kept_off_it_does_not() -> None:
    # A loop of its own: the suite's shared loop may be running other tests' leftovers.
    asyncio.run(_busy_and_blocked())


async def _busy_and_blocked() -> None:
    lag = LoopLag(shed_ms=1000.0)
    lag.start()
    try:
        await _hold(0.6, on_cpu=False)
        blocked = lag.busy
        assert blocked < 0.2 and not lag.overloaded()  # held up, but not by its own work
        cpu, wall = time.thread_time(), time.perf_counter()
        await _hold(0.6, on_cpu=True)
        share = (time.thread_time() - cpu) / (time.perf_counter() - wall)
        # On a quiet host this reaches 1 (and the loop counts as saturated); on a loaded one, the
        # share of the CPU this thread got, whatever the other processes left it: the reading
        # follows that share (a moving average, most of the way there after 0.6 s), and is
        # above the blocked loop's.
        assert lag.busy > 0.6 * share and lag.busy > blocked, (lag.busy, share, blocked)
        # And it recovers when idle.
        await wait_until(
            lambda: lag.busy < 0.2 and not lag.overloaded(), what="the loop idle again"
        )
    finally:
        await lag.stop()
