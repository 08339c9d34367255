"""Guards that keep shadow work from costing the live path: a per-candidate circuit breaker and
an event-loop lag monitor that drives overload shedding."""

from __future__ import annotations

import asyncio
import time


class Breaker:
    """A per-candidate circuit breaker on connection failures.

    A refused or unreachable candidate fails fast, but each attempt still costs the proxy a
    connect and an exception (about 1 ms of CPU). After ``failures`` in a row the circuit opens
    for ``open_s``; then one copy is let through to probe, and its result closes or reopens it.
    """

    def __init__(self, failures: int, open_s: float) -> None:
        self._limit = failures
        self._open_s = open_s
        self._failures = 0
        self._open_until = 0.0

    def is_open(self) -> bool:
        if self._failures < self._limit:
            return False
        now = time.monotonic()
        if now < self._open_until:
            return True
        self._open_until = now + self._open_s  # half-open: this copy probes, others wait
        return False

    def record(self, *, ok: bool) -> None:
        if ok:
            self._failures = 0
            return
        self._failures += 1
        if self._failures >= self._limit:
            self._open_until = time.monotonic() + self._open_s


SATURATED = 0.9
"""A loop on the CPU this share of the time is saturated: copies would come out of live work."""
LONE_STALL = 0.8
"""One late tick, however late, lifts the lag average to at most this share of ``shed_ms``:
one stall alone sheds nothing, two in a row do."""


class LoopLag:
    """How late the event loop runs its callbacks because it is busy: the live process's own
    overload signal.

    A ticker sleeps ``interval`` and measures how much later it woke; the reading is a moving
    average over about ten ticks, so a loop that stays late sheds mirrors until it catches up,
    while one burst (a garbage collection, a batch of answers at once) sheds nothing: one tick's
    lateness is capped so that it alone cannot lift the average past ``shed_ms``
    (``LONE_STALL``). Uncapped, one 50 ms stall as a proxy started (its first connection, an
    import) shed the copies of the next 100 ms, and at tens of requests a second a planted
    divergence could go unseen. Lateness counts only when the loop's thread spent most of that
    time on the CPU: a loop late because its own callbacks took the time is overloaded, and
    building copies would come out of live latency; a loop late because the host gave the CPU
    to other processes (a model server computing, say) is not, and shedding then would only
    lose copies.
    """

    def __init__(
        self, shed_ms: float, interval: float = 0.01, weight: float = 0.1, busy: float = 0.5
    ) -> None:
        self.shed_ms = shed_ms
        self._cap_ms = LONE_STALL * shed_ms / weight
        self.ms = 0.0
        self.busy = 0.0
        """The share of wall time the loop's thread spent on the CPU (moving average): near 1,
        the loop is saturated even when it keeps its timers on time."""
        self._interval = interval
        self._weight = weight
        self._busy = busy
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started, cpu = loop.time(), time.thread_time()
            await asyncio.sleep(self._interval)
            elapsed = loop.time() - started
            late = (elapsed - self._interval) * 1000.0
            busy = (time.thread_time() - cpu) / elapsed if elapsed > 0 else 0.0
            if busy < self._busy:
                late = 0.0  # waiting for the CPU, not busy: not this loop's overload
            late = min(late, self._cap_ms)
            self.ms += self._weight * (late - self.ms)
            self.busy += self._weight * (min(busy, 1.0) - self.busy)

    def overloaded(self) -> bool:
        """Late by ``shed_ms`` on average while busy, or on the CPU nearly all the time."""
        return self.ms > self.shed_ms or self.busy > SATURATED


_RECHECK_S = 0.005


class CpuBudget:
    """This process's CPU use against a budget in cores, as a bucket of CPU time.

    A compare worker pauses while it is over budget: on a host where the live process, its
    clients and its backends share a few cores, shadow work must not take more than its share,
    and CPU priorities alone do not stop it from crowding them. The bucket fills at ``cores``
    CPU-seconds a second (up to one window's worth: a short burst is allowed, a long one is
    not) and empties by the CPU this process used; a measure over fixed windows let a worker
    spend a whole window's budget in each burst.
    """

    def reset(self) -> None:
        """Start counting now (what start-up cost is not shadow work)."""
        self._allowance = self._cap
        self._mark = (time.monotonic(), time.process_time())

    def __init__(self, cores: float, window_s: float = 0.5) -> None:
        self.cores = cores
        self.window_s = window_s
        self._allowance = cores * window_s
        self._mark = (time.monotonic(), time.process_time())

    def pause_s(self) -> float:
        """0 while within budget, else how long to pause before the budget allows more."""
        if self.cores <= 0:
            return 0.0
        now = time.monotonic()
        if self._allowance >= 0 and now - self._mark[0] < _RECHECK_S:
            return 0.0  # reading this process's CPU clock is a system call: not every time
        cpu = time.process_time()
        earned = (now - self._mark[0]) * self.cores
        # Between -cap and +cap: a burst beyond a window's worth (start-up, say) costs at most a
        # window's pause, not a debt paid off for minutes.
        allowance = self._allowance + earned - (cpu - self._mark[1])
        self._allowance = max(-self._cap, min(allowance, self._cap))
        self._mark = (now, cpu)
        return 0.0 if self._allowance >= 0 else -self._allowance / self.cores

    @property
    def _cap(self) -> float:
        return self.cores * self.window_s


class Pacer:
    """How many copies per second the mirror worker can take, from what it just managed.

    Dropping a copy in the worker still costs both processes: the live side pickles and writes
    it, the worker reads and unpickles it (at 1,000 requests/s, 40% of a core in the worker for
    nothing). So when the worker had to shed copies (CPU budget, loop lag), it tells the live
    side to send about what it took in that window; while it sheds nothing the pace grows by a
    quarter each window, and it is lifted once it is well above what arrives. None: no limit.
    """

    def __init__(self, window_s: float = 0.5) -> None:
        self.window_s = window_s
        self._rate: float | None = None
        self._mark = (time.monotonic(), 0, 0, 0)

    def rate(self, taken: int, shed: int, received: int) -> float | None:
        now = time.monotonic()
        elapsed = max(now - self._mark[0], 1e-3)
        took = (taken - self._mark[1]) / elapsed
        shed_now = shed - self._mark[2]
        arrived = (received - self._mark[3]) / elapsed
        self._mark = (now, taken, shed, received)
        if shed_now > 0:
            # Down to what it managed, but by at most a fifth a window: one window in which the
            # worker got little CPU must not throttle it for many.
            self._rate = max(took, 0.8 * (self._rate or took), 1.0)
        elif self._rate is not None:
            self._rate *= 1.25
            if self._rate > 2 * arrived:
                self._rate = None
        return self._rate


class TokenBucket:
    """At most ``rate`` events per second, with half a second of burst; None: unlimited."""

    def __init__(self) -> None:
        self.rate: float | None = None
        self._tokens = 0.0
        self._at = time.monotonic()

    def set_rate(self, rate: float | None) -> None:
        if rate is not None and self.rate is None:
            self._tokens, self._at = rate * 0.5, time.monotonic()
        self.rate = rate

    def take(self) -> bool:
        if self.rate is None:
            return True
        now = time.monotonic()
        # Half a second of burst, but at least one copy: below 2 a second none would ever pass.
        self._tokens = min(max(1.0, self.rate * 0.5), self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


async def stop_task(task: asyncio.Task[None] | None) -> None:
    """Cancel a background loop and wait until it has ended (whatever it ended with)."""
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
