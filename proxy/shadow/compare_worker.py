"""A compare worker process (``python -m proxy.shadow.compare_worker FD``), started by
``CompareLink``.

It decodes, compares, judges and stores the pairs the mirror process sends, at the lowest CPU
priority (SCHED_IDLE on Linux, else nice +19): when CPU is short, everything else gets it first,
and pairs wait in the mirror process's queue meanwhile. It keeps to its share of
``proxy.mirror_cpu_budget`` by pausing between pairs, so on a small host shadow work cannot
crowd the live path, its clients or its backends even when the CPU is free. It exits when the
mirror process closes the socket or asks it to, after storing what it compared.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import deque
from typing import Any

from aiohttp import web

from ..keys import COMPARER, TELEMETRY
from ..serve import tune_gc
from ..settings import Settings
from ..wire import child_main, exchange_from_wire, read_frame, write_frame
from .compare_stage import Comparer, Pair
from .guards import CpuBudget

log = logging.getLogger("shadowproxy.compare_worker")


def pair_from_wire(w: tuple[Any, ...]) -> Pair:
    (
        seq,
        candidate,
        model,
        request_id,
        received_at,
        headers,
        body,
        ref,
        cand,
        canary,
        span,
        proto,
    ) = w
    ref_x, cand_x = exchange_from_wire(ref), exchange_from_wire(cand)
    assert ref_x is not None and cand_x is not None
    return Pair(
        seq,
        candidate,
        model,
        request_id,
        received_at,
        headers,
        body,
        ref_x,
        cand_x,
        canary,
        span,
        protocol=proto,
    )


class Acks:
    """What was compared, told to the mirror process once per turn of the loop: one write for
    every pair compared meanwhile (a write each cost a tenth of the worker's CPU)."""

    def __init__(self, writer: asyncio.StreamWriter, comparer: Comparer) -> None:
        self._writer = writer
        self._comparer = comparer
        self._done: list[tuple[str, str]] = []

    def add(self, candidate: str, outcome: str) -> None:
        if not self._done:
            asyncio.get_running_loop().call_soon(self.flush)
        self._done.append((candidate, outcome))

    def flush(self) -> None:
        if self._done:
            done, self._done = self._done, []
            write_frame(self._writer, ("done", done, self._comparer.unstored))


async def _compare_loop(
    inbox: deque[Pair | None],
    wake: asyncio.Event,
    comparer: Comparer,
    budget: CpuBudget,
    acks: Acks,
) -> None:
    """Compare pairs in arrival order, pausing while over the CPU budget; None ends it."""
    while True:
        while not inbox:
            wake.clear()
            await wake.wait()
        pair = inbox.popleft()
        if pair is None:
            return
        pause = budget.pause_s()
        if pause:
            await asyncio.sleep(pause)
        outcome = await comparer.compare(pair)
        acks.add(pair.candidate, outcome)


async def run(fd: int) -> None:
    from ..app import build_compare_app

    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
    settings: Settings
    settings, cores = await read_frame(reader)
    app = build_compare_app(settings)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    comparer = app[COMPARER]
    comparer.on_written(lambda unstored: write_frame(writer, ("stored", None, unstored)))
    tune_gc()
    write_frame(writer, ("ready",))
    inbox: deque[Pair | None] = deque()
    wake = asyncio.Event()
    loop = asyncio.get_running_loop()
    acks = Acks(writer, comparer)
    budget = CpuBudget(cores)  # from now: start-up is not comparing
    worker = loop.create_task(_compare_loop(inbox, wake, comparer, budget, acks))
    try:
        while True:
            try:
                msg = await read_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            if msg[0] == "pair":
                inbox.append(pair_from_wire(msg[1]))
                wake.set()
            elif msg[0] == "snap":
                snap = {
                    "tally": [[c, w, n] for (c, w), n in app[TELEMETRY].tally.items()],
                    "prometheus": app[TELEMETRY].prometheus_text().decode(),
                }
                write_frame(writer, ("snap", msg[1], snap))
            elif msg[0] == "close":
                break
        # Asked to stop: compare what was handed over (the mirror process bounds how long, and
        # kills this process beyond it).
        inbox.append(None)
        wake.set()
        await worker
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        await runner.cleanup()  # stores the last batch, then closes the store and telemetry
        writer.close()


def main() -> None:
    with contextlib.suppress(OSError):
        os.nice(19)
    with contextlib.suppress(OSError, AttributeError):
        # Linux: run only on CPU nobody else wants. At nice +19 a worker still took its share
        # of a busy host and showed in live p99; SCHED_IDLE yields at once to any other task.
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    child_main(run)


if __name__ == "__main__":
    main()
